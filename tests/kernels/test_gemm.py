"""Triton GEMM kernels against their PyTorch references (interpreted on CPU, compiled on GPU)."""

from __future__ import annotations

import pytest
import torch
from optimum_vim_kernels import gemm, outlier, reference
from optimum_vim_kernels.format import pack_codes, pack_signed

# tolerance of float-activation paths against a float64 computation, defined once (relative to max |y|)
FLOAT_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weight(n, k, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    if bits == 1:  # binary: +-1
        codes = torch.randint(0, 2, (n, k), generator=g) * 2 - 1
        return codes, pack_signed(codes, 1)
    hi = (1 << (bits - 1)) - 1
    codes = torch.randint(-hi, hi + 1, (n, k), generator=g)
    return codes, (codes.to(torch.int8) if bits == 8 else pack_signed(codes, bits))


def _dev(*ts):
    return [t.to(DEVICE) if t is not None else None for t in ts]


SHAPES = [(1, 8, 32), (37, 45, 100), (64, 64, 64), (70, 24, 130)]
IDS = ["gemv", "ragged", "exact-blocks", "tall"]


@pytest.mark.parametrize("m,n,k", SHAPES, ids=IDS)
@pytest.mark.parametrize("bits", [8, 4, 2, 1], ids=["w8", "w4", "w2", "w1"])
@pytest.mark.parametrize("group", [None, 32], ids=["per-channel", "g32"])
def test_int8_activations_exact(m, n, k, bits, group):
    codes, qw = _weight(n, k, bits)
    groups = 1 if group is None else -(-k // group)
    g = torch.Generator().manual_seed(1)
    ws = torch.rand(n, groups, generator=g) + 0.05
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    a_scale = torch.rand(m, generator=g) + 0.01
    a_zero = torch.randint(-20, 20, (m,), dtype=torch.int32, generator=g)
    bias = torch.randn(n, generator=g)
    kw = dict(bits=bits, in_features=k, group_size=group, a_scale=a_scale, a_zero=a_zero, bias=bias)
    ref = reference.quant_gemm_ref(a, qw, ws, **kw)
    out = gemm.quant_gemm(*_dev(a, qw, ws), **{k2: (v.to(DEVICE) if torch.is_tensor(v) else v) for k2, v in kw.items()})
    # integer accumulation is exact and the fp32 epilogue runs in the reference's order
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("per_tensor", [False, True], ids=["row-scales", "tensor-scale"])
def test_int8_requantized_output(per_tensor):
    m, n, k = 33, 40, 64
    codes, qw = _weight(n, k, 4)
    ws = torch.rand(n, 1) * 0.02
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    a_scale = torch.tensor([0.03]) if per_tensor else torch.rand(m) * 0.05
    out_scale = torch.rand(m) * 0.1 + 0.05
    kw = dict(bits=4, in_features=k, a_scale=a_scale, out_scale=out_scale)
    ref = reference.quant_gemm_ref(a, qw, ws, **kw)
    out = gemm.quant_gemm(*_dev(a, qw, ws), bits=4, in_features=k, a_scale=a_scale.to(DEVICE), out_scale=out_scale.to(DEVICE)).cpu()
    assert out.dtype == torch.int8
    # identical codes except where y/out_scale sits within float rounding of a .5 tie
    y = reference.quant_gemm_ref(a, qw, ws, bits=4, in_features=k, a_scale=a_scale)
    frac = (y / out_scale[:, None]).abs() % 1
    near_tie = (frac - 0.5).abs() < 1e-4
    assert torch.equal(out[~near_tie], ref[~near_tie])
    assert (out.int() - ref.int()).abs().max() <= 1


@pytest.mark.parametrize("m,n,k", SHAPES[1:3], ids=IDS[1:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    "bits,group", [(8, None), (4, 32), (2, None), (1, 32)], ids=["w8a16", "w4a16-g32", "w2a16", "w1a16-g32"]
)
def test_float_activations(m, n, k, dtype, bits, group):
    codes, qw = _weight(n, k, bits)
    ws = torch.rand(n, 1 if group is None else -(-k // group)) + 0.05
    a = torch.randn(m, k).to(dtype)
    bias = torch.randn(n)
    out = gemm.quant_gemm(*_dev(a, qw, ws), bits=bits, in_features=k, group_size=group, bias=bias.to(DEVICE)).cpu()
    assert out.dtype == dtype
    w = reference.dequantize_weight_ref(qw, ws, bits, k, group).double()
    exact = a.double() @ w.t() + bias.double()
    err = (out.double() - exact).abs().max() / exact.abs().max()
    assert err < FLOAT_TOL[dtype], float(err)


@pytest.mark.parametrize(
    "index_bits,vec", [(8, 4), (4, 2), (8, 8), (6, 2), (5, 8), (7, 4), (3, 1)],
    ids=["i8-d4", "i4-d2", "i8-d8", "i6-d2", "i5-d8", "i7-d4", "i3-d1"],
)
@pytest.mark.parametrize("scaled", [False, True], ids=["no-scale", "channel-scale"])
def test_codebook_weights(index_bits, vec, scaled):
    m, n, k = 19, 27, 70  # 70: the last sub-vector of a row is padded for d = 4 and 8
    cb = torch.randn(1 << index_bits, vec)
    idx = torch.randint(0, 1 << index_bits, (n, -(-k // vec)))
    qw = pack_codes(idx, index_bits)
    ws = torch.rand(n, 1) + 0.5 if scaled else None
    a = torch.randn(m, k)
    ref = reference.quant_gemm_ref(a, qw, ws, bits=index_bits, in_features=k, codebook=cb)
    out = gemm.quant_gemm(*_dev(a, qw, ws), bits=index_bits, in_features=k, codebook=cb.to(DEVICE)).cpu()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if ws is not None:  # the scale is applied (a kernel ignoring it would match an unscaled reference)
        unscaled = reference.quant_gemm_ref(a, qw, None, bits=index_bits, in_features=k, codebook=cb)
        assert (unscaled - ref).abs().max() > 1e-2


@pytest.mark.parametrize("num_outliers", [0, 7], ids=["no-outliers", "p7"])
@pytest.mark.parametrize("bits", [4, 8, 1], ids=["w4", "w8", "w1"])
def test_outlier_gemm(num_outliers, bits):
    m, n, k = 29, 35, 80
    codes, qw = _weight(n, k, bits)
    ws = torch.rand(n, 1) * 0.1
    a = torch.randint(-7, 8, (m, k), dtype=torch.int8)
    idx = torch.randperm(k)[:num_outliers].to(torch.int32)
    a[:, idx.long()] = 0
    values = torch.randn(m, num_outliers) * 20
    bias = torch.randn(n)
    kw = dict(bits=bits, in_features=k, bias=bias)
    ref = reference.outlier_gemm_ref(a, torch.full((m,), 0.1), qw, ws, idx, values, **kw)
    out = outlier.outlier_gemm(*_dev(a, torch.full((m,), 0.1), qw, ws, idx, values), bits=bits, in_features=k,
                               bias=bias.to(DEVICE)).cpu()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    if num_outliers:  # the outlier path contributes: dropping it changes the result
        inlier_only = reference.quant_gemm_ref(a, qw, ws, bits=bits, in_features=k, a_scale=torch.full((m,), 0.1), bias=bias)
        assert (inlier_only - ref).abs().max() > 1e-2


def test_supports_gives_reasons():
    assert gemm.supports_quant_gemm(m=4, n=4, k=4, bits=4) is None
    assert "3-bit" in gemm.supports_quant_gemm(m=4, n=4, k=4, bits=3)
    assert "float activations" in gemm.supports_quant_gemm(m=4, n=4, k=4, bits=8, codebook=True, int_activations=True,
                                                            act_dtype=torch.int8)
    assert "power of two" in gemm.supports_quant_gemm(m=4, n=4, k=96, bits=4, group_size=48)
    assert "int8 codes" in gemm.supports_quant_gemm(m=4, n=4, k=4, bits=4, int_activations=True, act_dtype=torch.int16)
    assert "reference only" in outlier.supports_outlier_gemm(m=1, n=1, k=8, bits=3, num_outliers=1)
    assert "vector_dim 6" in gemm.supports_quant_gemm(m=4, n=4, k=12, bits=8, codebook=True, vector_dim=6)
    with pytest.raises(ValueError, match="cannot serve"):
        gemm.quant_gemm(torch.randn(2, 8), pack_signed(torch.zeros(3, 8, dtype=torch.int64), 3), torch.ones(3, 1),
                        bits=3, in_features=8)
