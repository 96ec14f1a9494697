"""The selective scan as one loop for exported graphs (``torch.export``, ONNX).

The eager scans walk the tokens in a Python loop, which tracing unrolls into L copies of the step (197 per direction
for Vim at 224). Here the recurrence is written with ``torch._higher_order_ops.scan``: ``torch.export`` keeps it as one
``scan`` node whose body is the step, and the ONNX exporter turns that into an ONNX ``Scan`` (the body once, any batch
size). ``optimum_vim.ops`` dispatches here while ``torch.compiler.is_exporting()``; the values are those of
:func:`~optimum_vim.ops.selective_scan_torch` / ``selective_scan_q_ref`` (fp32 state) up to float summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._higher_order_ops.scan import scan as _scan_hop


def _deq(x: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes (b, L, x) -> fp32 with a (L,) or (1,) scale (and zero point); float inputs -> fp32."""
    if scale is None:
        return x.float()
    xf = x.float()
    per_step = lambda v: v.float().reshape(1, -1, 1) if v.numel() > 1 else v.float().reshape(())  # noqa: E731
    if zero is not None:
        xf = xf - per_step(zero)
    return xf * per_step(scale)


def scan_recurrence(delta, u, A, B, C, reverse: bool, h_scale=None, h_channel_scale=None, h_qmin=-128, h_qmax=127):
    """``y_t = C_t . h_t`` (b, L, E) fp32 for fp32 delta, u (b, L, E), A (E, N), B, C (b, L, N), as one scan node.
    ``h_scale`` (L,) / (1,): the carried state is re-quantized after each step (``selective_scan_q_ref``'s rule)."""
    b, length, e = u.shape
    n = A.shape[1]
    tm = lambda t: t.transpose(0, 1)  # noqa: E731 - (b, L, x) -> (L, b, x): scan runs over dim 0
    xs = [tm(delta), tm(delta * u), tm(B), tm(C)]
    quant = h_scale is not None
    if quant:
        steps = h_scale.float().reshape(-1)
        xs.append(steps.expand(length) if steps.numel() == 1 else steps)
        channel = (h_channel_scale.float() if h_channel_scale is not None else A.new_ones(e)).reshape(1, e, 1)

    def step(h, x):
        dt, dtu, b_t, c_t = x[:4]
        h = torch.exp(dt.unsqueeze(-1) * A) * h + dtu.unsqueeze(-1) * b_t.unsqueeze(1)
        y = (h * c_t.unsqueeze(1)).sum(-1)
        if quant:
            s = x[4] * channel
            h = torch.clamp(torch.round(h / s), h_qmin, h_qmax) * s
        return h.clone(), y

    h0 = u.new_zeros(b, e, n, dtype=torch.float32)
    _, ys = _scan_hop(step, h0, xs, dim=0, reverse=reverse)
    return ys.transpose(0, 1)


def selective_scan_loop(u, delta, A, B, C, D=None, z=None, reverse: bool = False) -> torch.Tensor:
    """:func:`~optimum_vim.ops.selective_scan_torch` for export (same arguments and output dtype)."""
    y = scan_recurrence(delta.float(), u.float(), A.float(), B.float(), C.float(), reverse)
    if D is not None:
        y = y + u.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)


def selective_scan_q_loop(u, delta, A, B, C, D=None, z=None, *, u_scale=None, delta_scale=None, delta_zero=None,
                          B_scale=None, C_scale=None, delta_bias=None, delta_softplus=False, reverse=False,
                          h_scale=None, h_channel_scale=None, h_qmin=-128, h_qmax=127, out_dtype=None) -> torch.Tensor:
    """``selective_scan_q_ref`` for export: int8 inputs dequantized with their scales, optional per-step state
    re-quantization, one scan node."""
    uf, df = _deq(u, u_scale), _deq(delta, delta_scale, delta_zero)
    if delta_bias is not None:
        df = df + delta_bias.float()
    if delta_softplus:
        df = F.softplus(df)
    y = scan_recurrence(df, uf, A.float(), _deq(B, B_scale), _deq(C, C_scale), reverse, h_scale, h_channel_scale,
                        h_qmin, h_qmax)
    if D is not None:
        y = y + uf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(out_dtype or torch.float32)


__all__ = ["scan_recurrence", "selective_scan_loop", "selective_scan_q_loop"]
