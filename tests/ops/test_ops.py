"""The pure-PyTorch ops against float64 step-by-step references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optimum_vim.ops import add_rms_norm, causal_conv1d, rms_norm, selective_scan, selective_scan_torch
from optimum_vim.ops.scan import _SelectiveScanFn, selective_scan_codes
from tests.support.reference_vim import scan_inputs, scan_reference


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("gated", [False, True], ids=["nogate", "gate"])
@pytest.mark.parametrize("shape", [(1, 1, 3, 2), (2, 17, 24, 8), (3, 50, 16, 16)], ids=lambda s: "x".join(map(str, s)))
def test_scan_matches_float64_loop(shape, reverse, gated):
    u, delta, A, B, C, D, z = scan_inputs(*shape)
    z = z if gated else None
    ref = scan_reference(u, delta, A, B, C, D, z, reverse)
    out = selective_scan_torch(u, delta, A, B, C, D, z, reverse=reverse)
    assert out.dtype == torch.float32 and out.shape == u.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # fp64 inputs are computed in fp64: agreement to rounding error
    out64 = selective_scan_torch(*(t.double() if t is not None else None for t in (u, delta, A, B, C, D, z)), reverse=reverse)
    torch.testing.assert_close(out64, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("per_step", [True, False], ids=["per-step-scales", "one-scale"])
def test_scan_on_int8_codes_equals_scan_on_dequantized_inputs(monkeypatch, reverse, per_step):
    """The int8 scan inputs are dequantized inside the scan's layout change, with the arithmetic of dequantizing
    first: bit-identical output, on ragged batch chunks too, and codes and floats can be mixed."""
    import optimum_vim.ops.scan as mod

    monkeypatch.setattr(mod, "_SLICE_ELEMENTS", 12 * 4 * 2)  # chunks of 2 samples: 3 chunks of 5, the last ragged
    b, length, e, n = 5, 9, 12, 4
    g = torch.Generator().manual_seed(3)
    codes = {k: torch.randint(-128, 128, (b, length, w), generator=g, dtype=torch.int8)
             for k, w in (("u", e), ("delta", e), ("B", n), ("C", n))}
    steps = length if per_step else 1
    scale = {k: torch.rand(steps, generator=g) * 0.05 + 0.01 for k in codes}
    delta_zero = torch.randint(-128, -100, (steps,), generator=g).float()
    shape = lambda v: v.reshape(1, -1, 1)  # noqa: E731
    floats = {k: c.float() * shape(scale[k]) for k, c in codes.items() if k != "delta"}
    floats["delta"] = (codes["delta"].float() - shape(delta_zero)) * shape(scale["delta"])
    _, _, A, _, _, D, z = scan_inputs(b, length, e, n)
    expected = selective_scan_torch(floats["u"], floats["delta"], A, floats["B"], floats["C"], D, z, reverse=reverse)
    out = selective_scan_codes(codes["u"], codes["delta"], A, codes["B"], codes["C"], D, z, reverse=reverse,
                               u_scale=scale["u"], delta_scale=scale["delta"], delta_zero=delta_zero,
                               B_scale=scale["B"], C_scale=scale["C"])
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    mixed = selective_scan_codes(floats["u"], codes["delta"], A, floats["B"], codes["C"], D, z, reverse=reverse,
                                 delta_scale=scale["delta"], delta_zero=delta_zero, C_scale=scale["C"])
    assert torch.equal(mixed, expected)
    with pytest.raises(TypeError, match="no u_scale"):
        selective_scan_codes(codes["u"], floats["delta"], A, floats["B"], floats["C"])
    with pytest.raises(TypeError, match="not codes"):
        selective_scan_codes(floats["u"], floats["delta"], A, floats["B"], floats["C"], u_scale=scale["u"])
    with pytest.raises(ValueError, match="1 or L = 9"):
        selective_scan_codes(codes["u"], floats["delta"], A, floats["B"], floats["C"], u_scale=torch.ones(3))


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_scan_batch_chunking_matches_whole_batch(monkeypatch, reverse):
    """Forward and the recomputing backward give the same values whether the batch runs whole or in chunks."""
    import optimum_vim.ops.scan as mod

    u, delta, A, B, C, D, z = scan_inputs(5, 9, 8, 4, requires_grad=True)
    weights = torch.randn(5, 9, 8, generator=torch.Generator().manual_seed(1))

    def run():
        for t in (u, delta, A, B, C, D, z):
            t.grad = None
        out = selective_scan_torch(u, delta, A, B, C, D, z, reverse=reverse)
        (out * weights).sum().backward()
        return [out.detach()] + [t.grad.clone() for t in (u, delta, A, B, C, D, z)]

    whole = run()
    monkeypatch.setattr(mod, "_SLICE_ELEMENTS", 8 * 4 * 2)  # forces chunks of 2 samples: 3 chunks
    assert len(mod._batch_chunks(5, A)) == 3
    chunked = run()
    assert not torch.equal(whole[0][:2], whole[0][2:4])  # distinct samples, so a chunk mix-up would show
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("gated", [False, True], ids=["nogate", "gate"])
def test_scan_backward_gradcheck(reverse, gated):
    u, delta, A, B, C, D, z = scan_inputs(2, 6, 4, 3, dtype=torch.float64, requires_grad=True)
    z = z if gated else None
    assert torch.autograd.gradcheck(lambda *a: _SelectiveScanFn.apply(*a, reverse), (u, delta, A, B, C, D, z))


def test_scan_backward_matches_autograd_of_reference():
    u, delta, A, B, C, D, z = scan_inputs(2, 11, 6, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 11, 6, dtype=torch.float64)
    (selective_scan_torch(u, delta, A, B, C, D, z, reverse=True) * weights).sum().backward()
    ours = [t.grad.clone() for t in (u, delta, A, B, C, D, z)]
    for t in (u, delta, A, B, C, D, z):
        t.grad = None
    (scan_reference(u, delta, A, B, C, D, z, True) * weights).sum().backward()
    for mine, theirs in zip(ours, (t.grad for t in (u, delta, A, B, C, D, z))):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_scan_low_precision_accumulates_in_fp32(dtype):
    u, delta, A, B, C, D, z = scan_inputs(2, 40, 16, 8)
    low = [t.to(dtype) for t in (u, delta, B, C, z)]
    out = selective_scan_torch(low[0], low[1], A, low[2], low[3], D, low[4])
    assert out.dtype == dtype
    ref = scan_reference(*(t.float() for t in low[:2]), A, *(t.float() for t in low[2:4]), D, low[4].float(), False)
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_scan_rejects_bad_shapes():
    u, delta, A, B, C, D, z = scan_inputs(2, 5, 4, 3)
    with pytest.raises(ValueError, match="delta must have the shape"):
        selective_scan(u, delta[:, :4], A, B, C, D)
    with pytest.raises(ValueError, match="A must have shape"):
        selective_scan(u, delta, A[:3], B, C, D)
    with pytest.raises(ValueError, match="unknown scan backend"):
        selective_scan(u, delta, A, B, C, D, backend="cuda")


@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "anticausal"])
@pytest.mark.parametrize("k", [2, 4])
def test_conv1d_matches_official_formulation(reverse, k):
    x = torch.randn(2, 13, 6, dtype=torch.float64)
    w = torch.randn(6, 1, k, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    xc = x.transpose(1, 2)
    if reverse:  # official backward branch: causal conv of the flipped sequence, flipped back
        ref = F.conv1d(xc.flip(-1), w, b, padding=k - 1, groups=6)[..., :13].flip(-1)
    else:
        ref = F.conv1d(xc, w, b, padding=k - 1, groups=6)[..., :13]
    out = causal_conv1d(x, w, b, reverse=reverse)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-12, atol=1e-12)
    out32 = causal_conv1d(x.float(), w.float(), b.float(), reverse=reverse)
    torch.testing.assert_close(out32.double(), ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_rms_norm_and_fused_add():
    x = torch.randn(3, 7, 10).to(torch.bfloat16)
    w = torch.randn(10)
    out = rms_norm(x, w, 1e-5)
    assert out.dtype == torch.bfloat16
    x64 = x.double()
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
    res = torch.randn(3, 7, 10)
    normed, new_res = add_rms_norm(x, res, w, 1e-5, residual_in_fp32=True)
    assert new_res.dtype == torch.float32 and normed.dtype == torch.bfloat16
    torch.testing.assert_close(new_res, res + x.float())
    normed0, res0 = add_rms_norm(x, None, w, 1e-5, residual_in_fp32=True)
    assert res0.dtype == torch.float32 and torch.equal(res0, x.float())
