"""Triton selective scan (both directions, int8 inputs, 8-bit carried state) and the direction combine, against
their PyTorch references (interpreted on CPU, compiled on GPU), and the references against float64 re-statements.

Interpreter budget: every launch is one program per sample (or a handful), L <= 13, batch <= 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from optimum_vim_kernels import reference, scan

from tests.support.reference_vim import scan_loop_f64

# Tolerances, defined once: max |out - ref| / max |ref|.
#   fp32: kernel and reference run the same fp32 recurrence; they differ by exp2(dt * A * log2 e) vs exp(dt * A),
#         the order of the N-sum and FMA contraction on GPU.
#   fp16: fp16 inputs are upcast exactly, but fp16 *output* rounds (2^-11 relative).
TOL = {"fp32": 1e-5, "fp16": 2e-3}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
E, N, LEN = 40, 8, 11  # 40 channels, 8 states, 11 tokens: one interpreted program per sample


def _rel_err(out, ref):
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


def _close(out, ref, kind="fp32"):
    err = _rel_err(out, ref)
    assert err < TOL[kind], f"relative error {err:.3g} above {kind} tolerance {TOL[kind]}"


def _inputs(b=2, length=LEN, e=E, n=N, seed=0):
    """Float scan inputs: u, delta (pre-softplus), z (b, L, E); B, C (b, L, N); A (E, N) < 0; D (E,); bias (E,)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, length, e, generator=g)
    delta = torch.randn(b, length, e, generator=g) * 0.5 - 1.0
    A = -torch.exp(torch.randn(e, n, generator=g) * 0.5)
    B, C = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g)
    D, z, bias = torch.randn(e, generator=g), torch.randn(b, length, e, generator=g), torch.randn(e, generator=g) * 0.3
    return u, delta, A, B, C, D, z, bias


def _to_dev(x):
    return x.to(DEVICE) if torch.is_tensor(x) else x


def _kernel(*args, **kw):
    """scan.selective_scan_q on DEVICE, result back on the CPU."""
    return scan.selective_scan_q(*(_to_dev(a) for a in args), **{k: _to_dev(v) for k, v in kw.items()}).cpu()


def _quantize(x, scale):
    """int8 codes of x with a per-token-position (L,) or per-tensor (1,) scale (the layout the kernel reads)."""
    s = scale.reshape(1, -1, 1) if scale.numel() > 1 else scale
    return torch.round(x / s).clamp(-128, 127).to(torch.int8)


def _official_f64(u, delta, A, B, C, D, z, reverse):
    """Vim's formulation in float64: channel-first tensors, the backward direction as flip -> forward scan -> flip."""
    tr = lambda t: None if t is None else t.transpose(1, 2)  # noqa: E731
    flip = lambda t: None if t is None else (t.flip(-1) if reverse else t)  # noqa: E731
    y = scan_loop_f64(flip(tr(u)), flip(tr(delta)), A, flip(tr(B)), flip(tr(C)), D, flip(tr(z)))
    return tr(flip(y))


# ---------------------------------------------------------------------------------------------------------------
# the references themselves
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_reference_matches_float64(reverse):
    u, delta, A, B, C, D, z, bias = _inputs()
    ref = reference.selective_scan_q_ref(u, delta, A, B, C, D, z, delta_bias=bias, delta_softplus=True, reverse=reverse)
    dt = F.softplus(delta.double() + bias.double())
    _close(ref, _official_f64(u, dt, A, B, C, D, z, reverse))
    # int8 inputs: the reference dequantizes per *token position* (also when scanning backwards)
    s = torch.rand(LEN) * 0.02 + 0.01
    zero = torch.randint(-20, 20, (LEN,), dtype=torch.int32)
    uq, Bq, Cq = _quantize(u, s), _quantize(B, s), _quantize(C, s)
    dq = (torch.round(delta / s.reshape(1, -1, 1)) + zero.reshape(1, -1, 1)).clamp(-128, 127).to(torch.int8)
    ref_q = reference.selective_scan_q_ref(uq, dq, A, Bq, Cq, D, z, u_scale=s, delta_scale=s, delta_zero=zero,
                                           B_scale=s, C_scale=s, delta_softplus=True, reverse=reverse)
    deq = lambda q: q.double() * s.double().reshape(1, -1, 1)  # noqa: E731
    dt_q = F.softplus((dq.double() - zero.double().reshape(1, -1, 1)) * s.double().reshape(1, -1, 1))
    _close(ref_q, _official_f64(deq(uq), dt_q, A, deq(Bq), deq(Cq), D, z, reverse))


def test_reference_combine_matches_float64():
    g = torch.Generator().manual_seed(3)
    yf, yb, z = (torch.randn(2, 5, 8, generator=g) for _ in range(3))
    want = (yf.double() + yb.double()) / 2 * F.silu(z.double())
    _close(reference.combine_directions_ref(yf, yb, z), want)


# ---------------------------------------------------------------------------------------------------------------
# float inputs
FLOAT_CASES = {
    "bare": dict(),
    "skip": dict(D=True),
    "skip-gate-softplus": dict(D=True, z=True, softplus=True),
}


@pytest.mark.parametrize("case", list(FLOAT_CASES), ids=list(FLOAT_CASES))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_float_inputs(case, reverse):
    u, delta, A, B, C, D, z, bias = _inputs()
    opts = FLOAT_CASES[case]
    D, z = (D if opts.get("D") else None), (z if opts.get("z") else None)
    if opts.get("softplus"):
        kw = dict(delta_bias=bias, delta_softplus=True)
    else:
        kw, delta = {}, F.softplus(delta)  # delta must be positive without the fused softplus
    kw["reverse"] = reverse
    _close(_kernel(u, delta, A, B, C, D, z, **kw), reference.selective_scan_q_ref(u, delta, A, B, C, D, z, **kw))


def test_softplus_extremes():
    """delta + bias far below 0, where softplus(x) ~ exp(x) needs an accurate log1p (log(1 + exp(x)) would round
    to 0 or to a multiple of 2^-23), and above the threshold 20 (identity)."""
    u, delta, A, B, C, _, _, _ = _inputs(b=1)
    delta[..., :20] = delta[..., :20] * 2 - 14  # x ~ -17 .. -11: exp(x) below fp32's 1-ulp of 1
    delta[..., 20:] += 22
    kw = dict(delta_softplus=True)
    ref = reference.selective_scan_q_ref(u, delta, A, B, C, **kw)
    out = _kernel(u, delta, A, B, C, **kw)
    _close(out[..., :20], ref[..., :20])  # tiny outputs (~1e-6), each block relative to its own size
    _close(out[..., 20:], ref[..., 20:])


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_fp16_inputs_and_output(reverse):
    u, delta, A, B, C, D, z, bias = _inputs()
    h = [t.half() for t in (u, delta, B, C, z)]
    kw = dict(delta_bias=bias, delta_softplus=True, reverse=reverse)
    out = _kernel(h[0], h[1], A, h[2], h[3], D, h[4], out_dtype=torch.float16, **kw)
    assert out.dtype == torch.float16
    _close(out, reference.selective_scan_q_ref(h[0], h[1], A, h[2], h[3], D, h[4], **kw), "fp16")


def test_bf16_inputs_are_upcast():
    """bf16 loads are upcast before any arithmetic (the interpreter computes wrongly on raw bf16), fp32 output."""
    u, delta, A, B, C, D, z, bias = _inputs()
    bf = [t.bfloat16() for t in (u, delta, B, C, z)]
    kw = dict(delta_bias=bias, delta_softplus=True)
    _close(_kernel(bf[0], bf[1], A, bf[2], bf[3], D, bf[4], **kw),
           reference.selective_scan_q_ref(bf[0], bf[1], A, bf[2], bf[3], D, bf[4], **kw))


def test_strided_B_C_and_masked_channel_tail():
    """B and C as column slices of x_proj's output (no copy), 37 channels in blocks of 16 (tail of 5)."""
    u, delta, A, B, C, D, z, bias = _inputs(e=37)
    x_dbl = torch.cat([torch.randn(2, LEN, 3), B, C], -1)  # (b, L, dt_rank + 2N), as Vim's x_proj emits
    Bs, Cs = x_dbl[..., 3:3 + N], x_dbl[..., 3 + N:]
    assert not Bs.is_contiguous()
    for reverse in (False, True):
        kw = dict(delta_bias=bias, delta_softplus=True, reverse=reverse)
        _close(_kernel(u, delta, A, Bs, Cs, D, z, **kw, config=(16, 1)),
               reference.selective_scan_q_ref(u, delta, A, B, C, D, z, **kw))


EDGE_SHAPES = {"one-token-one-state": (1, 1, 3, 1), "one-channel": (1, 2, 1, 2), "n32": (1, 5, 17, 32)}


@pytest.mark.parametrize("shape", list(EDGE_SHAPES.values()), ids=list(EDGE_SHAPES))
def test_edge_shapes(shape):
    """L = 1 (nothing to prefetch), a single channel, N = 1 and 32; both directions, with a quantized state."""
    b, length, e, n = shape
    u, delta, A, B, C, D, z, bias = _inputs(b, length, e, n)
    for reverse in (False, True):
        kw = dict(delta_bias=bias, delta_softplus=True, reverse=reverse, h_scale=torch.full((length,), 0.01))
        _close(_kernel(u, delta, A, B, C, D, z, **kw), reference.selective_scan_q_ref(u, delta, A, B, C, D, z, **kw))


# ---------------------------------------------------------------------------------------------------------------
# int8 inputs
def _int8_inputs(per_token, seed=5):
    u, delta, A, B, C, D, z, bias = _inputs(e=37, seed=seed)  # 37 channels: a masked tail in the 64-wide block
    g = torch.Generator().manual_seed(seed + 1)
    scale = (lambda k: torch.rand(LEN, generator=g) * k + k) if per_token else (lambda k: torch.tensor([1.5 * k]))
    su, sd, sb, sc = scale(0.02), scale(0.01), scale(0.02), scale(0.02)
    zero = torch.randint(-30, 30, (LEN if per_token else 1,), dtype=torch.int32, generator=g)
    dq = (torch.round(delta / (sd.reshape(1, -1, 1) if per_token else sd)) + (zero.reshape(1, -1, 1) if per_token else zero))
    codes = dict(u=_quantize(u, su), delta=dq.clamp(-128, 127).to(torch.int8), B=_quantize(B, sb), C=_quantize(C, sc))
    kw = dict(u_scale=su, delta_scale=sd, delta_zero=zero, B_scale=sb, C_scale=sc, delta_bias=bias, delta_softplus=True)
    return codes, A, D, z, kw


@pytest.mark.parametrize("per_token", [False, True], ids=["tensor-scale", "token-scales"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_int8_inputs_affine_delta(per_token, reverse):
    q, A, D, z, kw = _int8_inputs(per_token)
    kw["reverse"] = reverse
    ref = reference.selective_scan_q_ref(q["u"], q["delta"], A, q["B"], q["C"], D, z, **kw)
    _close(_kernel(q["u"], q["delta"], A, q["B"], q["C"], D, z, **kw), ref)


def test_int8_mixed_granularity_and_float_inputs():
    """Per-token delta scale with a per-tensor zero point (expanded by the launcher); float C beside int8 codes;
    no D, no gate, no softplus."""
    q, A, D, z, kw = _int8_inputs(per_token=True)
    kw.update(delta_zero=torch.tensor([-7], dtype=torch.int32), delta_softplus=False, delta_bias=None)
    kw.pop("C_scale")
    C = torch.randn(q["C"].shape)
    q["delta"] = q["delta"].abs()  # without softplus delta must be >= 0: codes >= 0 > zero point
    ref = reference.selective_scan_q_ref(q["u"], q["delta"], A, q["B"], C, **kw)
    _close(_kernel(q["u"], q["delta"], A, q["B"], C, **kw), ref)


# ---------------------------------------------------------------------------------------------------------------
# per-step state re-quantization
STATE_CASES = {
    "step-scale": dict(channel=False, qmin=-128, qmax=127),
    "step-x-channel-scale": dict(channel=True, qmin=-128, qmax=127),
    "int4-clamped": dict(channel=True, qmin=-8, qmax=7),  # codes saturate: clamping is exercised
}


@pytest.mark.parametrize("case", list(STATE_CASES), ids=list(STATE_CASES))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_state_requantized_every_step(case, reverse):
    opts = STATE_CASES[case]
    q, A, D, z, kw = _int8_inputs(per_token=True, seed=11)
    g = torch.Generator().manual_seed(2)
    h_scale = torch.rand(LEN, generator=g) * 0.01 + 0.01
    hc = torch.rand(37, generator=g) + 0.5 if opts["channel"] else None
    kw.update(reverse=reverse, h_scale=h_scale, h_channel_scale=hc, h_qmin=opts["qmin"], h_qmax=opts["qmax"])
    args = (q["u"], q["delta"], A, q["B"], q["C"], D, z)
    ref = reference.selective_scan_q_ref(*args, **kw)
    out = _kernel(*args, **kw)
    free = reference.selective_scan_q_ref(*args, **{k: v for k, v in kw.items() if not k.startswith("h_")})
    effect = _rel_err(ref, free)
    assert effect > 1e-2, "the state quantization must visibly change the output"
    # Identical state codes give fp32-level agreement. A code can flip where h / s lies within an ulp of a
    # half-integer (the fp32 states differ in the last bits: exp2 vs exp); that moves h by one step s in one
    # (channel, state), so allow a few such flips (far below the effect of quantizing the state at all).
    err = (out.double() - ref.double()).abs()
    loose = err > TOL["fp32"] * ref.abs().max()
    assert loose.float().mean() < 0.02, f"{int(loose.sum())} outputs off by more than fp32 rounding"
    assert _rel_err(out, ref) < 0.05 * effect


def test_state_scale_broadcast_and_bad_range():
    q, A, D, z, kw = _int8_inputs(per_token=False)
    args = (q["u"], q["delta"], A, q["B"], q["C"], D, z)
    one = torch.tensor([0.02])
    ref = reference.selective_scan_q_ref(*args, **kw, h_scale=one.expand(LEN))
    torch.testing.assert_close(reference.selective_scan_q_ref(*args, **kw, h_scale=one), ref, rtol=0, atol=0)
    _close(_kernel(*args, **kw, h_scale=one), ref)  # a single h_scale value stands for every step
    with pytest.raises(ValueError, match="code range"):
        scan.selective_scan_q(*args, **kw, h_scale=one, h_qmin=-1 << 23, h_qmax=1 << 23)


# ---------------------------------------------------------------------------------------------------------------
# combine
def _combine_inputs(seed=4):
    g = torch.Generator().manual_seed(seed)
    yf, yb, z = (torch.randn(2, 13, 24, generator=g) for _ in range(3))
    # exact rounding ties in the first token: (yf + yb) / 2 / s = k + 1/2 with s = 1/16 (checks half-to-even)
    halves = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.5] * 3)
    yf[:, 0], yb[:, 0] = halves / 16, halves / 16
    return yf, yb, z


@pytest.mark.parametrize("divide", [True, False], ids=["div2", "sum"])
@pytest.mark.parametrize("gated", [True, False], ids=["gate", "no-gate"])
def test_combine_float(divide, gated):
    yf, yb, z = _combine_inputs()
    zz = z if gated else None
    ref = reference.combine_directions_ref(yf, yb, zz, divide=divide)
    out = scan.combine_directions(*(_to_dev(t) for t in (yf, yb, zz)), divide=divide).cpu()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    h = scan.combine_directions(*(_to_dev(t.half()) if t is not None else None for t in (yf, yb, zz)), divide=divide)
    assert h.dtype == torch.float16  # default out dtype: y_f's
    _close(h.cpu(), reference.combine_directions_ref(yf.half(), yb.half(), zz.half() if gated else None, divide=divide), "fp16")


@pytest.mark.parametrize("per_token", [True, False], ids=["token-scales", "tensor-scale"])
@pytest.mark.parametrize("gated", [True, False], ids=["gate", "no-gate"])
def test_combine_int8_out(per_token, gated):
    yf, yb, z = _combine_inputs()
    zz = z if gated else None
    g = torch.Generator().manual_seed(8)
    s = torch.rand(13, generator=g) * 0.05 + 0.01 if per_token else torch.tensor([0.0])
    s[0] = 1 / 16  # the scale of the tie token (per tensor: of all)
    ref = reference.combine_directions_ref(yf, yb, zz, out_scale=s)
    out = scan.combine_directions(*(_to_dev(t) for t in (yf, yb, zz)), out_scale=_to_dev(s)).cpu()
    assert out.dtype == torch.int8
    if not gated:
        # add, * 0.5 and an IEEE division are exactly the reference's fp32 ops: bit-identical codes, ties included
        assert torch.equal(out, ref)
        return
    # with the gate, SiLU's exp may differ from torch's by an ulp; codes can then differ only where y / s sits
    # within a few ulp of a half-integer (a rounding tie), and by one
    q_float = reference.combine_directions_ref(yf, yb, zz) / (s.reshape(1, -1, 1) if per_token else s)
    near_tie = ((q_float - q_float.floor()) - 0.5).abs() < 1e-5 * q_float.abs().clamp(min=1)
    diff = out.int() != ref.int()
    assert not (diff & ~near_tie).any()
    assert (out.int() - ref.int()).abs().max() <= 1


@pytest.mark.parametrize("qmin,qmax", [(-127, 127), (-7, 7)], ids=["int8-narrow", "int4"])
def test_combine_code_range(qmin, qmax):
    """The fused combine clamps to the consumer's code range (narrow int8, 4-bit activations)."""
    yf, yb, _ = _combine_inputs()
    yf[:, 1, :2], yb[:, 1, :2] = torch.tensor([50.0, -50.0]), torch.tensor([50.0, -50.0])  # far outside the range
    s = torch.tensor([1 / 16])
    ref = reference.combine_directions_ref(yf, yb, None, out_scale=s, qmin=qmin, qmax=qmax)
    assert int(ref.min()) == qmin and int(ref.max()) == qmax  # the inputs do reach both ends of the range
    out = scan.combine_directions(*(_to_dev(t) for t in (yf, yb)), None, out_scale=_to_dev(s), qmin=qmin, qmax=qmax)
    assert torch.equal(out.cpu(), ref)
    with pytest.raises(ValueError, match="inside int8"):
        scan.combine_directions(yf, yb, None, out_scale=s, qmin=-129, qmax=127)


# ---------------------------------------------------------------------------------------------------------------
# support checks and refusals
def test_supports_and_refusals():
    assert scan.supports_selective_scan_q(length=197, d_state=16, state_quant=True) is None
    assert "power of two" in scan.supports_selective_scan_q(length=10, d_state=12, state_quant=False)
    assert "> 256" in scan.supports_selective_scan_q(length=10, d_state=512, state_quant=False)
    assert "empty" in scan.supports_selective_scan_q(length=0, d_state=16, state_quant=False)
    assert scan.supports_combine_directions(shape=(2, 197, 768)) is None
    assert "(batch, L, E)" in scan.supports_combine_directions(shape=(394, 768))
    assert "out_scale" in scan.supports_combine_directions(shape=(2, 197, 768), out_scale_numel=3)
    u, delta, A, B, C, D, z, _ = _inputs(b=1)
    with pytest.raises(ValueError, match="power of two"):
        scan.selective_scan_q(u, delta, A[:, :6], B[..., :6], C[..., :6])
    with pytest.raises(ValueError, match="needs u_scale"):
        scan.selective_scan_q(u.to(torch.int8), delta, A, B, C)
    with pytest.raises(ValueError, match="L = 11 or 1"):
        scan.selective_scan_q(u.to(torch.int8), delta, A, B, C, u_scale=torch.ones(3))


# ---------------------------------------------------------------------------------------------------------------
# ahead-of-time compilation for sm_90 (no GPU needed: the Triton wheel ships ptxas and cuobjdump)
_AOT_SCRIPT = textwrap.dedent(
    r"""
    import json, os, re, subprocess, sys, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from optimum_vim_kernels import scan

    CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def signature(fn, ptrs, consts):
        # every argument named: pointers typed, constexprs marked (values go in ASTSource's constexprs), the rest
        # int32 scalars except the float state-code bounds
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = ptrs.get(name, "*fp32")
            else:
                sig[name] = "fp32" if name in ("h_qmin", "h_qmax") else "i32"
        return sig

    def resources(cubin):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        get = lambda key: int(m.group(1)) if (m := re.search(key + r":(\d+)", out)) else None
        return get("REG"), get("STACK"), get("LOCAL")

    variants = []
    for reverse in (False, True):
        for dtype in ("fp16", "int8"):
            for hq in ("none", "step", "step-x-channel"):
                is_int = dtype == "int8"
                ptrs = {"dz_ptr": "*i32"}
                for p in ("u_ptr", "d_ptr", "b_ptr", "c_ptr"):
                    ptrs[p] = "*i8" if is_int else "*fp16"
                ptrs.update(z_ptr="*fp16", y_ptr="*fp16")
                consts = dict(N=16, BLOCK_E=64, REVERSE=reverse, U_INT=is_int, U_TOK=is_int, D_INT=is_int,
                              D_TOK=is_int, D_ZERO=is_int, B_INT=is_int, B_TOK=False, C_INT=is_int, C_TOK=is_int,
                              HAS_DBIAS=True, SOFTPLUS=True, HAS_D=True, HAS_Z=True, HQ=hq != "none",
                              HQ_CH=hq == "step-x-channel")
                name = f"scan {'rev' if reverse else 'fwd'} {dtype} state:{hq}"
                variants.append((name, scan._scan_kernel, ptrs, consts, 4))
    # bf16 activations, and the launcher's smaller blocks for small batches
    bf = {p: "*bf16" for p in ("u_ptr", "d_ptr", "b_ptr", "c_ptr", "z_ptr")}
    base = dict(variants[0][3])
    variants.append(("scan fwd bf16 state:none", scan._scan_kernel, {**bf, "y_ptr": "*fp32"}, base, 4))
    for block_e, warps in ((32, 2), (16, 1)):
        variants.append((f"scan fwd fp16 BLOCK_E={block_e}", scan._scan_kernel, variants[0][2],
                         {**base, "BLOCK_E": block_e}, warps))
    cptrs = {"yf_ptr": "*fp16", "yb_ptr": "*fp16", "z_ptr": "*fp16", "os_ptr": "*fp32"}
    for requant, tok in ((True, True), (True, False), (False, False)):
        consts = dict(DIVIDE=True, HAS_Z=True, REQUANT=requant, OS_TOK=tok, BLOCK=1024)
        name = f"combine {'int8-out ' + ('token-scales' if tok else 'tensor-scale') if requant else 'fp16-out'}"
        variants.append((name, scan._combine_kernel, {**cptrs, "out_ptr": "*i8" if requant else "*fp16"}, consts, 4))

    rows = []
    for name, fn, ptrs, consts, warps in variants:
        k = triton.compile(ASTSource(fn, signature(fn, ptrs, consts), consts), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps})
        regs, stack, local = resources(k.asm["cubin"])
        ptx = k.asm["ptx"]
        rows.append(dict(name=name, cubin=len(k.asm["cubin"]), shared=k.metadata.shared, regs=regs, stack=stack,
                         local=local, div_rn="div.rn.f32" in ptx))
    print(json.dumps(rows))
    """
)


@pytest.mark.aot
def test_aot_compile_sm90():
    """Every scan / combine variant compiles for sm_90: a cubin, shared memory within H100's 227 KiB, no spills,
    and IEEE division wherever values are requantized (matches torch.round(x / s) quotients bit for bit)."""
    nvidia = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(nvidia, "ptxas")):
        pytest.skip(f"no ptxas in the triton wheel ({nvidia}): the NVIDIA backend cannot compile here")
    # TRITON_INTERPRET=1 turns @triton.jit into the interpreter: compile in a fresh process without it
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the GPU default (FMA contraction); also silences Triton 3.9's warning
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 12 + 3 + 3
    for r in rows:
        assert r["cubin"] > 0, r
        assert r["shared"] <= 227 * 1024, r
        if r["stack"] is not None:  # cuobjdump present: no register spills (STACK / LOCAL bytes)
            assert r["stack"] == 0 and not r["local"], r
        requantizes = "state:step" in r["name"] or "int8-out" in r["name"]
        assert r["div_rn"] == requantizes, r
