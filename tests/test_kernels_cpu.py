"""CPU kernel family (``optimum_vim_kernels.cpu``) against the references: integer parts and epilogues bit-identical,
weight decodings cached and invalidated, and chosen by ``auto`` dispatch on CPU tensors."""

from __future__ import annotations

import pytest
import torch
from optimum_vim_kernels import cpu, reference
from optimum_vim_kernels.format import pack_codes, pack_signed
from transformers import AutoModelForImageClassification

from optimum_vim import ViMQuantizationConfig
from optimum_vim.ops.dispatch import KernelUnsupportedError, pick_kernel, use_kernels

SHAPES = [(1, 8, 32), (37, 45, 100), (70, 24, 130), (5, 3, 7)]


def _weight(n, k, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    hi = (1 << (bits - 1)) - 1
    codes = torch.randint(-hi, hi + 1, (n, k), generator=g)
    return codes, (codes.to(torch.int8) if bits == 8 else pack_signed(codes, bits))


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("zero", [False, True])
def test_int8_activations_bit_identical(m, n, k, bits, group, zero):
    _, qw = _weight(n, k, bits)
    g = torch.Generator().manual_seed(1)
    ws = torch.rand(n, 1 if group is None else -(-k // group), generator=g) + 0.05
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    kw = dict(bits=bits, in_features=k, group_size=group, a_scale=torch.rand(m, generator=g) + 0.01,
              a_zero=torch.randint(-128, 128, (m,), dtype=torch.int32, generator=g) if zero else None,
              bias=torch.randn(n, generator=g))
    assert torch.equal(cpu.quant_gemm(a, qw, ws, **kw), reference.quant_gemm_ref(a, qw, ws, **kw))
    out_scale = torch.rand(m, generator=g) + 0.5
    assert torch.equal(cpu.quant_gemm(a, qw, ws, out_scale=out_scale, **kw),
                       reference.quant_gemm_ref(a, qw, ws, out_scale=out_scale, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (3, None)])
def test_float_activations_bit_identical(dtype, bits, group):
    m, n, k = 19, 33, 70
    _, qw = _weight(n, k, bits)
    ws = torch.rand(n, 1 if group is None else -(-k // group)) + 0.05
    a = torch.randn(m, k).to(dtype)
    kw = dict(bits=bits, in_features=k, group_size=group, bias=torch.randn(n))
    out = cpu.quant_gemm(a, qw, ws, **kw)
    assert out.dtype == dtype and torch.equal(out, reference.quant_gemm_ref(a, qw, ws, **kw))


@pytest.mark.parametrize("vec,scaled", [(4, True), (8, False), (3, True)])
def test_codebook_weights_bit_identical(vec, scaled):
    m, n, k = 11, 21, 70
    cb = torch.randn(256, vec)
    qw = pack_codes(torch.randint(0, 256, (n, -(-k // vec))), 8)
    ws = torch.rand(n, 1) + 0.5 if scaled else None
    a = torch.randn(m, k)
    kw = dict(bits=8, in_features=k, codebook=cb)
    assert torch.equal(cpu.quant_gemm(a, qw, ws, **kw), reference.quant_gemm_ref(a, qw, ws, **kw))


@pytest.mark.parametrize("num_outliers", [0, 5])
def test_outlier_gemm_bit_identical(num_outliers):
    m, n, k = 29, 35, 80
    _, qw = _weight(n, k, 4)
    ws = torch.rand(n, 1) * 0.1
    a = torch.randint(-7, 8, (m, k), dtype=torch.int8)
    idx = torch.randperm(k)[:num_outliers].to(torch.int32)
    a[:, idx.long()] = 0
    args = (a, torch.rand(m) + 0.05, qw, ws, idx, torch.randn(m, num_outliers) * 20)
    kw = dict(bits=4, in_features=k, bias=torch.randn(n))
    assert torch.equal(cpu.outlier_gemm(*args, **kw), reference.outlier_gemm_ref(*args, **kw))


@pytest.mark.parametrize("length_scale", [True, False])
def test_combine_directions_bit_identical(length_scale):
    b, length, e = 3, 9, 16
    y_f, y_b, z = (torch.randn(b, length, e) for _ in range(3))
    scale = torch.rand(length if length_scale else 1) * 0.02 + 0.01
    zero = torch.randint(-10, 10, scale.shape, dtype=torch.int32)
    for kw in (dict(out_scale=scale, out_zero=zero), dict(out_scale=scale), dict()):
        assert torch.equal(cpu.combine_directions(y_f, y_b, z, **kw), reference.combine_directions_ref(y_f, y_b, z, **kw))


def test_decoded_weights_are_cached_and_invalidated():
    cpu.clear_cache()
    _, qw = _weight(16, 40, 4)
    ws = torch.rand(16, 1)
    a = torch.randint(-128, 128, (3, 40), dtype=torch.int8)
    w8 = cpu.int8_weight(qw, 4, 40)
    assert cpu.int8_weight(qw, 4, 40) is w8  # decoded once
    assert cpu.cache_bytes() >= 16 * 40
    before = cpu.quant_gemm(a, qw, ws, bits=4, in_features=40, a_scale=torch.ones(3))
    qw.copy_(_weight(16, 40, 4, seed=7)[1])  # an in-place write (load_state_dict) bumps the version counter
    assert cpu.int8_weight(qw, 4, 40) is not w8
    after = cpu.quant_gemm(a, qw, ws, bits=4, in_features=40, a_scale=torch.ones(3))
    assert not torch.equal(before, after)
    assert torch.equal(after, reference.quant_gemm_ref(a, qw, ws, bits=4, in_features=40, a_scale=torch.ones(3)))
    w = cpu.float_weight(qw, ws, 4, 40)
    ws.mul_(2)  # the scale is part of the key too
    assert not torch.equal(cpu.float_weight(qw, ws, 4, 40), w)
    del qw, w8
    import gc

    gc.collect()
    assert cpu.cache_bytes() == 0  # freed with the packed tensor


def test_supports_gives_reasons():
    assert cpu.supports_quant_gemm(m=4, n=4, k=4, bits=3) is None
    assert "int8 codes" in cpu.supports_quant_gemm(m=4, n=4, k=4, bits=4, int_activations=True, act_dtype=torch.int16)
    assert "overflow" in cpu.supports_quant_gemm(m=4, n=4, k=1 << 16, bits=8, int_activations=True,
                                                 act_dtype=torch.int8)
    assert "float activations" in cpu.supports_quant_gemm(m=4, n=4, k=4, bits=8, codebook=True,
                                                          int_activations=True, act_dtype=torch.int8)
    with pytest.raises(KernelUnsupportedError, match="overflow"), use_kernels("cpu"):
        pick_kernel("gemm", "quant_gemm", torch.zeros(1), m=4, n=4, k=1 << 16, bits=8, int_activations=True,
                    act_dtype=torch.int8)
    with use_kernels("reference"):
        assert pick_kernel("gemm", "quant_gemm", torch.zeros(1), m=4, n=4, k=4, bits=8) is None
    assert pick_kernel("gemm", "quant_gemm", torch.zeros(1), m=4, n=4, k=4, bits=8) is cpu.quant_gemm  # auto


@pytest.fixture(scope="module")
def quantized_models(tiny_vim_dir):
    data = torch.randn(16, 1, 28, 28)
    configs = {
        "w8a8-tensor": ViMQuantizationConfig(weight_bits=8, act_bits=8, calibration_dataset=data),
        "w4a8-token-scan": ViMQuantizationConfig(weight_bits=4, act_bits=8, calibration_dataset=data,
                                                 recipe_args={"act_granularity": "token", "scan_act_bits": 8}),
        "w3-g32": ViMQuantizationConfig(weight_bits=3, weight_group_size=32),
    }
    return {k: AutoModelForImageClassification.from_pretrained(tiny_vim_dir, quantization_config=c).eval()
            for k, c in configs.items()}


@pytest.mark.parametrize("name", ["w8a8-tensor", "w4a8-token-scan", "w3-g32"])
def test_whole_model_on_cpu_kernels_equals_reference(quantized_models, name, count_calls):
    model = quantized_models[name]
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad(), use_kernels("reference"):
        ref = model(x).logits
    calls = count_calls(cpu, "quant_gemm")
    with torch.no_grad():
        auto = model(x).logits
        with use_kernels("cpu"):
            forced = model(x).logits
    assert calls["n"] == 2 * 12  # every block linear of both forwards went through the CPU GEMM
    assert torch.equal(auto, ref) and torch.equal(forced, ref)


def test_nan_inputs_still_give_nan_rows_on_cpu_kernels(quantized_models):
    layer = quantized_models["w8a8-tensor"].vim.layers[0].mixer.in_proj
    x = torch.randn(2, 5, layer.in_features)
    x[1, 3, 7] = float("nan")
    x[0, 2, 1], x[0, 2, 4] = float("inf"), float("-inf")  # sums to NaN, holds none: not a NaN row
    with torch.no_grad():
        y = layer(x)
    nan = torch.isnan(y).any(-1)
    assert nan[1, 3] and int(nan.sum()) == 1 and torch.isnan(y[1, 3]).all()
