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

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Upper bound on elements of one (L, batch-chunk, E, N) fp32 work tensor on the no-grad path; larger batches are
# processed in batch chunks so that the two work tensors stay cache-friendly (8 MiB each). Measured on 2 cores at the
# Vim-T shape (197 tokens, E=384, N=16), batch 8: 53 ms with 64 MiB chunks, 21 ms with 16 MiB, 17 ms with 8 MiB.
_MAX_CHUNK_ELEMENTS = 1 << 21


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


def _scan_states_inplace(dA: torch.Tensor, dBu: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Turns ``dBu`` (L, b, E, N) into the hidden states in place (no autograd)."""
    length = dA.shape[0]
    steps = range(length - 2, -1, -1) if reverse else range(1, length)
    prev_offset = 1 if reverse else -1
    for t in steps:
        dBu[t].addcmul_(dA[t], dBu[t + prev_offset])
    return dBu


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _scan_forward(u, delta, A, B, C, D, z, reverse):
    """Shared forward math on one batch chunk; returns (out (b, L, E), saved tensors for backward)."""
    cdt = _compute_dtype(u)
    dt = delta.to(cdt).transpose(0, 1).contiguous()  # (L, b, E)
    ut = u.to(cdt).transpose(0, 1).contiguous()
    Bt = B.to(cdt).transpose(0, 1)  # (L, b, N)
    Ct = C.to(cdt).transpose(0, 1)
    Ac = A.to(cdt)
    dA = torch.exp(dt.unsqueeze(-1) * Ac)  # (L, b, E, N)
    states = _scan_states_inplace(dA, (dt * ut).unsqueeze(-1) * Bt.unsqueeze(2), reverse)
    y = torch.matmul(states, Ct.unsqueeze(-1)).squeeze(-1)  # (L, b, E)
    if D is not None:
        y = y + ut * D.to(cdt)
    out = y
    if z is not None:
        out = y * F.silu(z.to(cdt).transpose(0, 1))
    return out.transpose(0, 1), (dt, ut, Bt, Ct, Ac, dA, states, y)


class _SelectiveScanFn(torch.autograd.Function):
    """Selective scan with a hand-written backward: one reverse scan over the state gradients plus a few large
    batched ops, instead of autograd through L small steps (about 2-3x faster to train on CPU)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, reverse):
        out, saved = _scan_forward(u, delta, A, B, C, D, z, reverse)
        ctx.reverse = reverse
        ctx.has_d, ctx.has_z = D is not None, z is not None
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (u, delta, A, B, C, D, z))
        ctx.save_for_backward(*saved, D if D is not None else torch.empty(0), z if z is not None else torch.empty(0))
        return out.to(u.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        dt, ut, Bt, Ct, Ac, dA, states, y, D, z = ctx.saved_tensors
        cdt = dt.dtype
        g = grad_out.to(cdt).transpose(0, 1)  # (L, b, E)
        grad_z = grad_D = None
        if ctx.has_z:
            zt = z.to(cdt).transpose(0, 1)
            sig = torch.sigmoid(zt)
            grad_z = (g * y * sig * (1 + zt * (1 - sig))).transpose(0, 1)
            g = g * (zt * sig)
        grad_u = g * D.to(cdt) if ctx.has_d else torch.zeros_like(ut)
        if ctx.has_d:
            grad_D = (g * ut).sum((0, 1))
        grad_C = torch.matmul(g.unsqueeze(-2), states).squeeze(-2)  # (L, b, N)
        # gradient w.r.t. every state, accumulated backwards through the recurrence (in place)
        gs = g.unsqueeze(-1) * Ct.unsqueeze(2)  # (L, b, E, N)
        length = gs.shape[0]
        if ctx.reverse:  # the forward scan went L-1 -> 0, so its gradient flows 0 -> L-1
            for t in range(1, length):
                gs[t].addcmul_(dA[t - 1], gs[t - 1])
        else:
            for t in range(length - 2, -1, -1):
                gs[t].addcmul_(dA[t + 1], gs[t + 1])
        # d loss / d(delta * A) = gs_t * h_{t-1} * dA_t  (h before the first step is zero)
        g_x = torch.zeros_like(gs)
        if ctx.reverse:
            torch.mul(gs[:-1], states[1:], out=g_x[:-1])
        else:
            torch.mul(gs[1:], states[:-1], out=g_x[1:])
        g_x.mul_(dA)
        grad_A = torch.einsum("lben,lbe->en", g_x, dt)
        grad_dt = (g_x * Ac).sum(-1)
        g_dtu = torch.matmul(gs, Bt.unsqueeze(-1)).squeeze(-1)  # (L, b, E)
        grad_B = torch.matmul((dt * ut).unsqueeze(-2), gs).squeeze(-2)  # (L, b, N)
        grad_dt = grad_dt + g_dtu * ut
        grad_u = grad_u + g_dtu * dt
        dtypes = ctx.dtypes
        return (
            grad_u.transpose(0, 1).to(dtypes[0]),
            grad_dt.transpose(0, 1).to(dtypes[1]),
            grad_A.to(dtypes[2]),
            grad_B.transpose(0, 1).to(dtypes[3]),
            grad_C.transpose(0, 1).to(dtypes[4]),
            grad_D.to(dtypes[5]) if grad_D is not None else None,
            grad_z.to(dtypes[6]) if grad_z is not None else None,
            None,
        )


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

    The recurrence runs in place over time-major work tensors (two (L, batch, E, N) buffers, fp32, or fp64 for fp64
    inputs); without autograd the batch is processed in chunks, with autograd a hand-written backward is used.
    """
    _check_scan_shapes(u, delta, A, B, C, D, z)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z)
    )
    if needs_grad:
        return _SelectiveScanFn.apply(u, delta, A, B, C, D, z, reverse)
    batch, length, _ = u.shape
    per_sample = length * A.shape[0] * A.shape[1]
    chunk = max(1, min(batch, _MAX_CHUNK_ELEMENTS // max(per_sample, 1)))
    outputs = []
    for start in range(0, batch, chunk):
        sl = slice(start, start + chunk)
        out, _ = _scan_forward(
            u[sl], delta[sl], A, B[sl], C[sl], D, z[sl] if z is not None else None, reverse
        )
        outputs.append(out.to(u.dtype))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, 0)


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


_SCAN_BACKENDS = ("auto", "torch", "mamba")


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
    """Dispatching selective scan. ``backend``: ``"auto"`` (mamba-ssm on CUDA when importable, else PyTorch),
    ``"torch"`` or ``"mamba"``. Shapes as in :func:`selective_scan_torch`."""
    if backend not in _SCAN_BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; choose one of {_SCAN_BACKENDS}")
    if backend == "mamba" or (backend == "auto" and u.is_cuda and _mamba_selective_scan_fn() is not None):
        return selective_scan_mamba_cuda(u, delta, A, B, C, D, z, reverse)
    return selective_scan_torch(u, delta, A, B, C, D, z, reverse)
