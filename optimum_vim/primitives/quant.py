"""Uniform (affine) quantization math: integer ranges, quantize / dequantize, straight-through fake quantization.

Rounding is round-half-to-even everywhere (``torch.round``), which the Triton kernels reproduce exactly.
"""

from __future__ import annotations

import torch


def int_range(bits: int, symmetric: bool = True, narrow: bool = True) -> tuple[int, int]:
    """Integer code range.

    symmetric + narrow: ``[-(2^(b-1)-1), 2^(b-1)-1]`` (PTQ4VM / OuroMamba weights: +-7 at 4 bit);
    symmetric, not narrow: ``[-2^(b-1), 2^(b-1)-1]`` (k-scaled PTQ); asymmetric: ``[0, 2^b-1]``.
    """
    if bits < 1 or bits > 16:
        raise ValueError(f"bits must be in 1..16; got {bits}")
    if not symmetric:
        return 0, (1 << bits) - 1
    if bits == 1:
        raise ValueError("1-bit symmetric uniform quantization has no zero-centred grid; use vector quantization")
    hi = (1 << (bits - 1)) - 1
    return (-hi if narrow else -hi - 1), hi


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point, qmin, qmax)`` as a float tensor of integer values."""
    q = torch.round(x / scale)
    if zero_point is not None:
        q = q + zero_point
    return q.clamp_(qmin, qmax)


def quantize_int8(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int,
                  qmax: int) -> torch.Tensor:
    """:func:`quantize` emitted as int8 codes (``[qmin, qmax]`` must fit int8), with one float temporary the size of
    ``x`` (``x / scale``, rounded and clamped in place) instead of one per step; the same values as
    ``quantize(...).to(torch.int8)``."""
    if qmin < -128 or qmax > 127:
        raise ValueError(f"codes in [{qmin}, {qmax}] do not fit int8")
    q = torch.div(x.float(), scale)  # .float() is free for fp32 inputs
    q.round_()
    if zero_point is not None:
        q.add_(zero_point)
    return q.clamp_(qmin, qmax).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """``scale * (q - zero_point)``."""
    if zero_point is not None:
        q = q - zero_point
    return q * scale


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through (identity) gradient."""
    return _RoundSTE.apply(x)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int, ste: bool = False
) -> torch.Tensor:
    """Quantize then dequantize. With ``ste`` the rounding passes gradients straight through and the clamp has zero
    gradient outside the range (PTQ4VM / OuroMamba use a hard-tanh clamp); gradients reach ``scale`` (LSQ-style)."""
    if not ste:
        return dequantize(quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)
    q = round_ste(x / scale)
    if zero_point is not None:
        q = q + zero_point
    q = torch.clamp(q, qmin, qmax)
    if zero_point is not None:
        q = q - zero_point
    return q * scale


def symmetric_scale(absmax: torch.Tensor, bits: int, narrow: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Scale that maps ``absmax`` to the largest code."""
    _, qmax = int_range(bits, True, narrow)
    return absmax.clamp(min=eps) / max(qmax, 1)


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of an asymmetric range ``[lo, hi]`` (widened to include 0)."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    qmin, qmax = int_range(bits, symmetric=False)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=eps)
    zero = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    return scale, zero

