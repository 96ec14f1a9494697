"""The four sharp edges of issue 27, each failing before its fix: disk offload of a pre-quantized folder, torch.compile
of a quantized model, ``ViMQuantizationConfig.update`` type checks, ``dict(config)`` with a generator source."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageClassification

from optimum_vim import ViMQuantizationConfig


@pytest.fixture(scope="module")
def w4a8_dir(tiny_vim_dir, tmp_path_factory):
    cfg = ViMQuantizationConfig(weight_bits=4, act_bits=8, calibration_dataset=torch.randn(16, 1, 28, 28))
    model = AutoModelForImageClassification.from_pretrained(tiny_vim_dir, quantization_config=cfg)
    path = tmp_path_factory.mktemp("w4a8")
    model.save_pretrained(path)
    return str(path)


@pytest.mark.filterwarnings("ignore:The following device_map keys")
def test_disk_offload_of_a_prequantized_folder(w4a8_dir, tmp_path):
    whole = AutoModelForImageClassification.from_pretrained(w4a8_dir)
    # parameters of `vim` itself (cls_token, pos_embed) are named directly (accelerate warns that they are no modules)
    device_map = {"vim.patch_embed": "cpu", "vim.cls_token": "cpu", "vim.pos_embed": "cpu", "vim.layers.0": "disk",
                  "vim.layers.1": "cpu", "vim.norm_f": "cpu", "head": "cpu"}
    offloaded = AutoModelForImageClassification.from_pretrained(w4a8_dir, device_map=device_map,
                                                                offload_folder=str(tmp_path / "offload"))
    assert type(offloaded.vim.layers[0].mixer.in_proj).__name__ == "QLinear"
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(offloaded(x).logits, whole(x).logits)


@pytest.mark.parametrize("gemm_path", ["int_mm", "sgemm"])
def test_torch_compile_traces_a_quantized_model_in_one_graph(w4a8_dir, gemm_path, monkeypatch):
    """Affine int8 activations on both CPU integer paths (sgemm: what auto takes on CPUs without VNNI): the sgemm
    path's exact-chunk size must not depend on the zero points' values inside a graph."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    monkeypatch.setenv("OPTIMUM_VIM_CPU_GEMM", gemm_path)
    model = AutoModelForImageClassification.from_pretrained(w4a8_dir).eval()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # a graph break or recompile raises / counts
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        first, second, eager = compiled(x).logits, compiled(x).logits, model(x).logits
    assert counter.frame_count == 1
    assert torch.equal(first, eager) and torch.equal(second, eager)


def test_compiled_cpu_gemm_does_not_recompile_per_layer():
    """The CPU kernels' id()-keyed weight cache made dynamo guard on each layer's tensor: one recompile per layer
    until the recompile limit. Under compile the decoding is traced instead."""
    import torch._dynamo
    from optimum_vim_kernels import cpu
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    weights = [torch.randint(0, 256, (16, 16), dtype=torch.uint8) for _ in range(12)]  # 4-bit codes, packed
    scale = torch.rand(16, 1) + 0.1

    def layer(a, w):
        return cpu.quant_gemm(a, w, scale, bits=4, in_features=32, a_scale=torch.ones(1))

    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=False)
    a = torch.randint(-127, 128, (4, 32), dtype=torch.int8)
    for w in weights:
        assert torch.equal(compiled(a, w), layer(a, w))
    assert counter.frame_count == 1


def test_update_checks_types_and_applies_nothing_on_error():
    cfg = ViMQuantizationConfig(weight_bits=8)
    with pytest.raises(ValueError, match="weight_bits"):
        cfg.update(weight_bits="four")
    assert cfg.weight_bits == 8
    with pytest.raises(ValueError):
        cfg.update(act_bits=8, weight_bits=9)  # a valid act_bits with an impossible weight_bits: neither applies
    assert cfg.act_bits is None and cfg.weight_bits == 8
    unused = cfg.update(weight_bits=4, act_bits=8, not_a_field=1)
    assert (cfg.weight_bits, cfg.act_bits) == (4, 8) and unused == {"not_a_field": 1}


def test_dict_of_a_config_with_a_generator_source():
    def images():
        yield from (torch.zeros(1, 28, 28) for _ in range(4))

    gen = images()
    cfg = ViMQuantizationConfig(calibration_dataset=gen)
    as_dict = dict(cfg)
    assert as_dict["calibration_dataset"] is gen and as_dict["weight_bits"] == 8
    assert ViMQuantizationConfig.from_dict({k: v for k, v in as_dict.items() if k != "image_processor"}).weight_bits == 8


@pytest.mark.parametrize("settings", [dict(weight_bits=4), dict(recipe="vimvq", weight_bits=2, recipe_args={
    "kmeans_iterations": 3, "convex": False, "incremental": False})], ids=["w4-weight-only", "vq2"])
def test_torch_compile_of_weight_only_and_codebook_models(tiny_vim_dir, settings):
    """Float-activation GEMMs decode the packed weight inside the graph (the decode cache's switch is a context
    variable dynamo cannot read)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    cfg = ViMQuantizationConfig(calibration_dataset=torch.randn(8, 1, 28, 28), **settings)
    model = AutoModelForImageClassification.from_pretrained(tiny_vim_dir, quantization_config=cfg).eval()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        eager, out = model(x).logits, compiled(x).logits
    assert counter.frame_count == 1
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
