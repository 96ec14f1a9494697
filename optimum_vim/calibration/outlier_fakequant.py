"""Outlier-aware fake-quant stand-ins (OuroMamba's mixed-precision extractor) trained by the block-wise engine.

:class:`LearnedOutlierActQuantizer` computes what a ``dynamic_outlier`` :class:`~optimum_vim.modules.QActivation`
computes (static per-token inlier steps, outliers detected per sample in windows of ``refresh`` tokens in scan order,
kept at ``outlier_bits``) with straight-through rounding, so its inlier steps train; :class:`FakeQuantScan` and
:class:`FakeQuantSoftplus` put such quantizers on a float scan's inputs and on softplus' input. ``export()`` freezes
each into the spec and buffers of the real module. :func:`calibration_outlier_masks` / :func:`static_outlier_channels`
find the outliers of a calibration tensor before the inlier grid search.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.plan import LayerPlan
from ..modules.spec import ActivationSpec, OutputSpec, ScanSpec
from ..primitives import int_range
from ..primitives.outliers import channel_std, detect_outlier_masks, extract_outliers

_MIN_STEP = 1e-8


@torch.no_grad()
def calibration_outlier_masks(x: torch.Tensor, refresh: int, sigma: float, reverse: bool,
                              threshold: str = "inliers") -> torch.Tensor:
    """Outliers of a calibration tensor (n, L, C) removed before the inlier grid search, windows of ``refresh`` tokens
    in scan order, detection at every token (there is no static scale to trigger it yet).

    ``threshold="inliers"``: the run-time rule, θ from the values not yet flagged in the window;
    ``"raw"``: the official initialisation, θ = mean + σ·std of the raw |x| of each token, flags accumulated (OR)
    over the window."""
    if threshold == "inliers":
        zeros = torch.zeros(x.shape[1], device=x.device)
        return detect_outlier_masks(x, zeros, zeros, refresh=refresh, sigma=sigma, reverse=reverse)
    a = x.detach().float().abs()
    a = a.flip(1) if reverse else a
    n, length, c = a.shape
    windows = -(-length // refresh)
    pad = windows * refresh - length
    aw = F.pad(a, (0, 0, 0, pad)).view(n, windows, refresh, c)
    flags = aw > aw.mean(-1, keepdim=True) + sigma * channel_std(aw)
    masks = flags.cumsum(2).bool().view(n, windows * refresh, c)[:, :length]
    return masks.flip(1) if reverse else masks


@torch.no_grad()
def static_outlier_channels(x: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """The static list (ablation): channels whose summed |x| over (n, L) exceeds mean + σ·std over channels."""
    total = x.detach().float().abs().sum(dim=(0, 1))
    return total > total.mean() + sigma * channel_std(total).squeeze(-1)


class LearnedOutlierActQuantizer(nn.Module):
    """Training stand-in of a ``dynamic_outlier`` QActivation: a trainable static inlier step per token position
    ``step (L,)`` (zero points frozen), the extractor with straight-through rounding; ``export()`` gives the spec."""

    def __init__(self, step: torch.Tensor, bits: int, *, zero_point: torch.Tensor | None = None, refresh: int,
                 sigma: float, reverse: bool, outlier_bits: int, static_mask: torch.Tensor | None = None,
                 trainable: bool = True, trigger: str = "interval", outlier_affine: bool = False, ste: bool = True):
        super().__init__()
        self.bits, self.symmetric = bits, zero_point is None
        self.qmin, self.qmax = int_range(bits, self.symmetric, True)
        self.refresh, self.sigma, self.reverse, self.outlier_bits = refresh, float(sigma), reverse, outlier_bits
        self.trigger, self.outlier_affine, self.ste = trigger, outlier_affine, ste
        self.step = nn.Parameter(step.detach().float().clone(), requires_grad=trainable)
        self.register_buffer("zero_point", None if zero_point is None else zero_point.detach().float().round())
        self.register_buffer("static_mask", None if static_mask is None else static_mask.detach().bool())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = extract_outliers(x, self.step.clamp(min=_MIN_STEP), self.zero_point, self.qmin, self.qmax,
                                 refresh=self.refresh, sigma=self.sigma, reverse=self.reverse,
                                 outlier_bits=self.outlier_bits, static_mask=self.static_mask, ste=self.ste,
                                 trigger=self.trigger, outlier_affine=self.outlier_affine)
        return split.dequantize().to(x.dtype)

    @torch.no_grad()
    def export(self, channels: int | None = None) -> tuple[ActivationSpec, dict[str, torch.Tensor]]:
        if channels is None and self.static_mask is not None:
            channels = self.static_mask.numel()
        spec = ActivationSpec(self.bits, "dynamic_outlier", symmetric=self.symmetric, length=self.step.numel(),
                              channels=None if channels is None else int(channels), outlier_bits=self.outlier_bits,
                              refresh=self.refresh, outlier_sigma=self.sigma, reverse=self.reverse,
                              static_outliers=self.static_mask is not None, outlier_trigger=self.trigger,
                              outlier_affine=self.outlier_affine)
        tensors = {"scale": self.step.clamp(min=_MIN_STEP).detach().float().contiguous()}
        if self.zero_point is not None:
            tensors["zero_point"] = self.zero_point.to(torch.int32).contiguous()
        if self.static_mask is not None:
            tensors["outlier_channels"] = self.static_mask.to(torch.uint8).contiguous()
        return spec, tensors


class ChannelsExport(nn.Module):
    """Wraps a LearnedOutlierActQuantizer so that FakeQuantLinear's ``export()`` records the channel count."""

    def __init__(self, inner: LearnedOutlierActQuantizer, channels: int):
        super().__init__()
        self.inner, self.channels = inner, channels

    def forward(self, x):
        return self.inner(x)

    def export(self):
        return self.inner.export(self.channels)


class FakeQuantSoftplus(nn.Module):
    """Training stand-in of Δ quantized before softplus (the official quantization point: dt_proj's output, bias
    included); exports a QOutput with only an input quantizer."""

    def __init__(self, quantizer: LearnedOutlierActQuantizer, channels: int):
        super().__init__()
        self.quantizer, self.channels = quantizer, channels

    def forward(self, x):
        return F.softplus(self.quantizer(x))

    @torch.no_grad()
    def export(self) -> LayerPlan:
        spec, tensors = self.quantizer.export(self.channels)
        return LayerPlan(spec=OutputSpec("softplus", input=spec),
                         tensors={f"input_quantizer.{k}": v for k, v in tensors.items()})


class FakeQuantScan(nn.Module):
    """Training stand-in of a QSelectiveScan: the float scan of one direction behind outlier-aware fake quantizers
    of u, Δ, B and C (the direction's own; ``None`` leaves an input in float). ``positions``: which positional
    argument of the float scan carries each of them (the family's ``scan_inputs``); ``length`` / ``channels`` /
    ``d_state``: the shapes the exported spec records."""

    def __init__(self, scan: nn.Module, quantizers: dict[str, LearnedOutlierActQuantizer | None], *, reverse: bool,
                 positions: dict[str, int], length: int, channels: int, d_state: int):
        super().__init__()
        self.scan = scan
        self.reverse = bool(reverse)
        self.positions = dict(positions)
        self.length, self.channels, self.d_state = length, channels, d_state
        self.quantizers = nn.ModuleDict({k: v for k, v in quantizers.items() if v is not None})

    def forward(self, *args, **kwargs):
        args = list(args)
        for name, q in self.quantizers.items():
            i = self.positions[name]
            args[i] = q(args[i])
        return self.scan(*args, **kwargs)

    @torch.no_grad()
    def export(self) -> LayerPlan:
        quantizers, tensors = {}, {}
        for name, q in self.quantizers.items():
            width = self.channels if name in ("u", "delta") else self.d_state
            quantizers[name], t = q.export(width)
            tensors.update({f"{name}_quantizer.{k}": v for k, v in t.items()})
        spec = ScanSpec(self.length, self.channels, self.d_state, reverse=self.reverse, **quantizers)
        return LayerPlan(spec=spec, tensors=tensors)


__all__ = ["ChannelsExport", "FakeQuantScan", "FakeQuantSoftplus", "LearnedOutlierActQuantizer",
           "calibration_outlier_masks", "static_outlier_channels"]
