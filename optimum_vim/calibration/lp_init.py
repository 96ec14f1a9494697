"""Lp grid initialisation of step sizes (PTQ4VM and OuroMamba, methods.md §1.2 / §3.3 step 3).

Both searches try a fixed number of clipping ranges and keep, per row or per token position, the one whose fake
quantization minimises ``mean |x - x_hat|^p`` (p = 2.4 in both papers' code). The candidates are evaluated one at a
time so that memory stays at a few copies of the tensor, whatever the number of candidates.
"""

from __future__ import annotations

import typing
from typing import Literal

import torch

from ..primitives import affine_params, fake_quantize, int_range


def _check(p: float, candidates: int) -> None:
    if not p > 0:
        raise ValueError(f"the Lp norm exponent must be positive; got {p}")
    if not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"the number of grid candidates must be a positive int; got {candidates!r}")


@torch.no_grad()
def lp_weight_scale(w: torch.Tensor, bits: int, p: float = 2.4, candidates: int = 100) -> torch.Tensor:
    """Per-output-row symmetric step (N, 1) of a (N, K) weight: candidate ``k`` clips at ``k / candidates`` of the
    row's max |w| (k = 1..candidates, so the last candidate is plain min-max), codes ``+-(2^(b-1) - 1)``."""
    _check(p, candidates)
    w = w.detach().float()
    _, qmax = int_range(bits, True, True)
    absmax = w.abs().amax(1, keepdim=True).clamp(min=1e-8)
    best_err = torch.full_like(absmax, float("inf"))
    best = absmax / qmax
    for k in range(1, candidates + 1):
        scale = (absmax * (k / candidates) / qmax).clamp(min=1e-8)
        err = (w - fake_quantize(w, scale, None, -qmax, qmax)).abs().pow(p).mean(1, keepdim=True)
        better = err < best_err
        best = torch.where(better, scale, best)
        best_err = torch.where(better, err, best_err)
    return best


WidenToZero = Literal["candidates", "winner"]
WIDEN_TO_ZERO = typing.get_args(WidenToZero)


@torch.no_grad()
def lp_token_affine(x: torch.Tensor, bits: int, p: float = 2.4, candidates: int = 100,
                    widen: str = "candidates") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-position asymmetric step and integer zero point, ``(L,)`` each, of activations ``x`` (n, L, C).

    Candidate ``a`` shrinks both ends of the position's [min, max] by ``a * (max - min)``; the range becomes
    ``scale = (hi - lo) / (2^b - 1)``, ``zero = round(-lo / scale)``, and is widened to include 0, which an affine
    grid of the stored format must represent exactly. ``widen="candidates"`` (default) widens every candidate before
    it is scored, so each candidate is scored on the grid it would store; ``widen="winner"`` scores the candidates
    as they are (zero point unclamped) and widens only the chosen one, as PTQ4VM's and OuroMamba's code do.

    Deviation from PTQ4VM's code (named in the README): its grid is ``a = k / 100`` for k = 1..100, so min-max itself
    (a = 0) is never tried and every ``a > 0.5`` inverts the interval (half of the candidates are dead). Here the
    ``candidates`` values are spread over the live half, ``a = i / (2 * candidates)`` for i = 0..candidates-1."""
    _check(p, candidates)
    if x.dim() != 3:
        raise ValueError(f"per-token initialisation expects (n, L, C) activations; got shape {tuple(x.shape)}")
    if widen not in WIDEN_TO_ZERO:
        raise ValueError(f"widen must be one of {WIDEN_TO_ZERO}; got {widen!r}")
    x = x.detach().float()
    lo0, hi0 = x.amin(dim=(0, 2)), x.amax(dim=(0, 2))
    width = hi0 - lo0
    qmin, qmax = int_range(bits, symmetric=False)
    best_err = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0, hi0
    for i in range(candidates):
        a = i / (2 * candidates)
        lo, hi = lo0 + a * width, hi0 - a * width
        if widen == "candidates":
            scale, zero = affine_params(lo, hi, bits)
        else:
            scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-8)
            zero = torch.round(qmin - lo / scale)
        x_hat = fake_quantize(x, scale.view(1, -1, 1), zero.view(1, -1, 1), qmin, qmax)
        err = (x - x_hat).abs().pow(p).mean(dim=(0, 2))
        better = err < best_err
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
        best_err = torch.where(better, err, best_err)
    return affine_params(best_lo, best_hi, bits)


@torch.no_grad()
def lp_token_symmetric(x: torch.Tensor, bits: int, p: float = 2.4, candidates: int = 100) -> torch.Tensor:
    """Per-token-position symmetric step (L,) of (n, L, C) inliers: candidate k clips at ``(1 - k / candidates)`` of
    the position's max |x| for k = 0..candidates-1 (OuroMamba's grid, plus min-max itself), Lp error."""
    _check(p, candidates)
    if x.dim() != 3:
        raise ValueError(f"per-token initialisation expects (n, L, C) activations; got shape {tuple(x.shape)}")
    x = x.detach().float()
    _, qmax = int_range(bits, True, True)
    absmax = x.abs().amax(dim=(0, 2)).clamp(min=1e-8)
    best = absmax / qmax
    best_err = torch.full_like(absmax, float("inf"))
    for k in range(candidates):
        step = (absmax * (1 - k / candidates) / qmax).clamp(min=1e-8)
        err = (x - fake_quantize(x, step.view(1, -1, 1), None, -qmax, qmax)).abs().pow(p).mean(dim=(0, 2))
        better = err < best_err
        best = torch.where(better, step, best)
        best_err = torch.where(better, err, best_err)
    return best
