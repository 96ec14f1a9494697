"""Selective scan (Mamba-1 S6 recurrence) for Vision Mamba, in both scan directions.

Layout used everywhere in optimum-vim is token-major, ``(batch, length, channels)``, the layout the linear layers
produce; the backward Vim direction is expressed with ``reverse=True`` instead of flipped copies.

For every channel ``e`` and state ``n``::

    h_t = exp(delta_t * A[e, n]) * h_{t-1} + delta_t * B_t[n] * u_t        (h_{-1} = 0, t in scan order)
    y_t = sum_n C_t[n] * h_t[e, n] + D[e] * u_t
    y_t = y_t * silu(z_t)                                                   (only when ``z`` is given)

``reverse=True`` walks ``t`` from ``L - 1`` down to ``0``; the output stays in the original token order, so it equals
``flip(scan(flip(u), ...))`` of the official implementation.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn.functional as F
from optimum_vim_kernels.reference import save_scan_inputs, saved_scan_inputs

logger = logging.getLogger(__name__)

# The recurrence walks the tokens one at a time over (batch-chunk, E, N) slices; the batch is cut into chunks of about
# _SLICE_ELEMENTS state elements so that a step's slices (state, decay, gradient) stay in the core's cache while
# the Python loop still amortises its per-op overhead. The chunking depends on the shapes only (never on threads).
_SLICE_ELEMENTS = 1 << 16


def _check_scan_shapes(u, delta, A, B, C, D, z) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan expects u of shape (batch, length, channels); got {tuple(u.shape)}")
    batch, length, channels = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have the shape of u {tuple(u.shape)}; got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"A must have shape (channels={channels}, d_state); got {tuple(A.shape)}")
    state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, length, state):
            raise ValueError(f"{name} must have shape {(batch, length, state)}; got {tuple(t.shape)}")
    if D is not None and D.shape != (channels,):
        raise ValueError(f"D must have shape ({channels},); got {tuple(D.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have the shape of u {tuple(u.shape)}; got {tuple(z.shape)}")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _batch_chunks(batch: int, A: torch.Tensor) -> list[slice]:
    """Batch slices of about ``_SLICE_ELEMENTS`` state elements per token step."""
    chunk = max(1, min(batch, _SLICE_ELEMENTS // max(A.shape[0] * A.shape[1], 1)))
    return [slice(start, start + chunk) for start in range(0, batch, chunk)]


def _time_major(t: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None,
                zero: torch.Tensor | None = None) -> torch.Tensor:
    """``(b, L, x) -> `` contiguous ``(L, b, x)`` in ``dtype``. With ``scale`` (``(L,)`` or ``(1,)``; optional
    ``zero`` alike), ``t`` holds integer codes and is dequantized in the same pass, ``(code - zero) * scale``: the
    int8 codes are read once and the float tensor is written once, already in scan layout."""
    if scale is None:
        return t.to(dtype).transpose(0, 1).contiguous()
    src = t.transpose(0, 1)
    out = torch.empty(src.shape, dtype=dtype, device=t.device)
    per_step = lambda v: v.to(dtype).reshape(-1, 1, 1) if v.numel() > 1 else v.to(dtype).reshape(())  # noqa: E731
    if zero is None:
        return torch.mul(src, per_step(scale), out=out)
    return torch.sub(src, per_step(zero), out=out).mul_(per_step(scale))


def _scan_order(length: int, reverse: bool) -> range:
    return range(length - 1, -1, -1) if reverse else range(length)


def _recurrence(dt, dtu, Bt, Ct, A, reverse: bool, keep: bool):
    """``y_t = C_t . h_t`` of one time-major chunk (dt, dtu: (L, b, E); Bt, Ct: (L, b, N)), token by token.

    ``h_t = dA_t * h_prev + dBu_t`` with ``dA_t = exp(dt_t A)``, ``dBu_t = dtu_t B_t``. Returns ``(y, dA, h)``: with
    ``keep`` the (L, b, E, N) decays and states for the backward, otherwise two rolling (b, E, N) buffers only."""
    length, b, e = dt.shape
    n = A.shape[1]
    y = dt.new_empty(length, b, e)
    if keep:
        dA_all, h_all = dt.new_empty(length, b, e, n), dt.new_empty(length, b, e, n)
    else:
        dA_buf, bufs = dt.new_empty(b, e, n), (dt.new_empty(b, e, n), dt.new_empty(b, e, n))
    h_prev = None
    for i, t in enumerate(_scan_order(length, reverse)):
        dA = dA_all[t] if keep else dA_buf
        h = h_all[t] if keep else bufs[i % 2]
        torch.mul(dt[t].unsqueeze(-1), A, out=dA)
        dA.exp_()
        torch.mul(dtu[t].unsqueeze(-1), Bt[t].unsqueeze(1), out=h)
        if h_prev is not None:
            h.addcmul_(dA, h_prev)
        torch.bmm(h, Ct[t].unsqueeze(-1), out=y[t].unsqueeze(-1))
        h_prev = h
    return (y, dA_all, h_all) if keep else (y, None, None)


def _scan_forward_chunk(u, delta, A, B, C, D, z, reverse, codes=None):
    """Output ``(b, L, E)`` (compute dtype) of one batch chunk, without keeping work tensors. ``codes`` maps the
    inputs given as integer codes (``"u"``, ``"delta"``, ``"B"``, ``"C"``) to their ``(scale, zero)``."""
    codes = codes or {}
    cdt = _compute_dtype(u) if not codes else torch.float32
    tm = lambda name, t: _time_major(t, cdt, *codes.get(name, (None, None)))  # noqa: E731
    dt, ut = tm("delta", delta), tm("u", u)
    y, _, _ = _recurrence(dt, dt * ut, tm("B", B), tm("C", C), A.to(cdt), reverse, keep=False)
    if D is not None:
        y = y + ut * D.to(cdt)
    if z is not None:
        y = y * F.silu(_time_major(z, cdt))
    return y.transpose(0, 1)


def _scan_backward_chunk(grad_out, u, delta, A, B, C, D, z, reverse):
    """Gradients ``(u, delta, A, B, C, D, z)`` of one batch chunk. The chunk's forward is recomputed (cheaper than
    holding the whole batch's (L, b, E, N) states from forward to backward, and cache-sized), then the state
    gradient runs back through the recurrence token by token, every per-token product taken while its slices are
    in cache."""
    cdt = _compute_dtype(u)
    dt, ut, Bt, Ct = _time_major(delta, cdt), _time_major(u, cdt), _time_major(B, cdt), _time_major(C, cdt)
    Ac = A.to(cdt)
    dtu = dt * ut
    y, dA, h = _recurrence(dt, dtu, Bt, Ct, Ac, reverse, keep=True)
    g = _time_major(grad_out, cdt)  # (L, b, E)
    grad_z = grad_D = None
    if z is not None:
        if D is not None:
            y = y + ut * D.to(cdt)
        zt = _time_major(z, cdt)
        sig = torch.sigmoid(zt)
        grad_z = (g * y * sig * (1 + zt * (1 - sig))).transpose(0, 1)
        g = g * (zt * sig)
    if D is not None:
        grad_D = (g * ut).sum((0, 1))
    length, b, e = dt.shape
    grad_C, grad_B = dt.new_empty(length, b, Ct.shape[-1]), dt.new_empty(length, b, Ct.shape[-1])
    g_dtu = dt.new_empty(length, b, e)  # d loss / d(dt * u)
    grad_dtA = dt.new_zeros(length, b, e)  # d loss / d dt through dA
    acc_A = dt.new_zeros(b, e, Ac.shape[1])
    gs, gs_next, tmp = (dt.new_empty(b, e, Ac.shape[1]) for _ in range(3))
    order = list(_scan_order(length, reverse))
    for i in range(length - 1, -1, -1):
        t = order[i]
        # gradient of the state h_t: from y_t, and from h_next through its decay
        torch.mul(g[t].unsqueeze(-1), Ct[t].unsqueeze(1), out=gs)
        if i < length - 1:
            gs.addcmul_(dA[order[i + 1]], gs_next)
        torch.bmm(g[t].unsqueeze(1), h[t], out=grad_C[t].unsqueeze(1))
        torch.bmm(gs, Bt[t].unsqueeze(-1), out=g_dtu[t].unsqueeze(-1))
        torch.bmm(dtu[t].unsqueeze(1), gs, out=grad_B[t].unsqueeze(1))
        if i > 0:  # d loss / d(dt_t A) = gs_t * h_prev * dA_t (the first state has no predecessor)
            torch.mul(gs, h[order[i - 1]], out=tmp)
            tmp.mul_(dA[t])
            acc_A.addcmul_(tmp, dt[t].unsqueeze(-1))
            tmp.mul_(Ac)
            torch.sum(tmp, -1, out=grad_dtA[t])
        gs, gs_next = gs_next, gs
    grad_u = g_dtu * dt
    if D is not None:
        grad_u = grad_u + g * D.to(cdt)
    grad_dt = grad_dtA + g_dtu * ut
    return (grad_u.transpose(0, 1), grad_dt.transpose(0, 1), acc_A.sum(0), grad_B.transpose(0, 1),
            grad_C.transpose(0, 1), grad_D, grad_z)


class _SelectiveScanFn(torch.autograd.Function):
    """Selective scan with a hand-written backward: one reverse pass over the state gradients, token by token on
    cache-sized batch chunks, instead of autograd through L small steps.

    The forward keeps only its inputs and the backward recomputes each chunk's states, so training memory does not
    hold (L, batch, E, N) fp32 tensors per scan between forward and backward (1.1 GB at batch 256 on the fixture)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, reverse):
        save_scan_inputs(ctx, u, delta, A, B, C, D, z, reverse)
        return _chunked_forward(u, delta, A, B, C, D, z, reverse)

    @staticmethod
    def backward(ctx, grad_out):
        u, delta, A, B, C, D, z = saved_scan_inputs(ctx)
        parts = [_scan_backward_chunk(grad_out[sl], u[sl], delta[sl], A, B[sl], C[sl], D,
                                      z[sl] if z is not None else None, ctx.reverse)
                 for sl in _batch_chunks(u.shape[0], A)]
        cat = lambda i: parts[0][i] if len(parts) == 1 else torch.cat([p[i] for p in parts], 0)  # noqa: E731
        total = lambda i: functools.reduce(torch.add, [p[i] for p in parts])  # noqa: E731
        # the cross-chunk sums of grad_A / grad_D run in chunk order: reproducible
        return (
            cat(0).to(u.dtype),
            cat(1).to(delta.dtype),
            total(2).to(A.dtype),
            cat(3).to(B.dtype),
            cat(4).to(C.dtype),
            total(5).to(D.dtype) if D is not None else None,
            cat(6).to(z.dtype) if z is not None else None,
            None,
        )


def _chunked_forward(u, delta, A, B, C, D, z, reverse, codes=None, out_dtype=None) -> torch.Tensor:
    outs = [_scan_forward_chunk(u[sl], delta[sl], A, B[sl], C[sl], D, z[sl] if z is not None else None, reverse,
                                codes)
            for sl in _batch_chunks(u.shape[0], A)]
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 0)).to(out_dtype or u.dtype)


@torch.no_grad()
def selective_scan_codes(u, delta, A, B, C, D=None, z=None, *, reverse=False, u_scale=None, delta_scale=None,
                         delta_zero=None, B_scale=None, C_scale=None, out_dtype=torch.float32) -> torch.Tensor:
    """:func:`selective_scan_torch` on inputs given as integer codes (any of ``u, delta, B, C``; each with a
    ``(L,)`` or ``(1,)`` scale, ``delta`` optionally with a zero point) or as floats (scale None), inference only.

    The codes are dequantized chunk by chunk straight into the time-major layout the recurrence reads (one pass
    per input, no float copy of the input in token-major layout), with the same arithmetic as dequantizing first:
    the output is bit-identical to ``selective_scan_torch((u_codes - zero) * scale, ...)``."""
    _check_scan_shapes(u, delta, A, B, C, D, z)
    given = {"u": (u, u_scale, None), "delta": (delta, delta_scale, delta_zero), "B": (B, B_scale, None),
             "C": (C, C_scale, None)}
    codes = {}
    for name, (t, scale, zero) in given.items():
        if scale is None:
            if not t.is_floating_point():
                raise TypeError(f"{name} holds integer codes ({t.dtype}) but no {name}_scale was given")
            continue
        if t.is_floating_point():
            raise TypeError(f"{name}_scale was given but {name} is a float tensor ({t.dtype}), not codes")
        for what, v in (("scale", scale), ("zero", zero)):
            if v is not None and v.numel() not in (1, t.shape[1]):
                raise ValueError(f"{name}'s {what} must have 1 or L = {t.shape[1]} entries; got {v.numel()}")
        codes[name] = (scale, zero)
    return _chunked_forward(u, delta, A, B, C, D, z, reverse, codes, out_dtype)


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    reverse: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch selective scan, fp32 accumulation, any device.

    Args:
        u: (batch, L, E) scan input. delta: (batch, L, E) step sizes (already soft-plussed).
        A: (E, N) negative state matrix. B, C: (batch, L, N). D: (E,) skip, optional. z: (batch, L, E) gate, optional.
        reverse: scan from the last token to the first.

    Returns:
        (batch, L, E) in ``u.dtype``.

    The recurrence runs token by token over time-major (batch-chunk, E, N) slices (fp32, or fp64 for fp64 inputs);
    with autograd a hand-written backward recomputes each chunk's states instead of storing them.
    """
    _check_scan_shapes(u, delta, A, B, C, D, z)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z)
    )
    if needs_grad:
        return _SelectiveScanFn.apply(u, delta, A, B, C, D, z, reverse)
    return _chunked_forward(u, delta, A, B, C, D, z, reverse)


def _mamba_selective_scan_fn():
    """Returns mamba-ssm's CUDA ``selective_scan_fn`` or None (never raises: mamba-ssm is optional)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # noqa: BLE001 - any import failure (missing package, ABI mismatch) means "not available"
        logger.debug("mamba-ssm selective scan unavailable: %s", err)
        return None
    return selective_scan_fn


def selective_scan_mamba_cuda(u, delta, A, B, C, D=None, z=None, reverse=False) -> torch.Tensor:
    """mamba-ssm's fused CUDA kernel, same signature and layout as :func:`selective_scan_torch`."""
    fn = _mamba_selective_scan_fn()
    if fn is None:
        raise RuntimeError("mamba-ssm is not importable; install it with `pip install optimum-vim[cuda]` on a CUDA box")
    to_bel = lambda t: t.transpose(1, 2)  # noqa: E731 - (b, L, x) -> (b, x, L) views
    args = [to_bel(t) for t in (u, delta)]
    bc = [to_bel(t) for t in (B, C)]
    zz = to_bel(z) if z is not None else None
    if reverse:
        args = [t.flip(-1) for t in args]
        bc = [t.flip(-1) for t in bc]
        zz = zz.flip(-1) if zz is not None else None
    y = fn(
        args[0].contiguous(), args[1].contiguous(), A.float().contiguous(), bc[0].contiguous(), bc[1].contiguous(),
        D.float() if D is not None else None, zz.contiguous() if zz is not None else None,
        delta_bias=None, delta_softplus=False,
    )
    if reverse:
        y = y.flip(-1)
    return y.transpose(1, 2).to(u.dtype)


_SCAN_BACKENDS = ("auto", "torch", "mamba", "cpu", "triton")


def _cpu_scan_kernel(u: torch.Tensor, forced: bool):
    """The fused CPU scan (``optimum_vim_kernels.cpu.selective_scan``) when the kernel policy lets it serve this
    call, else None (the PyTorch scan runs). ``forced`` (``backend="cpu"``) raises instead of falling back."""
    from .dispatch import KernelBackend, current_backend, pick_kernel, use_kernels

    if torch.compiler.is_compiling():  # numba is opaque to dynamo: compiled graphs take the PyTorch scan
        return None
    if not forced and (current_backend() in (KernelBackend.REFERENCE, KernelBackend.TRITON) or u.is_cuda):
        return None  # on CPU the PyTorch scan serves the float op under these policies (CUDA: float_scan_backend)
    with use_kernels(KernelBackend.CPU) if forced else contextlib.nullcontext():
        return pick_kernel("scan", "selective_scan", u, dtype=u.dtype, device=u.device)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    reverse: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Dispatching selective scan. Shapes as in :func:`selective_scan_torch`. ``backend``:

    * ``"auto"``: on CUDA, mamba-ssm when importable, else the Triton scan, else PyTorch
      (:func:`optimum_vim.ops.dispatch.float_scan_backend` decides); on CPU the fused CPU scan
      (``optimum_vim_kernels.cpu``, numba) unless the kernel policy (``OPTIMUM_VIM_KERNELS`` / ``use_kernels``) is
      ``reference`` or ``triton`` or it cannot serve the call (fp64 inputs, numba missing), else the PyTorch scan;
    * ``"torch"``: the PyTorch scan (the reference), ``"mamba"``: mamba-ssm's CUDA kernel, ``"cpu"``: the fused CPU
      scan (raises ``KernelUnsupportedError`` with the reason when it cannot serve the call), ``"triton"``: the Triton
      scan (forward only)."""
    if backend not in _SCAN_BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; choose one of {_SCAN_BACKENDS}")
    if torch.compiler.is_exporting():  # one loop node instead of L unrolled steps (optimum_vim.ops.scan_loop)
        from .scan_loop import selective_scan_loop

        return selective_scan_loop(u, delta, A, B, C, D, z, reverse)
    if backend == "auto" and u.is_cuda and torch.compiler.is_compiling():
        backend = "torch"  # the choice reads the kernel policy (a context variable dynamo cannot trace)
    if backend == "auto" and u.is_cuda:
        from .dispatch import float_scan_backend

        backend = float_scan_backend(u, delta, A, B, C, D, z, d_state=A.shape[1])
    if backend == "mamba":
        return selective_scan_mamba_cuda(u, delta, A, B, C, D, z, reverse)
    if backend in ("auto", "cpu"):
        _check_scan_shapes(u, delta, A, B, C, D, z)
        kernel = _cpu_scan_kernel(u, forced=backend == "cpu")
        if kernel is not None:
            return kernel(u, delta, A, B, C, D, z, reverse)
    if backend == "triton":
        from optimum_vim_kernels.scan import selective_scan_q

        return selective_scan_q(u, delta, A, B, C, D, z, reverse=reverse, out_dtype=u.dtype)
    return selective_scan_torch(u, delta, A, B, C, D, z, reverse)
