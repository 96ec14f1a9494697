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
import dataclasses
import logging
import math
import typing
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ...calibration.blockwise import BlockContext, BlockLoss, SelectableBlockLoss, calibrate_blockwise
from ...calibration.fakequant import FakeQuantLinear, LearnedWeightQuantizer
from ...calibration.lp_init import WidenToZero, lp_token_affine, lp_token_symmetric, lp_weight_scale
from ...calibration.outlier_fakequant import (
    ChannelsExport,
    FakeQuantScan,
    FakeQuantSoftplus,
    LearnedOutlierActQuantizer,
    calibration_outlier_masks,
    static_outlier_channels,
)
from ...models.family import family_of
from ..base import LayerPlan, QuantPlan, Recipe
from .generation import GenerationOptions

logger = logging.getLogger(__name__)


# OuroMamba-Gen's options (generation.GenerationOptions, declared there once) that the recipe exposes, under their
# recipe_args names: gen_iterations (Adam steps per image, paper 1000), patch_size (p of the Δ-weighted p x p
# patching, paper's best 5), positives (InfoNCE positives, paper 12), gen_lr ([open] Adam lr on the pixels),
# contrastive_weight (0: the "class loss only" ablation) and the [open] image priors not in the paper: gen_jitter
# (random roll, None: half the patch stride), gen_flip, gen_tv_weight (0 / False / 0 is the paper's loss alone)
GEN_ARGS = {"iterations": "gen_iterations", "patch_size": "patch_size", "positives": "positives", "lr": "gen_lr",
            "contrastive_weight": "contrastive_weight", "jitter": "gen_jitter", "flip": "gen_flip",
            "tv_weight": "gen_tv_weight", "patching": "gen_patching"}


def _with_generation_options(cls):
    """Adds the :data:`GEN_ARGS` fields of :class:`GenerationOptions` (type and default) to an Args class, before
    ``@dataclass`` turns it into one."""
    hints = typing.get_type_hints(GenerationOptions)
    for f in dataclasses.fields(GenerationOptions):
        if f.name in GEN_ARGS:
            cls.__annotations__[GEN_ARGS[f.name]] = hints[f.name]
            setattr(cls, GEN_ARGS[f.name], f.default)
    return cls


@dataclass
@_with_generation_options
class OuroMambaArgs:
    """Options of the OuroMamba recipe (``ViMQuantizationConfig(recipe="ouromamba", recipe_args=...)``); the
    generator's options come from :class:`~.generation.GenerationOptions` (:data:`GEN_ARGS`)."""

    num_synthetic: int = 128  # OuroMamba-Gen images (paper: 128)
    refresh: int = 10  # tokens per outlier window (paper: 10)
    outlier_sigma: float = 3.0  # detection threshold of u, B, C and the linear inputs
    delta_sigma: float = 4.0  # detection threshold of Δ (official: 4σ)
    outlier_bits: Literal[8, 16] | None = None  # 8 | 16; None: 8 at A4 (W4A4O8), 16 at A8 (W4A8O16)
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
    loss: BlockLoss = "cosine"
    # --- where we differ from the official code, each switchable (module docstring; ablation rows in
    # benchmarks/accuracy.py); preset "paper" sets every one to the official side
    # Δ quantized after softplus (ours, the scan's input) or dt_proj's output, bias included, before softplus (official)
    delta_before_softplus: bool = False
    quantize_scan_u: bool = True  # False: the scan reads u in float (official: only x_proj's copy of u is quantized)
    # Δ's extractor: "interval" (detection when an inlier leaves the grid; symmetric 8-bit outliers, as every other
    # tensor) or "range" (official Q_Act_d: when the inliers' (max - min) / (2^b - 1) exceeds the step; affine
    # [0, 255] outliers)
    delta_outliers: Literal["interval", "range"] = "interval"
    # outliers removed before the inlier grid search: "inliers" (θ from the inliers left at each token, the run-time
    # rule) or "raw" (official: θ = mean + σ std of the raw |x| at each token, flags accumulated over the window)
    calibration_threshold: Literal["inliers", "raw"] = "inliers"
    widen_to_zero: WidenToZero = "candidates"  # Δ's affine grid init, as PTQ4VM's option (official: "winner")
    # (gen_patching, from GenerationOptions: "attention" patches the class-token attention vectors (ours); "state"
    # patches the hidden states as the official state_fusion and reads them out towards the class token; without a
    # class token, MambaVision, both read the pooled output instead)
    # "ste": straight-through rounding, every linear's steps train; "official": what the official loop's gradients
    # reach: plain round() in the activation quantizers (no straight-through estimator) and only in_proj's and
    # out_proj's steps train (its custom autograd function gives x_proj / dt_proj of both directions none)
    step_training: Literal["ste", "official"] = "ste"
    preset: str | None = None  # "paper": the configuration closest to the official code (PRESETS)

    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {
            "gen_jitter": 0, "gen_flip": False, "gen_tv_weight": 0.0, "gen_patching": "state",
            "train_scan_steps": False, "delta_before_softplus": True, "quantize_scan_u": False,
            "delta_outliers": "range", "calibration_threshold": "raw", "widen_to_zero": "winner",
            "step_training": "official", "loss": "cosine",
        },
    }

    def generation_options(self) -> GenerationOptions:
        """The generator's options these recipe args set (the rest at their defaults)."""
        return GenerationOptions(**{f: getattr(self, a) for f, a in GEN_ARGS.items()})

    def validate(self) -> None:
        self.generation_options().validate(GEN_ARGS, "ouromamba")
        for name in ("num_synthetic", "refresh", "candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"ouromamba {name} must be a positive int; got {getattr(self, name)!r}")
        if self.epochs < 0:
            raise ValueError(f"ouromamba epochs must be an int >= 0; got {self.epochs!r}")
        for name in ("outlier_sigma", "delta_sigma", "lr", "p_norm"):
            v = getattr(self, name)
            if not math.isfinite(v) or not v > 0:
                raise ValueError(f"ouromamba {name} must be a positive number; got {v!r}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"ouromamba weight_decay must be a number >= 0; got {self.weight_decay!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"ouromamba batch_size must be a positive int or None; got {self.batch_size!r}")
        if self.grad_clip is not None and (not math.isfinite(self.grad_clip) or not self.grad_clip > 0):
            raise ValueError(f"ouromamba grad_clip must be a positive number or None; got {self.grad_clip!r}")
        if self.step_training == "official" and self.train_scan_steps:
            raise ValueError("ouromamba step_training='official' trains only in_proj's and out_proj's steps (what the "
                             "official loop's gradients reach): it cannot be combined with train_scan_steps=True")


# ---------------------------------------------------------------------------------------------------------------
# one run on the block-wise engine
@dataclass(frozen=True)
class _Linear:
    act_bits: int
    reverse: bool  # reads a reversed scan's tensors: outlier windows walk the tokens backwards
    trains: bool  # its steps train (every linear, or what the official loop's gradients reach)


@dataclass(frozen=True)
class _Scan:
    bits: int
    reverse: bool
    softplus: str  # full name of the softplus feeding its delta


class OuroMambaBlocks(SelectableBlockLoss):
    """One OuroMamba run on the block-wise engine: the linears and scans it quantizes (this run's state) and the
    engine's hooks (:class:`~optimum_vim.calibration.blockwise.BlockRecipe`)."""

    def __init__(self, args: OuroMambaArgs, linears: dict[str, _Linear], scans: dict[str, _Scan],
                 scan_inputs: dict[str, int]):
        self.args = args
        self.linears, self.scans, self.scan_inputs = linears, scans, scan_inputs

    @property
    def grad_clip(self):
        return self.args.grad_clip

    def _train_scan_steps(self, act_bits: int) -> bool:
        flag = self.args.train_scan_steps
        if self.args.step_training == "official":
            return False  # the official loop leaves the S6 steps at their grid init
        return act_bits <= 4 if flag is None else flag

    def _outlier_bits(self, act_bits: int) -> int:
        return self.args.outlier_bits or (8 if act_bits <= 4 else 16)

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

    def _s6_quantizer(self, name: str, x: torch.Tensor, bits: int, reverse: bool) -> LearnedOutlierActQuantizer:
        """The extractor of one S6 tensor (u, B, C symmetric at ``outlier_sigma``; Δ affine at ``delta_sigma``)."""
        a, is_delta = self.args, name == "delta"
        return self._act_quantizer(x, bits, symmetric=not is_delta, reverse=reverse,
                                   trainable=self._train_scan_steps(bits),
                                   sigma=a.delta_sigma if is_delta else a.outlier_sigma, delta=is_delta)

    def _softplus(self, ctx: BlockContext, scans: dict[str, _Scan]) -> dict[str, str]:
        """Δ before softplus (official): each scan's softplus module (relative to the block), else none."""
        if not self.args.delta_before_softplus:
            return {}
        return {rel: s.softplus[len(ctx.name) + 1:] for rel, s in scans.items()}

    @torch.no_grad()
    def prepare_block(self, ctx: BlockContext):
        a = self.args
        linears, scans = ctx.within(self.linears), ctx.within(self.scans)
        student = copy.deepcopy(ctx.block).requires_grad_(False)
        inputs = ctx.capture(list(linears), stream="float") if linears else {}
        for rel, lin in linears.items():
            linear = ctx.block.get_submodule(rel)
            w = linear.weight.detach().float()
            wq = LearnedWeightQuantizer(lp_weight_scale(w, 4, a.p_norm, a.candidates), 4)
            wq.step.requires_grad_(lin.trains)
            aq = self._act_quantizer(inputs[rel].float(), lin.act_bits, symmetric=True, sigma=a.outlier_sigma,
                                     reverse=lin.reverse, trainable=lin.trains)
            student.set_submodule(rel, FakeQuantLinear(linear, wq, ChannelsExport(aq, linear.in_features)))
        captured = ctx.capture_args(list(scans), self.scan_inputs, stream="float") if scans else {}
        softplus = self._softplus(ctx, scans)
        pre = ctx.capture(list(softplus.values()), stream="float") if softplus else {}
        for rel, sc in scans.items():
            skip = {"delta"} if softplus else set()
            if not a.quantize_scan_u:
                skip.add("u")
            quantizers = {name: self._s6_quantizer(name, x, sc.bits, sc.reverse)
                          for name, x in captured[rel].items() if name not in skip}
            u, b = captured[rel]["u"], captured[rel]["B"]
            student.set_submodule(rel, FakeQuantScan(
                copy.deepcopy(ctx.block.get_submodule(rel)), quantizers, reverse=sc.reverse,
                positions=self.scan_inputs, length=u.shape[1], channels=u.shape[-1], d_state=b.shape[-1]))
            if softplus:
                x = pre[softplus[rel]].float()
                delta = self._s6_quantizer("delta", x, sc.bits, sc.reverse)
                student.set_submodule(softplus[rel], FakeQuantSoftplus(delta, x.shape[-1]))
        return student

    def block_optimizer(self, ctx: BlockContext, student):
        a = self.args
        if a.epochs == 0:
            return None
        params = []
        for rel in ctx.within(self.linears):
            for group in student.get_submodule(rel).trainable().values():
                params.extend(group)
        scans = ctx.within(self.scans)
        softplus = self._softplus(ctx, scans)
        for rel in scans:
            params.extend(p for p in student.get_submodule(rel).quantizers.parameters() if p.requires_grad)
            if softplus:
                params.extend(p for p in student.get_submodule(softplus[rel]).parameters() if p.requires_grad)
        if not params:
            return None
        return torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)

    def block_schedule(self, ctx: BlockContext) -> tuple[int, int]:
        batch = min(self.args.batch_size or ctx.num_samples, ctx.num_samples)
        return self.args.epochs * -(-ctx.num_samples // batch), batch

    def finalize_block(self, ctx: BlockContext, student) -> dict[str, LayerPlan]:
        plans = {f"{ctx.name}.{rel}": student.get_submodule(rel).export() for rel in ctx.within(self.linears)}
        scans = ctx.within(self.scans)
        softplus = self._softplus(ctx, scans)
        for rel in scans:
            plans[f"{ctx.name}.{rel}"] = student.get_submodule(rel).export()
            if softplus:
                plans[f"{ctx.name}.{softplus[rel]}"] = student.get_submodule(softplus[rel]).export()
        return plans


# ---------------------------------------------------------------------------------------------------------------
# the recipe
class OuroMambaRecipe(Recipe):
    """OuroMamba: data-free calibration (OuroMamba-Gen) + dynamic outlier-aware mixed precision (see module doc)."""

    name = "ouromamba"
    Args = OuroMambaArgs
    Blocks = OuroMambaBlocks  # the per-run object the engine drives
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

    def blocks(self, model) -> OuroMambaBlocks:
        """The per-run engine object for ``model``: its block linears and (``quantize_scan``) scans after the
        targets, with their bits and scan order."""
        a, family = self.args, family_of(model)
        official = set()
        for mixer in family.mixers(model):  # the linears whose steps the official loop's gradients reach
            official |= {mixer.path(mixer.layout.in_proj), mixer.path(mixer.layout.out_proj)}
        linears = {ref.name: _Linear(s.act_bits, ref.reverse, a.step_training == "ste" or ref.name in official)
                   for ref in self.targets.linear_refs(model) if (s := self.targets.settings(ref.name)) is not None}
        scans = {} if not a.quantize_scan else {
            name: _Scan(s.act_bits, ref.reverse, ref.mixer.path(ref.direction.softplus))
            for name, (ref, s) in self.targets.scans(model).items()
        }
        return self.Blocks(a, linears, scans, family.scan_inputs)

    def calibrate(self, model, batches) -> QuantPlan:
        from .generation import generate_calibration_images

        a = self.args
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
            pixels = generate_calibration_images(model, a.num_synthetic, options=a.generation_options(),
                                                 processor=self.image_processor, seed=self.seed)
            info["calibration_source"] = (
                f"calibrated on {pixels.shape[0]} synthetic images (OuroMamba-Gen, {a.gen_iterations} iterations, "
                "data-free)"
            )
        run = self.blocks(model)
        if not run.linears and not run.scans:
            return QuantPlan(recipe=self.name)
        log: list[dict] = []
        layers = calibrate_blockwise(model, pixels.float(), run, seed=self.seed, desc="ouromamba", log=log)
        info["blocks"] = log
        return QuantPlan(recipe=self.name, layers=layers, info=info)


__all__ = ["OuroMambaArgs", "OuroMambaBlocks", "OuroMambaRecipe"]
