"""OuroMamba's inlier/outlier extractor (the methods specification §4.3): static per-token inlier scales plus
outlier channels detected per sample at run time, refreshed every ``refresh`` tokens in scan order.

For a tensor (b, L, C) walked in scan order and cut into windows of ``refresh`` tokens (the last one zero-padded;
padding sits after every real token in scan order, so it never influences them), each sample starts every window
with an empty outlier set O. At step t:

1. ``x_I = x_t`` with the channels in O zeroed.
2. If ``x_I`` leaves the range the static inlier grid can represent at t (``S_I(t)·[qmin - z, qmax - z]``; for the
   symmetric grid that is the paper's ``max|x_I| / Q_I > S_I(t)``), the sample detects new outliers:
   ``θ = mean_c |x_I| + σ · std_c |x_I|`` and every channel with ``|x_I| > θ`` joins O. The official code triggers
   the detection for the whole batch when any sample exceeds its scale; here each sample decides alone, so a
   sample's output does not depend on the other images in its batch.
3. Inliers: static per-token quantization of ``x_I`` (outlier channels are exact zeros on the grid).
4. Outliers ``x_O = x_t ⊙ 1_O``: 8 bit symmetric with one dynamic absmax scale per (sample, token), as the official
   code (the paper's kernel uses one per outlier channel), or fp16 (``outlier_bits=16``).
5. ``x̂ = x̂_I + x̂_O``; O persists to the end of the window.

``static_mask`` replaces the detection by a fixed channel list (the "static outliers" ablation).

The official code's Δ quantizer (``Q_Act_d``) differs in two places, available here as options:
``trigger="range"`` starts the detection when the inliers' span ``(max_c x_I - min_c x_I) / (qmax - qmin)`` exceeds
the static step (step 2 above tests where the values lie; this tests only their spread), and
``outlier_affine=True`` quantizes 8-bit outliers on an affine ``[0, 255]`` grid (scale ``(max - min) / 255`` over the
token's outlier vector, zeros of the inlier channels included, and an integer zero point) instead of step 4's
symmetric one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .quant import round_ste

TRIGGERS = ("interval", "range")


@dataclass
class OutlierSplit:
    """The extractor's output for (b, L, C) inputs, in token order.

    ``inlier_codes``: integer-valued fp32 codes (b, L, C) of the inliers (outlier channels hold the zero point);
    ``scale`` (1, L, 1) / ``zero`` (1, L, 1) or None: their static per-token grid;
    ``outlier_mask``: bool (b, L, C); ``outlier_values``: fp32 (b, L, C), the quantized outlier values (dequantized),
    zero off the mask.
    """

    inlier_codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    outlier_mask: torch.Tensor
    outlier_values: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        q = self.inlier_codes if self.zero is None else self.inlier_codes - self.zero
        return q * self.scale + self.outlier_values


def channel_std(a: torch.Tensor) -> torch.Tensor:
    """Sample standard deviation over the last axis (keepdim); 0 for a single channel, which has no spread to be an
    outlier against (``Tensor.std`` would give NaN with a warning; every comparison with either is False)."""
    if a.shape[-1] < 2:
        return torch.zeros_like(a[..., :1])
    return a.std(-1, keepdim=True)


def detect_outlier_masks(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, *, refresh: int, sigma: float,
                         reverse: bool, trigger: str = "interval") -> torch.Tensor:
    """Outlier masks (b, L, C) bool of the windowed detection (steps 1-2 and 5 of the module docstring).

    ``lo``/``hi``: (L,) representable inlier range per token position (token order). ``trigger``: ``"interval"``
    (a value outside ``[lo, hi]``) or ``"range"`` (the span ``max - min`` over channels wider than ``hi - lo``)."""
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {TRIGGERS}; got {trigger!r}")
    x = x.detach().float()
    if reverse:
        x, lo, hi = x.flip(1), lo.flip(0), hi.flip(0)
    b, length, c = x.shape
    windows = -(-length // refresh)
    pad = windows * refresh - length
    xw = F.pad(x, (0, 0, 0, pad)).view(b, windows, refresh, c)
    low = F.pad(lo.detach().float(), (0, pad), value=float("-inf")).view(windows, refresh)
    high = F.pad(hi.detach().float(), (0, pad), value=float("inf")).view(windows, refresh)
    mask = torch.zeros(b, windows, c, dtype=torch.bool, device=x.device)
    masks = torch.empty(b, windows, refresh, c, dtype=torch.bool, device=x.device)
    for r in range(refresh):  # the windows are independent: one step per position inside a window
        xt = xw[:, :, r]
        xi = xt.masked_fill(mask, 0.0)
        if trigger == "interval":
            clips = ((xi > high[:, r, None]) | (xi < low[:, r, None])).any(-1, keepdim=True)  # (b, W, 1)
        else:
            clips = (xi.amax(-1, keepdim=True) - xi.amin(-1, keepdim=True)) > (high[:, r] - low[:, r])[:, None]
        if bool(clips.any()):
            a = xi.abs()
            theta = a.mean(-1, keepdim=True) + sigma * channel_std(a)
            mask = mask | ((a > theta) & clips)
        masks[:, :, r] = mask
    masks = masks.view(b, windows * refresh, c)[:, :length]
    return masks.flip(1) if reverse else masks


def extract_outliers(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmin: int, qmax: int, *,
                     refresh: int = 10, sigma: float = 3.0, reverse: bool = False, outlier_bits: int = 8,
                     static_mask: torch.Tensor | None = None, ste: bool = False, trigger: str = "interval",
                     outlier_affine: bool = False) -> OutlierSplit:
    """Splits ``x`` (b, L, C) into static per-token inliers and quantized outliers.

    Args:
        scale: (L,) static inlier scales (may require grad: the split is then differentiable in them with ``ste``).
        zero: (L,) integer zero points (affine grid, e.g. Δ) or None (symmetric).
        qmin, qmax: inlier code range. refresh: window length in tokens. sigma: detection threshold in σ.
        reverse: the scan runs from the last token to the first (backward Vim direction).
        outlier_bits: 8 (symmetric, per (sample, token) absmax) or 16 (fp16 values).
        static_mask: (C,) bool; when given, these channels are the outliers at every token (no detection).
        ste: straight-through rounding (calibration). Without it the rounding passes no gradient (the official
            code's plain ``round()``): the inlier step still gets the codes as its gradient, the input only what
            flows through the 8-bit outliers' dynamic scale or the fp16 outliers.
        trigger, outlier_affine: the official Δ quantizer's detection trigger and outlier grid (module docstring).
    """
    xf = x.float()
    s = scale.float()
    z = zero.float() if zero is not None else None
    if static_mask is not None:
        masks = static_mask.to(torch.bool).view(1, 1, -1).expand_as(xf)
    else:
        zz = z if z is not None else torch.zeros_like(s)
        masks = detect_outlier_masks(xf, s * (qmin - zz), s * (qmax - zz), refresh=refresh, sigma=sigma,
                                     reverse=reverse, trigger=trigger)
    s3 = s.view(1, -1, 1)
    z3 = z.view(1, -1, 1) if z is not None else None
    xi = xf.masked_fill(masks, 0.0)
    r = round_ste(xi / s3) if ste else torch.round(xi / s3)
    codes = (r + z3 if z3 is not None else r).clamp(qmin, qmax)
    xo = xf.masked_fill(~masks, 0.0)
    if outlier_bits == 16:
        xo_hat = xo.half().float()
    elif outlier_bits == 8:
        # the dynamic scale is a constant for the straight-through estimator; without it (official) it carries the
        # only gradient of the outliers
        xs = xo.detach() if ste else xo
        if outlier_affine:
            top, bottom = xs.amax(-1, keepdim=True), xs.amin(-1, keepdim=True)
            so = ((top - bottom) / 255.0).clamp_min(1e-8)
            zo = torch.round(-bottom / so).detach()
            ro = round_ste(xo / so) if ste else torch.round(xo / so)
            xo_hat = ((ro + zo).clamp(0, 255) - zo) * so
        else:
            so = (xs.abs().amax(-1, keepdim=True) / 127.0).clamp_min(1e-8)
            ro = round_ste(xo / so) if ste else torch.round(xo / so)
            xo_hat = ro.clamp(-127, 127) * so
    else:
        raise ValueError(f"outlier_bits must be 8 or 16; got {outlier_bits!r}")
    return OutlierSplit(codes, s3, z3, masks, xo_hat)


__all__ = ["TRIGGERS", "OutlierSplit", "channel_std", "detect_outlier_masks", "extract_outliers"]
