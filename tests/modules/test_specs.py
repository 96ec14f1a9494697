"""Typed module specs (``optimum_vim.modules.spec``): config.json dicts round-trip key for key, the declared buffers
are what the modules hold, bad specs get clear errors, and every quantized module turns itself back into float."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from optimum_vim.modules import (
    ActivationSpec,
    Conv1dSpec,
    ConvWeightSpec,
    IntWeightSpec,
    LinearSpec,
    OutputSpec,
    QActivation,
    ScanSpec,
    StateSpec,
    VQWeightSpec,
    build_qmodule,
    load_qmodule_tensors,
    spec_from_dict,
)
from optimum_vim.modules.float import SelectiveScan, TokenConv1d
from optimum_vim.modules.plan import LayerPlan
from optimum_vim.serialization import is_quantized_tensor_name

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def _golden_specs():
    for config in sorted(GOLDEN.glob("*/config.json")):
        for name, spec in json.loads(config.read_text())["quantization_config"]["layers"].items():
            yield f"{config.parent.name}:{name}", spec


GOLDEN_SPECS = dict(_golden_specs())


def test_every_golden_spec_round_trips_key_for_key():
    assert len(GOLDEN_SPECS) > 100
    kinds = set()
    for where, d in GOLDEN_SPECS.items():
        spec = spec_from_dict(d)
        kinds.add(type(spec).__name__)
        assert spec.to_dict() == d, where
        assert json.loads(json.dumps(spec.to_dict())) == d, where
        assert spec_from_dict(spec.to_dict()) == spec, where
    assert kinds == {"LinearSpec", "Conv1dSpec", "OutputSpec", "ScanSpec"}


def test_declared_buffers_are_the_module_buffers():
    for where, d in GOLDEN_SPECS.items():
        spec = spec_from_dict(d)
        with torch.device("meta"):
            mod = build_qmodule(spec)
        held = {n: (tuple(b.shape), b.dtype) for n, b in mod.named_buffers()}
        declared = {b.name: (b.shape, b.dtype) for b in spec.tensors()}
        assert held == declared, where
        assert mod.spec == spec and mod.spec.to_dict() == d, where
        assert all(is_quantized_tensor_name(f"vim.layers.0.mixer.x.{n}") for n in declared if n != "bias"), where


def test_directly_built_specs_write_the_recipe_dicts():
    act = ActivationSpec(bits=8, granularity="token", symmetric=False, length=50)
    linear = LinearSpec(in_features=32, out_features=128, bias=False, weight=IntWeightSpec(bits=4), input=act)
    assert linear.to_dict() == {
        "type": "linear", "in_features": 32, "out_features": 128, "bias": False,
        "weight": {"format": "int", "bits": 4, "group_size": None},
        "input": {"bits": 8, "granularity": "token", "symmetric": False, "length": 50},
    }
    vq = VQWeightSpec(index_bits=3, vector_dim=8, codebook_size=8, codebook_dtype="float16")
    assert vq.to_dict() == {"format": "vq", "index_bits": 3, "vector_dim": 8, "codebook_size": 8,
                            "channel_scale": False, "codebook_dtype": "float16"}
    scan = ScanSpec(length=50, channels=64, d_state=8, reverse=True, B=ActivationSpec(bits=8, granularity="tensor"),
                    state=StateSpec(bits=8, channel_scale=True))
    assert scan.to_dict()["state"] == {"bits": 8, "narrow": False, "channel_scale": True}
    assert scan.to_dict()["u"] is None and scan.to_dict()["B"] == {"bits": 8, "granularity": "tensor", "symmetric": True}
    # a dict without optional keys stays without them, with or without a changed field
    plain = {"type": "scan", "reverse": False, "length": 4, "channels": 2, "d_state": 1}
    assert spec_from_dict(plain).to_dict() == plain
    outlier = ActivationSpec(bits=4, granularity="dynamic_outlier", length=50)
    assert outlier.to_dict() == {"bits": 4, "granularity": "dynamic_outlier", "symmetric": True, "length": 50,
                                 "outlier_bits": 8, "refresh": 10, "outlier_sigma": 3.0, "reverse": False,
                                 "static_outliers": False}


@pytest.mark.parametrize("bad, message", [
    ({"type": "linear", "in_features": 4, "out_features": 4, "weight": {"format": "int", "bits": 9}}, "1..8"),
    ({"type": "linear", "in_features": 4, "out_features": 4, "weight": {"format": "fp4"}}, "'int' or 'vq'"),
    ({"type": "linear", "in_features": 4, "out_features": 4, "weight": {"format": "int", "bits": 4},
      "inptu": None}, "unknown keys ['inptu']"),
    ({"type": "linear", "out_features": 4, "weight": {"format": "int", "bits": 4}}, "lacks ['in_features']"),
    ({"type": "conv1d", "channels": 4, "kernel_size": 3, "weight": {"bits": 8, "granularity": "row"}},
     "'channel' or 'tensor'"),
    ({"type": "output", "inner": "gelu", "output": {"bits": 8, "granularity": "tensor"}}, "inner must be one of"),
    ({"type": "output", "inner": "silu"}, "needs an input or an output"),
    ({"type": "scan", "length": 4, "channels": 2, "d_state": 1, "state": {"bits": 9}}, "state bits"),
    ({"type": "scan", "length": 4, "channels": 2, "d_state": 1, "u": {"bits": 8, "granularity": "token"}},
     "needs the sequence length"),
    ({"type": "lstm"}, "unknown quantized module type 'lstm'"),
])
def test_bad_specs_are_refused_clearly(bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        spec_from_dict(bad)
    with pytest.raises(ValueError):
        LayerPlan(spec=bad, tensors={})


def test_layer_plan_converts_dicts_and_build_accepts_both():
    d = {"type": "output", "inner": "silu", "output": {"bits": 8, "granularity": "tensor", "narrow": False}}
    plan = LayerPlan(spec=d, tensors={})
    assert isinstance(plan.spec, OutputSpec) and plan.spec.output.narrow is False
    assert type(build_qmodule(d)) is type(build_qmodule(plan.spec))
    assert build_qmodule(d).spec.to_dict() == d


def _filled(spec, generator):
    mod = build_qmodule(spec)
    tensors = {}
    for b in spec.tensors():
        if b.dtype.is_floating_point:
            tensors[b.name] = torch.rand(b.shape, generator=generator).to(b.dtype) + 0.1
        else:
            tensors[b.name] = torch.randint(0, 4, b.shape, generator=generator).to(b.dtype)
    load_qmodule_tensors(mod, tensors)
    return mod


def test_each_module_dequantizes_itself():
    g = torch.Generator().manual_seed(0)
    act = ActivationSpec(bits=8, granularity="tensor")
    linear = _filled(LinearSpec(in_features=16, out_features=8, bias=True, weight=IntWeightSpec(bits=4, group_size=8),
                                input=act, smooth=True), g)
    flin = linear.dequantize(torch.float16)
    assert type(flin) is nn.Linear and flin.weight.dtype == torch.float16
    assert torch.equal(flin.weight, linear.effective_weight().half()) and torch.equal(flin.bias, linear.bias.half())

    conv = _filled(Conv1dSpec(channels=4, kernel_size=3, weight=ConvWeightSpec(bits=4), reverse=True), g)
    fconv = conv.dequantize()
    assert type(fconv) is TokenConv1d and fconv.reverse
    assert torch.equal(fconv.weight, conv.dequantized_weight()) and torch.equal(fconv.bias, conv.bias)
    x = torch.randn(2, 5, 4, generator=g)
    with torch.no_grad():
        assert torch.equal(fconv(x), conv(x))  # no activation quantizer: the same function

    scan = _filled(ScanSpec(length=5, channels=4, d_state=2, reverse=True, B=act), g)
    fscan = scan.dequantize(use_mamba_kernels=False)
    assert type(fscan) is SelectiveScan and fscan.reverse and fscan.backend == "torch"

    out = _filled(OutputSpec(inner="softplus", input=act), g)
    assert type(out.dequantize()) is nn.Softplus
    assert type(QActivation(act).dequantize()) is nn.Identity
