"""Triton selective scan for both Vim directions, with int8 inputs and an optional 8-bit carried state, and the
fused combine of the two directions ahead of out_proj.

``selective_scan_q`` is the twin of :func:`optimum_vim_kernels.reference.selective_scan_q_ref`: one program per
(sample, channel block) walks the tokens sequentially with the fp32 state ``[BLOCK_E, N]`` in registers.
``REVERSE`` is a compile-time flag (t runs L-1 .. 0), so Vim's backward direction needs no flipped copies.
Fused: dequantization of int8 u / delta / B / C (scales per token position (L,) or per tensor (1,), affine delta
with an int32 zero point), delta bias + softplus, the D skip, the SiLU(z) gate and, per step, re-quantization of the
carried state with ``h_scale[t] * h_channel_scale[e]``.

``combine_directions`` is the twin of :func:`optimum_vim_kernels.reference.combine_directions_ref`:
``(y_f + y_b) / 2 * silu(z)``, optionally emitted as int8 codes for the next integer GEMM.

Interpreter-safe throughout (no libdevice, no inline asm): round-half-to-even uses the 1.5 * 2^23 trick, softplus
and SiLU are written out, bf16 is upcast right after every load.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_RNE = tl.constexpr(12582912.0)  # 1.5 * 2**23: (x + c) - c rounds fp32 |x| < 2**22 to the nearest even integer
_LOG2E = tl.constexpr(1.4426950408889634)
_MAX_CODE = 1 << 22  # the rounding trick's exact range: state / output code bounds must stay inside it


@triton.jit
def _softplus(x):
    """F.softplus (beta 1, threshold 20): x above 20, else log1p(exp(x)).

    log1p without libdevice: log(1 + w) * w / ((1 + w) - 1) cancels the rounding error of 1 + w (Goldberg); when
    1 + w rounds to 1, log1p(w) == w to fp32 precision. exp is clamped so the discarded branch never overflows.
    """
    w = tl.exp(tl.minimum(x, 20.0))
    v = 1.0 + w
    d = v - 1.0
    tiny = d == 0.0
    lp = tl.where(tiny, w, tl.log(v) * (w / tl.where(tiny, 1.0, d)))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _silu(x):
    """x * sigmoid(x) from exp(-|x|), which never overflows (x -> -inf gives -0, not NaN)."""
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return x * tl.where(x >= 0.0, r, e * r)


@triton.jit
def _scan_kernel(
    u_ptr, d_ptr, a_ptr, b_ptr, c_ptr, dskip_ptr, z_ptr, y_ptr,
    us_ptr, ds_ptr, dz_ptr, bs_ptr, cs_ptr, dbias_ptr, hs_ptr, hc_ptr,
    L, E,
    stride_ub, stride_ut, stride_db, stride_dt, stride_zb, stride_zt, stride_yb, stride_yt,
    stride_bb, stride_bt, stride_cb, stride_ct,
    h_qmin, h_qmax,
    N: tl.constexpr, BLOCK_E: tl.constexpr, REVERSE: tl.constexpr,
    U_INT: tl.constexpr, U_TOK: tl.constexpr, D_INT: tl.constexpr, D_TOK: tl.constexpr, D_ZERO: tl.constexpr,
    B_INT: tl.constexpr, B_TOK: tl.constexpr, C_INT: tl.constexpr, C_TOK: tl.constexpr,
    HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HQ: tl.constexpr, HQ_CH: tl.constexpr,
):
    """One program: sample ``program_id(0)``, channels ``[program_id(1) * BLOCK_E, + BLOCK_E)``.

    u, delta, z, y: (b, L, E) with unit channel stride; B, C: (b, L, N) with unit state stride; A: (E, N)
    contiguous fp32. Scales: ``*_TOK`` (L,) per token position, else (1,). delta's zero point has the granularity
    of its scale (the launcher expands the coarser one). Inputs of one token are loaded one step ahead (raw,
    dequantized only when used) so that their memory latency overlaps the previous step's recurrence.
    """
    pid_b = tl.program_id(0).to(tl.int64)  # int64: batch offsets of large activations overflow int32
    pid_e = tl.program_id(1)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, N)
    e_mask = offs_e < E  # channel tail of the last block

    # masked channels: A = 0, u = delta = 0 keep their state at exactly 0 (no inf / NaN in dead lanes)
    A2 = tl.load(a_ptr + offs_e[:, None] * N + offs_n[None, :], mask=e_mask[:, None], other=0.0) * _LOG2E
    if HAS_D:
        Dv = tl.load(dskip_ptr + offs_e, mask=e_mask, other=0.0).to(tl.float32)
    if HAS_DBIAS:
        dbias = tl.load(dbias_ptr + offs_e, mask=e_mask, other=0.0).to(tl.float32)
    if HQ_CH:
        hc = tl.load(hc_ptr + offs_e, mask=e_mask, other=1.0).to(tl.float32)
    # per-tensor scales: read once
    if U_INT and not U_TOK:
        su = tl.load(us_ptr)
    if D_INT and not D_TOK:
        sd = tl.load(ds_ptr)
        if D_ZERO:
            zd = tl.load(dz_ptr).to(tl.float32)
    if B_INT and not B_TOK:
        sb = tl.load(bs_ptr)
    if C_INT and not C_TOK:
        sc = tl.load(cs_ptr)

    u_base = u_ptr + pid_b * stride_ub + offs_e
    d_base = d_ptr + pid_b * stride_db + offs_e
    z_base = z_ptr + pid_b * stride_zb + offs_e
    y_base = y_ptr + pid_b * stride_yb + offs_e
    b_base = b_ptr + pid_b * stride_bb + offs_n
    c_base = c_ptr + pid_b * stride_cb + offs_n

    # token of step 0
    if REVERSE:
        t0 = L - 1
    else:
        t0 = 0
    u_r = tl.load(u_base + t0 * stride_ut, mask=e_mask, other=0)
    d_r = tl.load(d_base + t0 * stride_dt, mask=e_mask, other=0)
    b_r = tl.load(b_base + t0 * stride_bt)
    c_r = tl.load(c_base + t0 * stride_ct)
    if HAS_Z:
        z_r = tl.load(z_base + t0 * stride_zt, mask=e_mask, other=0.0)
    if U_TOK:
        su = tl.load(us_ptr + t0)
    if D_TOK:
        sd = tl.load(ds_ptr + t0)
        if D_ZERO:
            zd = tl.load(dz_ptr + t0).to(tl.float32)
    if B_TOK:
        sb = tl.load(bs_ptr + t0)
    if C_TOK:
        sc = tl.load(cs_ptr + t0)
    if HQ:
        sh = tl.load(hs_ptr + t0)

    h = tl.zeros((BLOCK_E, N), dtype=tl.float32)
    for step in range(L):
        if REVERSE:
            t = L - 1 - step
            t_n = t - 1
        else:
            t = step
            t_n = step + 1
        ok = step + 1 < L  # a next token exists
        # prefetch the next token (raw codes / values; nothing below waits on them until the next trip). Vector
        # masks compare against a limit that is 0 past the last token (the interpreter rejects bool-vector & scalar)
        m_n = offs_e < tl.where(ok, E, 0)
        n_n = offs_n < tl.where(ok, N, 0)
        u_n = tl.load(u_base + t_n * stride_ut, mask=m_n, other=0)
        d_n = tl.load(d_base + t_n * stride_dt, mask=m_n, other=0)
        b_n = tl.load(b_base + t_n * stride_bt, mask=n_n, other=0)
        c_n = tl.load(c_base + t_n * stride_ct, mask=n_n, other=0)
        if HAS_Z:
            z_n = tl.load(z_base + t_n * stride_zt, mask=m_n, other=0.0)
        if U_TOK:
            su_n = tl.load(us_ptr + t_n, mask=ok, other=1.0)
        if D_TOK:
            sd_n = tl.load(ds_ptr + t_n, mask=ok, other=1.0)
            if D_ZERO:
                zd_n = tl.load(dz_ptr + t_n, mask=ok, other=0).to(tl.float32)
        if B_TOK:
            sb_n = tl.load(bs_ptr + t_n, mask=ok, other=1.0)
        if C_TOK:
            sc_n = tl.load(cs_ptr + t_n, mask=ok, other=1.0)
        if HQ:
            sh_n = tl.load(hs_ptr + t_n, mask=ok, other=1.0)

        # dequantize token t, in the reference's order: (code - zero) * scale
        u = u_r.to(tl.float32)
        if U_INT:
            u = u * su
        dt = d_r.to(tl.float32)
        if D_INT:
            if D_ZERO:
                dt = dt - zd
            dt = dt * sd
        Bt = b_r.to(tl.float32)
        if B_INT:
            Bt = Bt * sb
        Ct = c_r.to(tl.float32)
        if C_INT:
            Ct = Ct * sc
        if HAS_DBIAS:
            dt = dt + dbias
        if SOFTPLUS:
            dt = _softplus(dt)

        h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1)  # y_t reads the unquantized state
        if HQ:
            # carried state -> clamp(round(h / s), qmin, qmax) * s; clamping first keeps |h / s| inside the
            # rounding trick's range and equals round-then-clamp for integer bounds
            if HQ_CH:
                s = (sh * hc)[:, None]
            else:
                s = sh
            # div_rn: IEEE division like torch (Triton's `/` is div.full.f32, up to 2 ulp off, on NVIDIA), so a
            # state code differs from the reference's only where h itself differs
            q = tl.minimum(tl.maximum(tl.math.div_rn(h, s), h_qmin), h_qmax)
            h = ((q + _RNE) - _RNE) * s
        if HAS_D:
            y = y + u * Dv
        if HAS_Z:
            y = y * _silu(z_r.to(tl.float32))
        tl.store(y_base + t * stride_yt, y.to(y_ptr.dtype.element_ty), mask=e_mask)

        # advance: the prefetched token becomes the current one
        u_r = u_n
        d_r = d_n
        b_r = b_n
        c_r = c_n
        if HAS_Z:
            z_r = z_n
        if U_TOK:
            su = su_n
        if D_TOK:
            sd = sd_n
            if D_ZERO:
                zd = zd_n
        if B_TOK:
            sb = sb_n
        if C_TOK:
            sc = sc_n
        if HQ:
            sh = sh_n


def supports_selective_scan_q(*, length, d_state, state_quant=False) -> str | None:
    """None when :func:`selective_scan_q` serves a scan of ``length`` tokens with ``d_state`` states, else why not.

    The state quantization itself (``state_quant``) is always supported."""
    if d_state < 1 or d_state & (d_state - 1):
        return f"d_state {d_state} is not a power of two (tl.arange needs one)"
    if d_state > 256:
        return f"d_state {d_state} > 256 does not fit the per-program state in registers"
    if length < 1:
        return "empty sequence (length 0)"
    return None


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _scan_launch_config(batch: int, e: int, n: int, device: torch.device, variant: str = "float") -> tuple[int, int]:
    """(BLOCK_E, num_warps) of a launch: the tuned entry of this GPU model (``optimum_vim_kernels.tuning``) for
    ``variant`` and ``(e, n)`` at the nearest batch bucket when there is one, else :func:`heuristic_scan_config`."""
    if device.type == "cuda":
        from .tuning import cuda_lookup

        tuned = cuda_lookup(device, "selective_scan_q", variant, (e, n), batch)
        if tuned is not None:
            try:
                return check_scan_config(tuned)
            except ValueError:
                pass  # an entry of another kernel revision: the heuristics are always valid
    return heuristic_scan_config(batch, e, n, device)


def heuristic_scan_config(batch: int, e: int, n: int, device: torch.device) -> tuple[int, int]:
    """The built-in (BLOCK_E, num_warps).

    Interpreter: cost is per op and per program, flat in block size, so one program per sample (numel cap keeps
    numpy tiles small). GPU (not timed on a device yet): 64 channels x N states (8 fp32 per thread at N=16,
    4 warps), halved down to 16 while the grid would leave SMs idle, because the sequential scan is latency-bound
    and small batches otherwise occupy a handful of SMs.
    """
    if device.type != "cuda":
        return min(triton.next_power_of_2(e), max(16, 16384 // n)), 4
    block_e = max(1, min(64, 1024 // n))
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    while block_e > 16 and batch * triton.cdiv(e, block_e) < target:
        block_e //= 2
    num_warps = max(1, min(4, block_e * n // 256))
    return block_e, num_warps


def check_scan_config(config) -> tuple[int, int]:
    """``(BLOCK_E, num_warps)``, powers of two (BLOCK_E up to 256, warps up to 8); raises ValueError otherwise."""
    block_e, warps = (int(v) for v in config)
    if not (1 <= block_e <= 256 and block_e & (block_e - 1) == 0 and warps in (1, 2, 4, 8)):
        raise ValueError(f"selective_scan_q launch config {tuple(config)}: BLOCK_E a power of two <= 256, "
                         "num_warps 1, 2, 4 or 8")
    return block_e, warps


def _check_scale(x: torch.Tensor, scale, name: str, length: int) -> tuple[bool, bool]:
    """(is_int, per_token) of one scan input; raises if integer codes come without a usable scale."""
    if x.is_floating_point():
        return False, False
    if x.dtype not in (torch.int8, torch.uint8, torch.int16, torch.int32):
        raise TypeError(f"selective_scan_q: integer {name} must be int8 codes (or another <= 32-bit int); got {x.dtype}")
    if scale is None:
        raise ValueError(f"selective_scan_q: integer {name} needs {name}_scale ((L,) or (1,))")
    if scale.numel() not in (1, length):
        raise ValueError(f"selective_scan_q: {name}_scale must have L = {length} or 1 elements; got {tuple(scale.shape)}")
    return True, scale.numel() > 1


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    # the kernel indexes the innermost dim with unit stride; other strides are passed through (no copy of the
    # B / C column slices of x_proj's output)
    return x if x.stride(-1) == 1 else x.contiguous()


def selective_scan_q(
    u, delta, A, B, C, D=None, z=None, *, u_scale=None, delta_scale=None, delta_zero=None, B_scale=None,
    C_scale=None, delta_bias=None, delta_softplus=False, reverse=False, h_scale=None, h_channel_scale=None,
    h_qmin=-128, h_qmax=127, out_dtype=None, config=None,
):
    """Triton twin of :func:`optimum_vim_kernels.reference.selective_scan_q_ref` (same arguments and result;
    ``config``: ``(BLOCK_E, num_warps)`` to launch with instead of the tuned / heuristic choice, for the tuner).

    Shapes: u, delta, z: (b, L, E) float (fp32 / fp16 / bf16) or integer codes; B, C: (b, L, N) likewise;
    A: (E, N); D, delta_bias, h_channel_scale: (E,); ``*_scale`` / ``delta_zero``: (L,) or (1,); h_scale: (L,)
    (a single value is broadcast). Returns y: (b, L, E) in ``out_dtype`` (default float32).
    """
    if u.dim() != 3:
        raise ValueError(f"selective_scan_q: u must be (batch, L, E); got {tuple(u.shape)}")
    b, length, e = u.shape
    n = A.shape[-1]
    reason = supports_selective_scan_q(length=length, d_state=n, state_quant=h_scale is not None)
    if reason is not None:
        raise ValueError(f"selective_scan_q kernel cannot serve this call: {reason}")
    if delta.shape != u.shape or A.shape != (e, n) or B.shape != (b, length, n) or C.shape != (b, length, n):
        raise ValueError(
            f"selective_scan_q: expected u, delta (b, L, E), A (E, N), B, C (b, L, N); got u {tuple(u.shape)}, "
            f"delta {tuple(delta.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}"
        )
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan_q: z must be (b, L, E) like u; got {tuple(z.shape)}")
    flags = {}
    for key, name, x, s in (("U", "u", u, u_scale), ("D", "delta", delta, delta_scale), ("B", "B", B, B_scale),
                            ("C", "C", C, C_scale)):
        flags[f"{key}_INT"], flags[f"{key}_TOK"] = _check_scale(x, s, name, length)
    dev = u.device

    def vec(t, dtype=torch.float32):
        return t.to(device=dev, dtype=dtype).reshape(-1).contiguous()

    dummy = torch.ones(1, device=dev, dtype=torch.float32)  # stands in for absent optional tensors (never read)
    d_zero = flags["D_INT"] and delta_zero is not None
    ds, dz = (vec(delta_scale) if flags["D_INT"] else dummy), dummy
    if d_zero:
        if delta_zero.numel() not in (1, length):
            raise ValueError(f"selective_scan_q: delta_zero must have L = {length} or 1 elements")
        dz = vec(delta_zero, torch.int32)
        # scale and zero share one granularity in the kernel: broadcast the per-tensor one to (L,)
        if dz.numel() != ds.numel():
            ds, dz = ds.expand(length).contiguous(), dz.expand(length).contiguous()
            flags["D_TOK"] = True
    hs = dummy
    if h_scale is not None:
        if h_scale.numel() not in (1, length):
            raise ValueError(f"selective_scan_q: h_scale must have L = {length} elements; got {tuple(h_scale.shape)}")
        hs = vec(h_scale).expand(length).contiguous()
        if not (float(h_qmin) == int(h_qmin) and float(h_qmax) == int(h_qmax)
                and -_MAX_CODE <= h_qmin < h_qmax <= _MAX_CODE):
            raise ValueError(f"selective_scan_q: state code range [{h_qmin}, {h_qmax}] must be integers in +-2^22")
    if h_channel_scale is not None and h_channel_scale.numel() != e:
        raise ValueError(f"selective_scan_q: h_channel_scale must be (E,) = ({e},); got {tuple(h_channel_scale.shape)}")

    u, delta, B, C = (_unit_last(t) for t in (u, delta, B, C))
    zz = _unit_last(z) if z is not None else None
    y = torch.empty(b, length, e, device=dev, dtype=out_dtype or torch.float32)
    if config is not None:
        block_e, num_warps = check_scan_config(config)
    else:
        from .tuning import scan_variant

        variant = scan_variant(int_inputs=any(flags[f"{key}_INT"] for key in "UDBC"), state_quant=h_scale is not None)
        block_e, num_warps = _scan_launch_config(b, e, n, dev, variant)
    grid = (b, triton.cdiv(e, block_e))
    zt = zz if zz is not None else u  # never read without HAS_Z; any tensor with u's strides
    args = (
        u, delta, vec(A), B, C, vec(D) if D is not None else dummy, zt, y,
        vec(u_scale) if flags["U_INT"] else dummy, ds, dz,
        vec(B_scale) if flags["B_INT"] else dummy, vec(C_scale) if flags["C_INT"] else dummy,
        vec(delta_bias) if delta_bias is not None else dummy, hs,
        vec(h_channel_scale) if h_channel_scale is not None else dummy,
        length, e,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zt.stride(0), zt.stride(1), y.stride(0), y.stride(1),
        B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        float(h_qmin), float(h_qmax),
    )
    meta = dict(
        N=n, BLOCK_E=block_e, REVERSE=bool(reverse), D_ZERO=d_zero,
        HAS_DBIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), HAS_D=D is not None, HAS_Z=z is not None,
        HQ=h_scale is not None, HQ_CH=h_scale is not None and h_channel_scale is not None, **flags,
    )
    if dev.type == "cuda":  # CPU tensors have no device index (torch.cuda.device(None) fails on CPU builds)
        with torch.cuda.device(dev):
            _scan_kernel[grid](*args, **meta, num_warps=num_warps)
    else:
        _scan_kernel[grid](*args, **meta, num_warps=num_warps)
    return y


@triton.jit
def _combine_kernel(yf_ptr, yb_ptr, z_ptr, os_ptr, oz_ptr, out_ptr, L, E,
                    DIVIDE: tl.constexpr, HAS_Z: tl.constexpr, REQUANT: tl.constexpr, OS_TOK: tl.constexpr,
                    BLOCK: tl.constexpr, QMIN: tl.constexpr = -128.0, QMAX: tl.constexpr = 127.0,
                    HAS_OZ: tl.constexpr = False):
    """One program: row ``program_id(0)`` of the contiguous (b * L, E) view, channels
    ``[program_id(1) * BLOCK, + BLOCK)``. Rows on grid axis 0 (up to 2^31 - 1 programs; axis 1 stops at 65535).

    out = (y_f + y_b) [/ 2] [* silu(z)], then either cast to out's dtype or requantized to int8 codes
    clamp(round(out / s) + zp, QMIN, QMAX) with s = out_scale[row % L] (OS_TOK) or out_scale[0] and zp the int32
    out_zero at the same index (HAS_OZ, else 0): scalars per program, no per-element integer division.
    """
    row = tl.program_id(0)
    offs_e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs_e < E
    offs = row.to(tl.int64) * E + offs_e
    y = tl.load(yf_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = y + tl.load(yb_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if DIVIDE:
        y = y * 0.5  # == y / 2 exactly
    if HAS_Z:
        y = y * _silu(tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    if REQUANT:
        if OS_TOK:
            s = tl.load(os_ptr + row % L)
        else:
            s = tl.load(os_ptr)
        zp = 0.0
        if HAS_OZ:
            if OS_TOK:
                zp = tl.load(oz_ptr + row % L).to(tl.float32)
            else:
                zp = tl.load(oz_ptr).to(tl.float32)
        # IEEE division (div_rn) as torch.round(y / s); clamping before rounding (to the range shifted by the
        # integer zero point) equals the reference's round-add-clamp and keeps the rounding trick in range
        q = tl.minimum(tl.maximum(tl.math.div_rn(y, s), QMIN - zp), QMAX - zp)
        tl.store(out_ptr + offs, (((q + _RNE) - _RNE) + zp).to(tl.int8), mask=mask)
    else:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def supports_combine_directions(*, shape, out_scale_numel=None, out_zero_numel=None) -> str | None:
    """None when :func:`combine_directions` serves (b, L, E) inputs of ``shape`` (with an out_scale of
    ``out_scale_numel`` elements, if any), else why not."""
    if len(shape) != 3:
        return f"expects (batch, L, E) tensors; got shape {tuple(shape)}"
    if out_zero_numel is not None and out_zero_numel != out_scale_numel:
        return f"out_zero must have out_scale's {out_scale_numel} elements; got {out_zero_numel}"
    if out_scale_numel is not None and out_scale_numel not in (1, shape[1]):
        return f"out_scale must have L = {shape[1]} or 1 elements; got {out_scale_numel}"
    return None


def combine_directions(y_f, y_b, z, divide=True, out_scale=None, out_dtype=None, qmin=-128, qmax=127, out_zero=None):
    """Triton twin of :func:`optimum_vim_kernels.reference.combine_directions_ref`.

    y_f, y_b, z: (b, L, E) (z may be None: no gate). Returns ``(y_f + y_b) / 2 * silu(z)`` (no ``/ 2`` when
    ``divide`` is False) as (b, L, E) in ``out_dtype`` (default y_f's dtype), or, with ``out_scale`` (L,) per
    token position or (1,) per tensor, int8 codes ``clamp(round(y / out_scale) + out_zero, qmin, qmax)``
    (``out_zero``: int32 of out_scale's shape, or None).
    """
    if not -128 <= qmin < qmax <= 127:
        raise ValueError(f"combine_directions: code range [{qmin}, {qmax}] must lie inside int8")
    reason = supports_combine_directions(shape=y_f.shape, out_scale_numel=None if out_scale is None else out_scale.numel(),
                                         out_zero_numel=None if out_zero is None else out_zero.numel())
    if reason is not None:
        raise ValueError(f"combine_directions kernel cannot serve this call: {reason}")
    if y_b.shape != y_f.shape or (z is not None and z.shape != y_f.shape):
        raise ValueError("combine_directions: y_f, y_b and z must have the same (b, L, E) shape")
    b, length, e = y_f.shape
    dev = y_f.device
    y_f, y_b = y_f.contiguous(), y_b.contiguous()
    dtype = torch.int8 if out_scale is not None else (out_dtype or y_f.dtype)
    out = torch.empty(b, length, e, device=dev, dtype=dtype)
    dummy = torch.ones(1, device=dev, dtype=torch.float32)
    if y_f.numel() == 0:
        return out
    # interpreter: one op costs the same on 16 or 16k lanes, so one block per row; GPU: up to 1024 channels
    block = min(triton.next_power_of_2(e), 1 << 14 if dev.type != "cuda" else 1024)
    args = (y_f, y_b, z.contiguous() if z is not None else dummy,
            out_scale.to(device=dev, dtype=torch.float32).reshape(-1).contiguous() if out_scale is not None else dummy,
            out_zero.to(device=dev, dtype=torch.int32).reshape(-1).contiguous() if out_zero is not None else dummy,
            out, length, e)
    meta = dict(DIVIDE=bool(divide), HAS_Z=z is not None, REQUANT=out_scale is not None,
                OS_TOK=out_scale is not None and out_scale.numel() > 1, BLOCK=block,
                QMIN=float(qmin), QMAX=float(qmax), HAS_OZ=out_zero is not None)
    grid = (b * length, triton.cdiv(e, block))
    num_warps = max(1, min(4, block // 256))
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            _combine_kernel[grid](*args, **meta, num_warps=num_warps)
    else:
        _combine_kernel[grid](*args, **meta, num_warps=num_warps)
    return out
