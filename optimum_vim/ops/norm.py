"""RMSNorm as Vim uses it (weight only, fp32 math, output in the input dtype), with the fused residual add."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``x * rsqrt(mean(x^2, -1) + eps) * weight`` computed in fp32 (fp64 for fp64 input), returned in ``x.dtype``. x: (..., D)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x32 = x.to(acc)
    out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)
    return out.to(x.dtype)


def add_rms_norm(
    hidden_states: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-5,
    residual_in_fp32: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vim's pre-norm step: ``residual = residual + hidden_states`` (or ``hidden_states`` when None), then
    ``(rms_norm(residual) in hidden_states.dtype, residual)``; the residual is carried in fp32 when asked."""
    residual = hidden_states if residual is None else residual + hidden_states
    if residual_in_fp32 and residual.dtype != torch.float64:
        residual = residual.float()
    return rms_norm(residual, weight, eps).to(hidden_states.dtype), residual
