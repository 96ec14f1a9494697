"""OuroMamba-Quant (Ramachandran et al., ICCV 2025, stage 2; the methods specification §4.3) on the shared
block-wise engine (:mod:`optimum_vim.calibration.blockwise`), registered as recipe ``"ouromamba"``.

What is quantized, per block:

* the six block linears: weights 4-bit symmetric per output channel (Lp(2.4) grid init, learned step); inputs
  through the mixed-precision extractor (``QActivation`` granularity ``dynamic_outlier``): a static per-token inlier
  step (learned) and outlier channels detected per sample at inference, refreshed every ``refresh`` tokens in scan
  order, outliers in 8 bit (W4A4O8) or fp16 (W4A8O16);
* the S6 tensors of **each** scan direction: the scan input u, B and C (symmetric, ``outlier_sigma``) and Δ
  (asymmetric, ``delta_sigma`` = 4σ), through the same extractor (QSelectiveScan's input quantizers).

Calibration: the set is ``num_synthetic`` OuroMamba-Gen images (:mod:`.generation`), or the config's
``calibration_dataset`` when one is given (the "real data" ablation). Per block (engine): static inlier steps are
initialised after removing the outliers of the calibration tensor with the same windowed σ rule (detection at every
token), by the Lp(2.4) search over ``candidates`` clipping ratios per token position (Δ: the shared two-sided affine
search); then the weight, linear-input and S6 inlier steps train ``epochs`` epochs with AdamW (lr 5e-4, weight
decay 1e-5, grad clip 2.0) on the block's cosine loss (``loss="nmse"``: the normalised squared error instead), no
smoothing.

Differences from the official code (``ICCV-OuroMamba@562d7e3``), each switchable unless marked fixed, each with an
ablation row in ``benchmarks/accuracy.py``; ``recipe_args={"preset": "paper"}`` sets every switch to the official side
(the paper-faithful configuration; explicit options that contradict it are refused):

* ``delta_before_softplus`` (default False): we quantize Δ where the scan reads it, after softplus; the official code
  quantizes ``dt_proj``'s output (bias included) and applies softplus inside the scan kernel. True puts the Δ
  extractor on the softplus module's input (a ``QOutput`` with only an input quantizer).
* ``quantize_scan_u`` (default True): we quantize the scan input u; the official code quantizes only x_proj's copy of
  it (x_proj's input quantizer) and hands the scan u in float. False reproduces that.
* ``delta_outliers`` (default ``"interval"``): our Δ extractor starts a detection when an inlier leaves the static
  grid and keeps 8-bit outliers on the symmetric absmax/127 grid of every other tensor; the official ``Q_Act_d``
  triggers when the inliers' span ``(max - min) / (2^b - 1)`` exceeds the step and quantizes outliers on an affine
  [0, 255] grid (``"range"``; :mod:`optimum_vim.primitives.outliers`).
* ``calibration_threshold`` (default ``"inliers"``): before the inlier grid search we remove outliers with the
  run-time rule, θ from the values not yet flagged in the window; the official initialisation takes θ from the raw
  |x| of each token and ORs the flags over the window (``"raw"``).
* ``widen_to_zero`` (default ``"candidates"``): Δ's affine grid search widens every candidate to include 0 before
  scoring it; the official one widens only the winner (``"winner"``, as PTQ4VM's option).
* ``step_training`` (default ``"ste"``): our step learning uses straight-through rounding and trains the steps of
  every block linear. The official loop does not train "the linears' steps": its activation quantizers round with a
  plain ``round()`` (no straight-through estimator, so the input of a quantizer gets gradient only through its
  outliers), x_proj / dt_proj of both directions sit inside a custom autograd function that returns them no gradient,
  and its weight-step optimiser group matches names ending in ``proj.s`` (missing ``_b``). What trains there is
  out_proj's weight and input steps, and in_proj's from the little gradient that leaks through out_proj's input
  outliers. ``"official"`` reproduces that: plain rounding in the activation quantizers, only in_proj's and
  out_proj's steps in the optimiser, S6 steps frozen.
* ``train_scan_steps`` (default None: on at 4-bit activations, off at 8): the S6 inlier steps (u, Δ, B, C of each
  direction) learn beside the linears' steps; the official loop leaves them at their grid init (``False``).
  Measured on the fixture (128 real images, full test split): W4A4O8 +0.66 dB logit SQNR and +0.5 points agreement;
  W4A8O16 -1.9 dB (AdamW's lr-sized moves are large against 8-bit steps), hence off there (benchmarks/RESULTS.md).
* OuroMamba-Gen (:mod:`.generation`): ``gen_patching`` (attention vectors, ours, or the hidden states as the official
  ``state_fusion``) and the image priors ``gen_jitter`` / ``gen_flip`` / ``gen_tv_weight`` (ours; 0 / False / 0 is the
  paper's loss alone).
* Fixed (no switch): each scan direction has its own u / Δ / B / C quantizers (the official code uses one set per
  block for both directions, so one per-token scale serves tensors walked in opposite orders); each sample detects its
  own outliers (the official code triggers the detection for the whole batch); A and D stay float (the official code
  also passes them through extractor quantizers; they are parameters, constant per channel); the hidden state is
  float (the official fast path does not quantize it either).
* ``dynamic_outliers=False`` (the "static outliers" ablation) flags, per tensor, the channels whose summed |x| over
  the calibration set exceeds mean + 4σ over channels (the official optional list) and keeps them in outlier precision
  at every token.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...calibration.blockwise import BlockContext, SelectableBlockLoss, calibrate_blockwise, check_block_loss
from ...calibration.fakequant import FakeQuantLinear, LearnedWeightQuantizer
from ...calibration.lp_init import WIDEN_TO_ZERO, lp_token_affine, lp_token_symmetric, lp_weight_scale
from ...primitives import int_range
from ...primitives.outliers import TRIGGERS, detect_outlier_masks, extract_outliers
from ..base import BLOCK_LINEARS, LayerPlan, QuantPlan, Recipe, layer_overrides, register_recipe, select_linears
from .generation import PATCHINGS

logger = logging.getLogger(__name__)

_MIN_STEP = 1e-8
_REVERSE_LINEARS = ("x_proj_b", "dt_proj_b")  # run on the backward scan's tensors: their scan order is reversed
_SCAN_INPUTS = {"u": 0, "delta": 1, "B": 3, "C": 4}  # positional inputs of VimSelectiveScan.forward
CALIBRATION_THRESHOLDS = ("inliers", "raw")
STEP_TRAINING = ("ste", "official")
_OFFICIAL_TRAINED = ("in_proj", "out_proj")  # the linears whose steps the official loop's gradients reach


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class OuroMambaArgs:
    """Options of the OuroMamba recipe (``ViMQuantizationConfig(recipe="ouromamba", recipe_args=...)``)."""

    num_synthetic: int = 128  # OuroMamba-Gen images (paper: 128)
    gen_iterations: int = 1000  # Adam steps per synthetic image (paper: 1000)
    patch_size: int = 5  # p of the Δ-weighted p x p state patching (paper's best: 5)
    positives: int = 12  # InfoNCE positives per anchor patch (paper: top 12)
    gen_lr: float = 0.1  # [open] Adam learning rate on the pixels
    contrastive_weight: float = 1.0  # 0: the "class loss only" ablation (no InfoNCE)
    # [open] image priors of the generation, not in the paper (generation.generate_calibration_images): random roll
    # of up to gen_jitter pixels (None: half the patch stride), left-right mirroring, total-variation weight;
    # gen_jitter=0, gen_flip=False, gen_tv_weight=0 is the paper's loss alone
    gen_jitter: int | None = None
    gen_flip: bool = True
    gen_tv_weight: float = 0.05
    refresh: int = 10  # tokens per outlier window (paper: 10)
    outlier_sigma: float = 3.0  # detection threshold of u, B, C and the linear inputs
    delta_sigma: float = 4.0  # detection threshold of Δ (official: 4σ)
    outlier_bits: int | None = None  # 8 | 16; None: 8 at A4 (W4A4O8), 16 at A8 (W4A8O16)
    dynamic_outliers: bool = True  # False: static outlier list (ablation)
    quantize_scan: bool = True  # the S6 tensors u, Δ, B, C of both directions
    # the S6 inlier steps (u, Δ, B, C) learn beside the linears' steps (deviation: the official training loop leaves
    # them at their grid init; False reproduces that). None: on at 4-bit activations, off at 8 bits (measured: +0.7 dB
    # at A4, -1.9 dB at A8, where Adam's lr-sized moves are large against the 16x finer 8-bit steps)
    train_scan_steps: bool | None = None
    epochs: int = 10  # block-wise step learning (paper: 10)
    lr: float = 5e-4  # weight and activation steps (official: 5e-4 both)
    batch_size: int | None = None  # images per optimiser step; None: the whole set (one step per epoch)
    weight_decay: float = 1e-5
    grad_clip: float | None = 2.0
    p_norm: float = 2.4
    candidates: int = 100
    # block loss of the step learning: "cosine" (the official mean 1 - cos) or "nmse" (normalised squared error, not
    # in the paper; see calibration.blockwise.nmse_block_loss)
    loss: str = "cosine"
    # --- where we differ from the official code, each switchable (module docstring; ablation rows in
    # benchmarks/accuracy.py); preset "paper" sets every one to the official side
    # Δ quantized after softplus (ours, the scan's input) or dt_proj's output, bias included, before softplus (official)
    delta_before_softplus: bool = False
    quantize_scan_u: bool = True  # False: the scan reads u in float (official: only x_proj's copy of u is quantized)
    # Δ's extractor: "interval" (detection when an inlier leaves the grid; symmetric 8-bit outliers, as every other
    # tensor) or "range" (official Q_Act_d: when the inliers' (max - min) / (2^b - 1) exceeds the step; affine
    # [0, 255] outliers)
    delta_outliers: str = "interval"
    # outliers removed before the inlier grid search: "inliers" (θ from the inliers left at each token, the run-time
    # rule) or "raw" (official: θ = mean + σ std of the raw |x| at each token, flags accumulated over the window)
    calibration_threshold: str = "inliers"
    widen_to_zero: str = "candidates"  # Δ's affine grid init, as PTQ4VM's option (official: "winner")
    # OuroMamba-Gen: "attention" patches the class-token attention vectors (ours); "state" patches the hidden states
    # as the official state_fusion and reads them out towards the class token (generation.py)
    gen_patching: str = "attention"
    # "ste": straight-through rounding, every linear's steps train; "official": what the official loop's gradients
    # reach: plain round() in the activation quantizers (no straight-through estimator) and only in_proj's and
    # out_proj's steps train (its custom autograd function gives x_proj / dt_proj of both directions none)
    step_training: str = "ste"
    preset: str | None = None  # "paper": the configuration closest to the official code (PRESETS)

    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {
            "gen_jitter": 0, "gen_flip": False, "gen_tv_weight": 0.0, "gen_patching": "state",
            "train_scan_steps": False, "delta_before_softplus": True, "quantize_scan_u": False,
            "delta_outliers": "range", "calibration_threshold": "raw", "widen_to_zero": "winner",
            "step_training": "official", "loss": "cosine",
        },
    }

    def validate(self) -> None:
        for name in ("num_synthetic", "positives", "refresh", "candidates"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"ouromamba {name} must be a positive int; got {v!r}")
        for name in ("gen_iterations", "epochs"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ValueError(f"ouromamba {name} must be an int >= 0; got {v!r}")
        if self.gen_jitter is not None and (not _is_int(self.gen_jitter) or self.gen_jitter < 0):
            raise ValueError(f"ouromamba gen_jitter must be an int >= 0 or None (half the patch stride); got "
                             f"{self.gen_jitter!r}")
        if not _is_int(self.patch_size) or self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ValueError(f"ouromamba patch_size must be an odd positive int (paper: 5); got {self.patch_size!r}")
        for name in ("gen_lr", "outlier_sigma", "delta_sigma", "lr", "p_norm"):
            v = getattr(self, name)
            if not _is_number(v) or not v > 0:
                raise ValueError(f"ouromamba {name} must be a positive number; got {v!r}")
        for name in ("contrastive_weight", "gen_tv_weight"):
            v = getattr(self, name)
            if not _is_number(v) or v < 0:
                raise ValueError(f"ouromamba {name} must be a number >= 0; got {v!r}")
        if self.outlier_bits not in (None, 8, 16):
            raise ValueError(f"ouromamba outlier_bits must be 8 (W4A4O8), 16 (W4A8O16) or None; got "
                             f"{self.outlier_bits!r}")
        for name in ("dynamic_outliers", "quantize_scan", "gen_flip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ouromamba {name} must be true or false; got {getattr(self, name)!r}")
        if self.train_scan_steps is not None and not isinstance(self.train_scan_steps, bool):
            raise ValueError(f"ouromamba train_scan_steps must be true, false or None (on at 4-bit activations); got "
                             f"{self.train_scan_steps!r}")
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size < 1):
            raise ValueError(f"ouromamba batch_size must be a positive int or None; got {self.batch_size!r}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"ouromamba weight_decay must be a number >= 0; got {self.weight_decay!r}")
        if self.grad_clip is not None and (not _is_number(self.grad_clip) or not self.grad_clip > 0):
            raise ValueError(f"ouromamba grad_clip must be a positive number or None; got {self.grad_clip!r}")
        check_block_loss(self.loss, "ouromamba")
        for name, allowed in (("delta_outliers", TRIGGERS), ("calibration_threshold", CALIBRATION_THRESHOLDS),
                              ("widen_to_zero", WIDEN_TO_ZERO), ("gen_patching", PATCHINGS),
                              ("step_training", STEP_TRAINING)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ouromamba {name} must be one of {allowed}; got {getattr(self, name)!r}")
        for name in ("delta_before_softplus", "quantize_scan_u"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ouromamba {name} must be true or false; got {getattr(self, name)!r}")
        if self.step_training == "official" and self.train_scan_steps:
            raise ValueError("ouromamba step_training='official' trains only in_proj's and out_proj's steps (what the "
                             "official loop's gradients reach): it cannot be combined with train_scan_steps=True")


# ---------------------------------------------------------------------------------------------------------------
# static inlier-scale initialisation
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
    flags = aw > aw.mean(-1, keepdim=True) + sigma * aw.std(-1, keepdim=True)
    masks = flags.cumsum(2).bool().view(n, windows * refresh, c)[:, :length]
    return masks.flip(1) if reverse else masks


@torch.no_grad()
def static_outlier_channels(x: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """The static list (ablation): channels whose summed |x| over (n, L) exceeds mean + σ·std over channels."""
    total = x.detach().float().abs().sum(dim=(0, 1))
    return total > total.mean() + sigma * total.std()


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
    def export(self, channels: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        spec = {"granularity": "dynamic_outlier", "bits": self.bits, "symmetric": self.symmetric,
                "length": self.step.numel(), "outlier_bits": self.outlier_bits, "refresh": self.refresh,
                "outlier_sigma": self.sigma, "reverse": self.reverse, "static_outliers": self.static_mask is not None}
        if self.trigger != "interval":
            spec["outlier_trigger"] = self.trigger
        if self.outlier_affine:
            spec["outlier_affine"] = True
        if channels is not None or self.static_mask is not None:
            spec["channels"] = int(channels if channels is not None else self.static_mask.numel())
        tensors = {"scale": self.step.clamp(min=_MIN_STEP).detach().float().contiguous()}
        if self.zero_point is not None:
            tensors["zero_point"] = self.zero_point.to(torch.int32).contiguous()
        if self.static_mask is not None:
            tensors["outlier_channels"] = self.static_mask.to(torch.uint8).contiguous()
        return spec, tensors


class _ChannelsExport(nn.Module):
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
        return LayerPlan(spec={"type": "output", "inner": "softplus", "input": spec, "output": None},
                         tensors={f"input_quantizer.{k}": v for k, v in tensors.items()})


class FakeQuantScan(nn.Module):
    """Training stand-in of a QSelectiveScan: the float scan of one direction behind outlier-aware fake quantizers
    of u, Δ, B and C (the direction's own; ``None`` leaves an input in float)."""

    def __init__(self, scan: nn.Module, quantizers: dict[str, LearnedOutlierActQuantizer | None], d_state: int):
        super().__init__()
        self.scan = scan
        self.reverse = bool(scan.reverse)
        self.d_state = d_state
        self.quantizers = nn.ModuleDict({k: v for k, v in quantizers.items() if v is not None})

    def forward(self, u, delta, A, B, C, D=None, z=None):
        args = {"u": u, "delta": delta, "B": B, "C": C}
        for name, q in self.quantizers.items():
            args[name] = q(args[name])
        return self.scan(args["u"], args["delta"], A, args["B"], args["C"], D, z)

    @torch.no_grad()
    def export(self, length: int, channels: int) -> LayerPlan:
        spec = {"type": "scan", "reverse": self.reverse, "length": length, "channels": channels,
                "d_state": self.d_state, "u": None, "delta": None, "B": None, "C": None, "y": None, "state": None}
        tensors = {}
        for name, q in self.quantizers.items():
            width = channels if name in ("u", "delta") else self.d_state
            spec[name], t = q.export(width)
            tensors.update({f"{name}_quantizer.{k}": v for k, v in t.items()})
        return LayerPlan(spec=spec, tensors=tensors)


# ---------------------------------------------------------------------------------------------------------------
# the recipe
@register_recipe
class OuroMambaRecipe(SelectableBlockLoss, Recipe):
    """OuroMamba: data-free calibration (OuroMamba-Gen) + dynamic outlier-aware mixed precision (see module doc)."""

    name = "ouromamba"
    Args = OuroMambaArgs
    weight_bits = (4,)
    act_bits = (4, 8)
    default_calibration_samples = 128

    @classmethod
    def check_bits(cls, weight_bits, act_bits) -> None:
        if weight_bits != 4:
            raise ValueError(
                f"recipe 'ouromamba' quantizes weights to 4 bits (symmetric per output channel: W4A4O8 / W4A8O16); got "
                f"weight_bits={weight_bits!r}. Use weight_bits=4 with act_bits 4 or 8, or recipe 'rtn' / 'ptq4vm' for "
                "other weight widths."
            )
        if act_bits not in cls.act_bits:
            raise ValueError(f"recipe 'ouromamba' supports act_bits 4 (W4A4O8) or 8 (W4A8O16); got {act_bits!r}")

    @classmethod
    def check_config(cls, config) -> None:
        if config.weight_group_size is not None:
            raise ValueError("recipe 'ouromamba' uses one weight scale per output channel; weight_group_size must be "
                             "None")

    @classmethod
    def requires_data(cls, config) -> bool:
        # data-free: it generates its calibration set unless real images are passed (the real-data ablation)
        return config.calibration_dataset is not None

    @classmethod
    def uses_image_processor(cls, config) -> bool:
        return True  # real images are processed with it; synthetic pixels are kept inside its valid range

    def _train_scan_steps(self, act_bits: int) -> bool:
        flag = self.args.train_scan_steps
        if self.args.step_training == "official":
            return False  # the official loop leaves the S6 steps at their grid init
        return act_bits <= 4 if flag is None else flag

    def _outlier_bits(self, act_bits: int) -> int:
        return self.args.outlier_bits or (8 if act_bits <= 4 else 16)

    # ---------------------------------------------------------------------------------------------- calibration
    def calibrate(self, model, batches) -> QuantPlan:
        from .generation import generate_calibration_images

        cfg, a = self.config, self.args
        info = {}
        if batches:
            pixels = torch.cat(list(batches))
            info["calibration_real_images"] = pixels.shape[0]
        else:
            if self.image_processor is None:
                logger.warning(
                    "ouromamba: no image processor (none in the config, none saved next to the checkpoint): the "
                    "synthetic pixels are not kept inside the valid normalised range; pass "
                    "ViMQuantizationConfig(image_processor=...) to match the CLI"
                )
            pixels = generate_calibration_images(
                model, a.num_synthetic, iterations=a.gen_iterations, patch_size=a.patch_size, positives=a.positives,
                lr=a.gen_lr, contrastive_weight=a.contrastive_weight, jitter=a.gen_jitter, flip=a.gen_flip,
                tv_weight=a.gen_tv_weight, patching=a.gen_patching, processor=self.image_processor, seed=cfg.seed,
            )
            info["calibration_source"] = (
                f"calibrated on {pixels.shape[0]} synthetic images (OuroMamba-Gen, {a.gen_iterations} iterations, "
                "data-free)"
            )
        skip = cfg.modules_to_not_convert
        self._linears = {}
        for name in select_linears(model, BLOCK_LINEARS, skip):
            over = layer_overrides(name, cfg.overrides)
            if over.get("skip"):
                continue
            self.check_bits(over.get("weight_bits", cfg.weight_bits), over.get("act_bits", cfg.act_bits))
            self._linears[name] = over.get("act_bits", cfg.act_bits)
        from ...models.vim.modeling_vim import VimSelectiveScan

        self._scans = {} if not a.quantize_scan else {
            n: cfg.act_bits for n, m in model.named_modules()
            if isinstance(m, VimSelectiveScan) and not layer_overrides(n, cfg.overrides).get("skip")
            and not _skipped(n, skip)
        }
        if not self._linears and not self._scans:
            return QuantPlan(recipe=self.name)
        log: list[dict] = []
        layers = calibrate_blockwise(model, pixels.float(), self, seed=cfg.seed, desc="ouromamba", log=log)
        info["blocks"] = log
        return QuantPlan(recipe=self.name, layers=layers, info=info)

    def _rel(self, ctx: BlockContext, table: dict) -> dict:
        start = ctx.name + "."
        return {n[len(start):]: v for n, v in table.items() if n.startswith(start)}

    @torch.no_grad()
    def _capture_scan_inputs(self, ctx: BlockContext, rel_scans) -> dict[str, dict[str, torch.Tensor]]:
        hidden, residual = ctx.inputs("float")
        got = {n: {k: [] for k in _SCAN_INPUTS} for n in rel_scans}
        handles = []
        for n in rel_scans:
            def hook(_m, args, n=n):
                for k, i in _SCAN_INPUTS.items():
                    got[n][k].append(args[i].detach().float())
            handles.append(ctx.block.get_submodule(n).register_forward_pre_hook(hook))
        try:
            for i in range(0, hidden.shape[0], 64):
                ctx.block(hidden[i:i + 64], None if residual is None else residual[i:i + 64])
        finally:
            for h in handles:
                h.remove()
        return {n: {k: torch.cat(v) for k, v in d.items()} for n, d in got.items()}

    def _act_quantizer(self, x: torch.Tensor, bits: int, *, symmetric: bool, sigma: float, reverse: bool,
                       trainable: bool, delta: bool = False) -> LearnedOutlierActQuantizer:
        a = self.args
        if a.dynamic_outliers:
            masks = calibration_outlier_masks(x, a.refresh, sigma, reverse, a.calibration_threshold)
            static = None
        else:
            static = static_outlier_channels(x)
            masks = static.view(1, 1, -1).expand_as(x)
        inliers = x.masked_fill(masks, 0.0)
        zero = None
        if symmetric:
            step = lp_token_symmetric(inliers, bits, a.p_norm, a.candidates)
        else:
            step, zero = lp_token_affine(inliers, bits, a.p_norm, a.candidates, widen=a.widen_to_zero)
        official_delta = delta and a.delta_outliers == "range"
        return LearnedOutlierActQuantizer(step, bits, zero_point=zero, refresh=a.refresh, sigma=sigma, reverse=reverse,
                                          outlier_bits=self._outlier_bits(bits), static_mask=static,
                                          trainable=trainable, trigger=a.delta_outliers if delta else "interval",
                                          outlier_affine=official_delta, ste=a.step_training == "ste")

    def _trains(self, rel: str) -> bool:
        """Whether the steps of the linear ``rel`` train (all of them, or what the official loop's gradients reach)."""
        return self.args.step_training == "ste" or rel.rsplit(".", 1)[-1] in _OFFICIAL_TRAINED

    @torch.no_grad()
    def prepare_block(self, ctx: BlockContext):
        a = self.args
        linears, scans = self._rel(ctx, self._linears), self._rel(ctx, self._scans)
        student = copy.deepcopy(ctx.block).requires_grad_(False)
        inputs = ctx.capture(list(linears), stream="float") if linears else {}
        for rel, act_bits in linears.items():
            linear = ctx.block.get_submodule(rel)
            w = linear.weight.detach().float()
            wq = LearnedWeightQuantizer(lp_weight_scale(w, 4, a.p_norm, a.candidates), 4)
            wq.step.requires_grad_(self._trains(rel))
            reverse = rel.rsplit(".", 1)[-1] in _REVERSE_LINEARS
            aq = self._act_quantizer(inputs[rel].float(), act_bits, symmetric=True, sigma=a.outlier_sigma,
                                     reverse=reverse, trainable=self._trains(rel))
            student.set_submodule(rel, FakeQuantLinear(linear, wq, _ChannelsExport(aq, linear.in_features)))
        captured = self._capture_scan_inputs(ctx, list(scans)) if scans else {}
        # Δ before softplus (official): the quantizer sits on the softplus module's input, dt_proj's output
        softplus = {rel: _softplus_of(rel) for rel in scans} if a.delta_before_softplus else {}
        pre = ctx.capture(list(softplus.values()), stream="float") if softplus else {}
        for rel, bits in scans.items():
            scan = ctx.block.get_submodule(rel)
            skip = {"delta"} if softplus else set()
            if not a.quantize_scan_u:
                skip.add("u")
            quantizers = {name: self._s6_quantizer(name, x, bits, bool(scan.reverse))
                          for name, x in captured[rel].items() if name not in skip}
            student.set_submodule(rel, FakeQuantScan(copy.deepcopy(scan), quantizers, ctx.model_config.d_state))
            if softplus:
                x = pre[softplus[rel]].float()
                delta = self._s6_quantizer("delta", x, bits, bool(scan.reverse))
                student.set_submodule(softplus[rel], FakeQuantSoftplus(delta, x.shape[-1]))
        return student

    def _s6_quantizer(self, name: str, x: torch.Tensor, bits: int, reverse: bool) -> LearnedOutlierActQuantizer:
        """The extractor of one S6 tensor (u, B, C symmetric at ``outlier_sigma``; Δ affine at ``delta_sigma``)."""
        a, is_delta = self.args, name == "delta"
        return self._act_quantizer(x, bits, symmetric=not is_delta, reverse=reverse,
                                   trainable=self._train_scan_steps(bits),
                                   sigma=a.delta_sigma if is_delta else a.outlier_sigma, delta=is_delta)

    def block_optimizer(self, ctx: BlockContext, student):
        a = self.args
        if a.epochs == 0:
            return None
        params = []
        for rel in self._rel(ctx, self._linears):
            for group in student.get_submodule(rel).trainable().values():
                params.extend(group)
        for rel in self._rel(ctx, self._scans):
            params.extend(p for p in student.get_submodule(rel).quantizers.parameters() if p.requires_grad)
            if a.delta_before_softplus:
                params.extend(p for p in student.get_submodule(_softplus_of(rel)).parameters() if p.requires_grad)
        if not params:
            return None
        return torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)

    @property
    def grad_clip(self):
        return self.args.grad_clip

    def block_schedule(self, ctx: BlockContext) -> tuple[int, int]:
        batch = min(self.args.batch_size or ctx.num_samples, ctx.num_samples)
        return self.args.epochs * -(-ctx.num_samples // batch), batch

    def finalize_block(self, ctx: BlockContext, student) -> dict[str, LayerPlan]:
        cfg = ctx.model_config
        plans = {f"{ctx.name}.{rel}": student.get_submodule(rel).export() for rel in self._rel(ctx, self._linears)}
        for rel in self._rel(ctx, self._scans):
            plans[f"{ctx.name}.{rel}"] = student.get_submodule(rel).export(cfg.sequence_length,
                                                                           cfg.intermediate_size)
            if self.args.delta_before_softplus:
                plans[f"{ctx.name}.{_softplus_of(rel)}"] = student.get_submodule(_softplus_of(rel)).export()
        return plans


def _softplus_of(scan: str) -> str:
    """The softplus module feeding Δ to the scan ``scan`` (``mixer.ssm_b`` -> ``mixer.softplus_b``)."""
    head, leaf = scan.rsplit(".", 1)
    return f"{head}.{leaf.replace('ssm', 'softplus')}"


def _skipped(name: str, skip) -> bool:
    from ..base import is_skipped

    return is_skipped(name, skip)


__all__ = ["FakeQuantScan", "FakeQuantSoftplus", "LearnedOutlierActQuantizer", "OuroMambaArgs", "OuroMambaRecipe"]
