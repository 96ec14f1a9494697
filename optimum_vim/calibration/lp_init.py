"""Lp grid initialisation of step sizes (PTQ4VM and OuroMamba, methods.md §1.2 / §3.3 step 3).

Both searches try a fixed number of clipping ranges and keep, per row or per token position, the one whose fake
quantization minimises ``mean |x - x_hat|^p`` (p = 2.4 in both papers' code). The candidates are evaluated one at a
time so that memory stays at a few copies of the tensor, whatever the number of candidates.
"""

from __future__ import annotations

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


@torch.no_grad()
def lp_token_affine(x: torch.Tensor, bits: int, p: float = 2.4, candidates: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-position asymmetric step and integer zero point, ``(L,)`` each, of activations ``x`` (n, L, C).

    Candidate ``a`` shrinks both ends of the position's [min, max] by ``a * (max - min)``; the range is then widened
    to include 0 and turned into ``scale = (hi - lo) / (2^b - 1)``, ``zero = round(-lo / scale)``.

    Deviation from PTQ4VM's code (named in the README): its grid is ``a = k / 100`` for k = 1..100, so min-max itself
    (a = 0) is never tried and every ``a > 0.5`` inverts the interval (half of the candidates are dead). Here the
    ``candidates`` values are spread over the live half, ``a = i / (2 * candidates)`` for i = 0..candidates-1."""
    _check(p, candidates)
    if x.dim() != 3:
        raise ValueError(f"per-token initialisation expects (n, L, C) activations; got shape {tuple(x.shape)}")
    x = x.detach().float()
    lo0, hi0 = x.amin(dim=(0, 2)), x.amax(dim=(0, 2))
    width = hi0 - lo0
    qmin, qmax = int_range(bits, symmetric=False)
    best_err = torch.full_like(lo0, float("inf"))
    best_scale, best_zero = affine_params(lo0, hi0, bits)
    for i in range(candidates):
        a = i / (2 * candidates)
        scale, zero = affine_params(lo0 + a * width, hi0 - a * width, bits)
        x_hat = fake_quantize(x, scale.view(1, -1, 1), zero.view(1, -1, 1), qmin, qmax)
        err = (x - x_hat).abs().pow(p).mean(dim=(0, 2))
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_err = torch.where(better, err, best_err)
    return best_scale, best_zero


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
