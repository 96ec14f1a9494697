"""The fused CPU selective scan (``optimum_vim_kernels.cpu_scan``, numba) against the PyTorch scan and the references.

Stated tolerances: forward outputs within 1e-5 of the float64 loop and of the PyTorch scan (relative, and absolute
times the output's largest entry when that is above 1), whole-model fp32 logits within 1e-5; gradients within 1e-4 of the PyTorch scan's backward relative to their largest
entry (fp32 sums in another order). fp64 runs the PyTorch scan (gradcheck lives in test_ops.py). Results are
bit-identical for 1 and 2 threads and for calls from several Python threads at once.
"""

from __future__ import annotations

import concurrent.futures
import logging

import pytest
import torch
import torch.nn.functional as F
from optimum_vim_kernels import cpu, cpu_scan
from optimum_vim_kernels.reference import selective_scan_q_ref
from transformers import AutoModelForImageClassification

from optimum_vim.ops import selective_scan, selective_scan_torch
from optimum_vim.ops.dispatch import KernelUnsupportedError, use_kernels
from optimum_vim.ops.quantized import selective_scan_q
from tests.support.reference_vim import scan_inputs, scan_reference


def _close(out, ref):
    torch.testing.assert_close(out, ref.to(out.dtype) if out.dtype != ref.dtype else ref, rtol=1e-5,
                               atol=1e-5 * max(ref.abs().max().item(), 1.0))


pytestmark = pytest.mark.skipif(not cpu_scan.numba_available(), reason="numba is a dependency; not installed here")

# ragged channel blocks (E not a multiple of the 64 / 32 channel blocks), both state sizes of the models
SHAPES = [(1, 1, 3, 2), (2, 17, 70, 8), (3, 50, 16, 16), (2, 9, 130, 4)]


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("gated", [False, True], ids=["nogate", "gate"])
@pytest.mark.parametrize("skip", [False, True], ids=["noD", "D"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_float64_loop_and_torch_scan(shape, reverse, gated, skip):
    u, delta, A, B, C, D, z = scan_inputs(*shape)
    z, D = (z if gated else None), (D if skip else None)
    out = cpu_scan.selective_scan(u, delta, A, B, C, D, z, reverse)
    assert out.dtype == torch.float32 and out.shape == u.shape
    ref = scan_reference(u, delta, A, B, C, D if D is not None else torch.zeros_like(u[0, 0]), z, reverse)
    _close(out.double(), ref)
    _close(out, selective_scan_torch(u, delta, A, B, C, D, z, reverse))


def test_exp_is_accurate_and_keeps_nan_inf_semantics():
    """The polynomial exp inside the kernel: within 2 ulp of exp over the range the scan uses, NaN stays NaN, 0 below
    e^-87 (no denormals), inf above e^88.5."""
    import numba
    import numpy as np

    @numba.njit
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = cpu_scan._exp(x[i])

    x = np.linspace(-86.9, 88.0, 400_001, dtype=np.float32)
    got = np.empty_like(x)
    apply(x, got)
    want = np.exp(x.astype(np.float64))
    ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
    assert np.abs(got - want).max() <= 2 * ulp.max() and (np.abs(got - want) / ulp).max() <= 2
    special = np.array([np.nan, -np.inf, -100.0, -87.5, np.inf, 0.0], dtype=np.float32)
    out = np.empty_like(special)
    apply(special, out)
    assert np.isnan(out[0]) and out[1] == 0 and out[2] == 0 and out[3] == 0 and np.isinf(out[4]) and out[5] == 1


def _codes(b, length, e, n, per_step, seed=3):
    g = torch.Generator().manual_seed(seed)
    codes = {k: torch.randint(-128, 128, (b, length, w), generator=g, dtype=torch.int8)
             for k, w in (("u", e), ("delta", e), ("B", n), ("C", n))}
    steps = length if per_step else 1
    scales = {f"{k}_scale": torch.rand(steps, generator=g) * 0.05 + 0.01 for k in codes}
    scales["delta_zero"] = torch.randint(-128, -100, (steps,), generator=g, dtype=torch.int32)
    return codes, scales


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("per_step", [True, False], ids=["per-step-scales", "one-scale"])
def test_int8_codes_match_the_reference(reverse, per_step):
    b, length, e, n = 3, 11, 70, 8
    codes, scales = _codes(b, length, e, n, per_step)
    _, _, A, _, _, D, z = scan_inputs(b, length, e, n)
    args = (codes["u"], codes["delta"], A, codes["B"], codes["C"], D, z)
    ref = selective_scan_q_ref(*args, reverse=reverse, **scales)
    out = cpu_scan.selective_scan_q(*args, reverse=reverse, **scales)
    _close(out, ref)
    # codes and floats mixed (u, B float), delta bias + softplus as mamba-ssm's kernel takes them
    floats = {"u": codes["u"].float() * scales["u_scale"].reshape(1, -1, 1),
              "B": codes["B"].float() * scales["B_scale"].reshape(1, -1, 1)}
    mixed = dict(delta_scale=scales["delta_scale"], delta_zero=scales["delta_zero"], C_scale=scales["C_scale"],
                 delta_bias=torch.randn(e) - 3, delta_softplus=True, reverse=reverse)
    margs = (floats["u"], codes["delta"], A, floats["B"], codes["C"], D, z)
    _close(cpu_scan.selective_scan_q(*margs, **mixed), selective_scan_q_ref(*margs, **mixed))
    with pytest.raises(TypeError, match="no u_scale"):
        cpu_scan.selective_scan_q(codes["u"], codes["delta"], A, codes["B"], codes["C"], delta_scale=scales["delta_scale"])


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("channel_scale", [False, True], ids=["per-step", "per-step-x-channel"])
def test_8bit_state_matches_the_reference(reverse, channel_scale):
    """h <- clamp(rint(h / s), qmin, qmax) * s after every step, s = h_scale[t] * h_channel_scale[e]; the output of
    a step reads the unquantized state. Scales coarse enough that the requantization changes the output."""
    b, length, e, n = 2, 13, 40, 8
    u, delta, A, B, C, D, _ = scan_inputs(b, length, e, n)
    g = torch.Generator().manual_seed(5)
    h_scale = torch.rand(length, generator=g) * 0.05 + 0.02
    kw = dict(h_scale=h_scale, h_channel_scale=torch.rand(e, generator=g) + 0.5 if channel_scale else None,
              h_qmin=-100, h_qmax=100, reverse=reverse)
    ref = selective_scan_q_ref(u, delta, A, B, C, D, **kw)
    out = cpu_scan.selective_scan_q(u, delta, A, B, C, D, **kw)
    # a state one rounding step apart (an fp32 tie broken the other way) moves an output by at most ~|C| * s
    close = torch.isclose(out, ref, rtol=1e-5, atol=1e-5)
    assert close.float().mean() > 0.995
    assert (out - ref).abs().max() < 5 * h_scale.max() * C.abs().max()
    unquantized = selective_scan_q_ref(u, delta, A, B, C, D, reverse=reverse)
    assert (unquantized - ref).abs().max() > 1e-2  # the state quantization is visible, and the kernel follows it


def _grads(fn, inputs, weights):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    (out * weights).sum().backward()
    return [out.detach()] + [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("gated", [False, True], ids=["nogate", "gate"])
@pytest.mark.parametrize("shape", [(2, 17, 70, 8), (3, 9, 16, 16), (1, 1, 3, 2)], ids=lambda s: "x".join(map(str, s)))
def test_backward_matches_the_torch_scan(shape, reverse, gated):
    u, delta, A, B, C, D, z = scan_inputs(*shape)
    inputs = (u, delta, A, B, C, D, z if gated else None)
    weights = torch.randn(shape[0], shape[1], shape[2], generator=torch.Generator().manual_seed(7))
    ours = _grads(lambda *a: cpu_scan.selective_scan(*a, reverse), inputs, weights)
    theirs = _grads(lambda *a: selective_scan_torch(*a, reverse=reverse), inputs, weights)
    for name, a, b in zip(["out", "u", "delta", "A", "B", "C", "D", "z"], ours, theirs):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(b.abs().max().item(), 1.0), msg=name)


def test_backward_without_D_and_fp16_inputs():
    u, delta, A, B, C, _, z = scan_inputs(2, 8, 24, 4)
    weights = torch.randn(2, 8, 24)
    ours = _grads(lambda *a: cpu_scan.selective_scan(*a), (u, delta, A, B, C, None, z), weights)
    theirs = _grads(lambda *a: selective_scan_torch(*a), (u, delta, A, B, C, None, z), weights)
    assert ours[6] is None and theirs[6] is None
    for a, b in zip(ours, theirs):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(b.abs().max().item(), 1.0))
    half = [t.half() for t in (u, delta, B, C)]
    out = cpu_scan.selective_scan(half[0], half[1], A, half[2], half[3])
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, selective_scan_torch(half[0], half[1], A, half[2], half[3]), rtol=1e-2, atol=1e-2)


def _with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def test_bit_identical_for_1_and_2_threads_forward_and_backward():
    """Large enough that the 2-thread run really splits the tasks (more than the serial threshold)."""
    u, delta, A, B, C, D, z = scan_inputs(16, 30, 200, 8)
    assert 16 * 30 * 200 * 8 >= cpu_scan._MIN_PARALLEL_WORK
    weights = torch.randn(16, 30, 200)

    def run():
        return _grads(lambda *a: cpu_scan.selective_scan(*a, True), (u, delta, A, B, C, D, z), weights)

    one, two = _with_threads(1, run), _with_threads(2, run)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    codes, scales = _codes(16, 30, 200, 8, per_step=True)
    q = lambda: cpu_scan.selective_scan_q(codes["u"], codes["delta"], A, codes["B"], codes["C"], D, z,  # noqa: E731
                                          h_scale=torch.full((30,), 0.05), **scales)
    assert torch.equal(_with_threads(1, q), _with_threads(2, q))


def test_calls_from_several_python_threads_at_once():
    u, delta, A, B, C, D, z = scan_inputs(8, 40, 130, 8)
    expected = _with_threads(1, lambda: cpu_scan.selective_scan(u, delta, A, B, C, D, z))

    def call(i):
        return cpu_scan.selective_scan(u, delta, A, B, C, D, z, False)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(8)))
    assert all(torch.equal(r, expected) for r in results)


def test_dispatch_policies_and_backends(count_calls):
    u, delta, A, B, C, D, z = scan_inputs(2, 7, 12, 4)
    calls = count_calls(cpu, "selective_scan")
    auto = selective_scan(u, delta, A, B, C, D, z)
    assert calls["n"] == 1
    with use_kernels("reference"):
        ref = selective_scan(u, delta, A, B, C, D, z)
    assert calls["n"] == 1 and torch.equal(ref, selective_scan_torch(u, delta, A, B, C, D, z))
    assert torch.equal(selective_scan(u, delta, A, B, C, D, z, backend="torch"), ref)
    assert torch.equal(selective_scan(u, delta, A, B, C, D, z, backend="cpu"), auto)
    torch.testing.assert_close(auto, ref, rtol=1e-5, atol=1e-5)
    # fp64 runs the PyTorch scan under auto, and a forced fused scan says why it cannot
    u64 = [t.double() for t in (u, delta, A, B, C, D, z)]
    assert torch.equal(selective_scan(*u64), selective_scan_torch(*u64)) and calls["n"] == 2
    with pytest.raises(KernelUnsupportedError, match="float64"):
        selective_scan(*u64, backend="cpu")
    q_calls = count_calls(cpu, "selective_scan_q")
    codes, scales = _codes(2, 7, 12, 4, per_step=True)
    selective_scan_q(codes["u"], codes["delta"], A, codes["B"], codes["C"], D, z, **scales)
    assert q_calls["n"] == 1


def test_without_numba_the_torch_scan_runs_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(cpu_scan, "_IMPORT_ERROR", "ModuleNotFoundError: No module named 'numba'")
    monkeypatch.setattr(cpu_scan, "_warned", False)
    u, delta, A, B, C, D, z = scan_inputs(2, 7, 12, 4)
    with caplog.at_level(logging.WARNING, logger="optimum_vim_kernels.cpu_scan"):
        first = selective_scan(u, delta, A, B, C, D, z)
        selective_scan(u, delta, A, B, C, D, z)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pip install numba" in warnings[0].getMessage()
    assert torch.equal(first, selective_scan_torch(u, delta, A, B, C, D, z))
    with pytest.raises(KernelUnsupportedError, match="numba"):
        selective_scan(u, delta, A, B, C, D, z, backend="cpu")


def test_fixture_logits_within_1e5_of_the_torch_scan(fixture_dir):
    model = AutoModelForImageClassification.from_pretrained(fixture_dir).eval()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = model(x).logits
        with use_kernels("reference"):
            ref = model(x).logits
    assert not torch.equal(fused, ref)  # the fused scan really ran
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


def test_softplus_inputs_of_the_model_are_within_tolerance():
    """delta as the model produces it (softplus of a linear output) over the fixture's widths and 50 tokens."""
    u, _, A, B, C, D, z = scan_inputs(4, 50, 128, 8)
    delta = F.softplus(torch.randn(4, 50, 128) - 4)
    torch.testing.assert_close(cpu_scan.selective_scan(u, delta, A, B, C, D, z),
                               selective_scan_torch(u, delta, A, B, C, D, z), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "anticausal"])
@pytest.mark.parametrize("shape,k", [((2, 13, 70), 4), ((3, 50, 128), 4), ((1, 3, 5), 2), ((2, 2, 9), 4)],
                         ids=["ragged", "fixture", "short", "shorter-than-taps"])
def test_fused_conv1d_matches_the_torch_conv(shape, k, reverse, count_calls):
    from optimum_vim.ops import causal_conv1d
    from optimum_vim.ops.conv import causal_conv1d_torch

    g = torch.Generator().manual_seed(k + shape[1])
    x, w, bias = torch.randn(*shape, generator=g), torch.randn(shape[2], 1, k, generator=g), torch.randn(shape[2])
    calls = count_calls(cpu, "causal_conv1d")
    out = causal_conv1d(x, w, bias, reverse=reverse)
    assert calls["n"] == 1
    ref = causal_conv1d_torch(x, w.reshape(shape[2], k), bias, reverse)
    _close(out, ref)
    with use_kernels("reference"):
        assert torch.equal(causal_conv1d(x, w, bias, reverse=reverse), ref)
    x.requires_grad_()
    assert causal_conv1d(x, w, None, reverse=reverse).requires_grad and calls["n"] == 1  # autograd: the torch conv


@pytest.mark.parametrize("policy", ["auto", "cpu"])
def test_conv_with_autograd_runs_the_pytorch_conv_under_every_cpu_policy(policy):
    """The fused conv has no backward: with a gradient to compute, even the forced ``cpu`` policy takes the PyTorch
    conv (fine-tuning under OPTIMUM_VIM_KERNELS=cpu raised KernelUnsupportedError before)."""
    from optimum_vim.ops.conv import causal_conv1d, causal_conv1d_torch
    from optimum_vim.ops.dispatch import use_kernels

    x = torch.randn(2, 5, 4, requires_grad=True)
    w = torch.randn(4, 3)
    with use_kernels(policy):
        y = causal_conv1d(x, w)
    y.sum().backward()
    assert y.grad_fn is not None and x.grad is not None
    assert torch.equal(y, causal_conv1d_torch(x, w))
