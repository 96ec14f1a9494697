"""PTQ4VM (Cho et al., WACV 2025): per-token static activations + joint learning of smoothing and step sizes.

What is quantized (methods.md §3.2): the six block linears of every block (``in_proj, x_proj, x_proj_b, dt_proj,
dt_proj_b, out_proj``), weights and inputs; conv1d, the gates, the selective scan, norms, patch embedding and head
stay in float.

* Weights: symmetric per output channel, codes ``+-(2^(b-1) - 1)``, a learned step per row.
* Inputs: asymmetric, static **per token position** (one step and one zero point per position, shared over batch and
  channels; the sequence length and class-token position come from the model), codes ``[0, 2^b - 1]``.
* Smoothing: one per-input-channel vector sigma per linear; the layer computes ``quant(x / sigma) @ quant(W * sigma)``.
  sigma is folded into the stored weight codes; at inference only the division of the input remains, which the
  activation quantization fuses.

How it decides (§3.3), block by block on the shared engine (:mod:`optimum_vim.calibration.blockwise`):

1. SmoothQuant statistics ``a_j = max |X[:, :, j]|`` of each linear's input on the float stream, and the init
   ``sigma_j = max(a_j^alpha / max_o |W_oj|^(1 - alpha), 1e-5)`` (a_j >= 1e-3, max|W| >= 1e-5; alpha = 0.5);
2. Lp(2.4) grid init of the weight steps (on ``W * sigma``) and of the per-token steps and zero points (on
   ``x / sigma``, float stream), 100 candidates each; the zero points stay frozen from here on;
3. JLSS: AdamW (weight decay 1e-5) on all weight steps, activation steps and sigmas of the block, lr 5e-4 for steps
   and 1e-2 for sigma, gradient-norm clip 2.0, loss mean(1 - cos) (``loss="cosine"``) of the block's hidden output
   against the float block on the float stream, the student fed by the already-quantized blocks; 100 full-batch
   steps per block.

Deviations from the official code (each also in the README's recipe table):

* Every trainable tensor trains. The official code wraps the mixer in a custom autograd function that returns no
  gradient for the x_proj / dt_proj / x_proj_b / dt_proj_b quantizers, and its weight-step optimiser group selects
  parameter names ending in ``proj.s``, missing the backward direction's ``proj_b`` weights; here gradients flow
  through the whole block (our selective scan has its own backward) and the optimiser groups are built from the
  stand-in modules, not from name patterns.
* The activation grid spreads its candidates over the live half of the official one (see
  :func:`optimum_vim.calibration.lp_init.lp_token_affine`); the official ``a = k/100`` grid never tries min-max and
  wastes every ``a > 0.5`` on inverted intervals.
* Every candidate range of the activation grid is widened to include 0 before it is scored, so it is scored on the
  grid it would store (``widen_to_zero="candidates"``); the official code scores the candidates unwidened and widens
  only the winner, which ``widen_to_zero="winner"`` reproduces (ablation row in ``benchmarks/accuracy.py``).
* Calibration images are the seeded draw of the config, processed with the model's eval transform; the official code
  draws one 256-image batch through Vim's training augmentations.
* Not a deviation but an option: ``loss="nmse"`` trains on the normalised squared error of the block output instead
  of the paper's ``1 - cos``. The cosine cannot see the output's norm, and JLSS on it shrinks every block's output
  (measured on the fixture at W4A4: 0.95 -> 0.88 of the float norm) while it lowers ``1 - cos``; the default stays
  the paper's.
* ``steps=0`` / ``jlss=False`` stop after the initialisation (the official code crashes with ``--epochs 0``); no
  depth, width or sequence length is hard-coded (the official code assumes 24 blocks and 197 tokens).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..calibration.blockwise import BlockContext, BlockLoss, SelectableBlockLoss, calibrate_blockwise
from ..calibration.data import CalibrationDataError
from ..calibration.fakequant import FakeQuantLinear, LearnedActQuantizer, LearnedWeightQuantizer
from ..calibration.lp_init import WidenToZero, lp_token_affine, lp_weight_scale
from .base import LayerPlan, QuantPlan, Recipe
from .targets import LayerSettings, check_roles


@dataclass
class PTQ4VMArgs:
    """Options of the PTQ4VM recipe (``ViMQuantizationConfig(recipe="ptq4vm", recipe_args=...)``).

    ``smoothing=False, jlss=False`` is the paper's "PTS only" ablation (per-token static scales from the Lp grid);
    ``jlss=False`` keeps smoothing and the initialisation without training."""

    alpha: float = 0.5  # smoothing migration strength (0.65 for VMamba in the paper)
    steps: int = 100  # optimiser steps per block (official: 100 epochs of one 256-image batch)
    lr_step: float = 5e-4  # weight and activation step sizes
    lr_smooth: float = 1e-2  # smoothing vectors
    p_norm: float = 2.4  # exponent of the Lp grid-search error
    smoothing: bool = True
    jlss: bool = True
    candidates: int = 100  # grid candidates of the Lp initialisation
    batch_size: int | None = None  # images per optimiser step; None: the whole calibration set (official)
    weight_decay: float = 1e-5
    grad_clip: float | None = 2.0
    targets: tuple[str, ...] | None = None  # roles of block linears (None: the model family's, Vim's six)
    # JLSS block loss: "cosine" (the paper's mean 1 - cos) or "nmse" (normalised squared error, which also sees the
    # output norm that the cosine loss lets shrink; not in the paper, see calibration.blockwise.nmse_block_loss)
    loss: BlockLoss = "cosine"
    # activation grid init: "candidates" widens every candidate range to include 0 before scoring it (ours: each
    # candidate is scored on the grid it would store); "winner" scores them unwidened and widens the chosen one
    # (the official code); calibration.lp_init.lp_token_affine
    widen_to_zero: WidenToZero = "candidates"

    def validate(self) -> None:
        # types are checked from the annotations by optimum_vim.options before this runs; ranges here
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"ptq4vm alpha must be in [0, 1]; got {self.alpha!r}")
        if self.steps < 0 or self.candidates < 1:
            raise ValueError(f"ptq4vm steps must be >= 0 and candidates >= 1; got {self.steps}, {self.candidates}")
        for name in ("lr_step", "lr_smooth", "p_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ptq4vm {name} must be positive; got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ValueError(f"ptq4vm weight_decay must be >= 0; got {self.weight_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"ptq4vm grad_clip must be positive or None; got {self.grad_clip!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"ptq4vm batch_size must be a positive int or None; got {self.batch_size!r}")
        if self.targets is not None:
            check_roles(self.targets, "ptq4vm")


class PTQ4VMBlocks(SelectableBlockLoss):
    """One PTQ4VM run on the block-wise engine: the linears it quantizes (this run's state) and the engine's hooks
    (:class:`~optimum_vim.calibration.blockwise.BlockRecipe`)."""

    def __init__(self, args: PTQ4VMArgs, layers: dict[str, LayerSettings]):
        self.args = args
        self.layers = layers

    @property
    def grad_clip(self):
        return self.args.grad_clip

    @torch.no_grad()
    def prepare_block(self, ctx: BlockContext):
        a = self.args
        layers = ctx.within(self.layers)
        inputs = ctx.capture(list(layers), stream="float")
        student = copy.deepcopy(ctx.block).requires_grad_(False)
        for rel, s in layers.items():
            linear = ctx.block.get_submodule(rel)
            x = inputs[rel].float()
            w = linear.weight.detach().float()
            sigma = None
            if a.smoothing:
                act_max = x.abs().amax(dim=tuple(range(x.dim() - 1))).clamp(min=1e-3)
                w_max = w.abs().amax(0).clamp(min=1e-5)
                sigma = (act_max.pow(a.alpha) / w_max.pow(1 - a.alpha)).clamp(min=1e-5)
                x, w = x / sigma, w * sigma
            wq = LearnedWeightQuantizer(lp_weight_scale(w, s.weight_bits, a.p_norm, a.candidates), s.weight_bits)
            aq = None
            if s.act_bits is not None:
                step, zero = lp_token_affine(x, s.act_bits, a.p_norm, a.candidates, widen=a.widen_to_zero)
                aq = LearnedActQuantizer(step, s.act_bits, zero)
            student.set_submodule(rel, FakeQuantLinear(linear, wq, aq, sigma))
        return student

    def block_optimizer(self, ctx: BlockContext, student):
        a = self.args
        if not a.jlss or a.steps == 0:
            return None
        groups = {"weight_step": [], "act_step": [], "smooth": []}
        for rel in ctx.within(self.layers):
            for kind, params in student.get_submodule(rel).trainable().items():
                groups[kind].extend(params)
        lrs = {"weight_step": a.lr_step, "act_step": a.lr_step, "smooth": a.lr_smooth}
        param_groups = [{"params": p, "lr": lrs[k], "name": k} for k, p in groups.items() if p]
        if not param_groups:  # a block with nothing to quantize (a hierarchical model's conv block, a downsampler)
            return None
        return torch.optim.AdamW(param_groups, weight_decay=a.weight_decay)

    def block_schedule(self, ctx: BlockContext) -> tuple[int, int]:
        return self.args.steps, self.args.batch_size or ctx.num_samples

    def finalize_block(self, ctx: BlockContext, student) -> dict[str, LayerPlan]:
        return {f"{ctx.name}.{rel}": student.get_submodule(rel).export() for rel in ctx.within(self.layers)}


class PTQ4VMRecipe(Recipe):
    """PTQ4VM: per-token static activation quantization with learned smoothing and step sizes (see module doc)."""

    name = "ptq4vm"
    Args = PTQ4VMArgs
    weight_bits = (2, 3, 4, 5, 6, 8)
    act_bits = (4, 5, 6, 8)
    default_calibration_samples = 256
    min_calibration_samples = 8

    @classmethod
    def check_bits(cls, weight_bits, act_bits) -> None:
        if act_bits is None:
            raise ValueError(
                "recipe 'ptq4vm' quantizes activations (static per-token scales): set act_bits (4, 5, 6 or 8; the "
                "paper's settings are W4A4, W4A8, W6A6, W8A8). For weight-only quantization use recipe 'rtn' or 'vimvq'."
            )
        super().check_bits(weight_bits, act_bits)

    @classmethod
    def check_config(cls, config) -> None:
        if config.weight_group_size is not None:
            raise ValueError("recipe 'ptq4vm' uses one weight scale per output channel; weight_group_size must be None")

    # ---------------------------------------------------------------------------------------------- calibration
    def calibrate(self, model, batches) -> QuantPlan:
        if not batches:
            raise CalibrationDataError(
                f"recipe 'ptq4vm' calibrates on images: pass calibration_dataset= (at least "
                f"{self.min_calibration_samples} images; the paper uses {self.default_calibration_samples})"
            )
        pixels = torch.cat(list(batches))
        if pixels.shape[0] < self.min_calibration_samples:
            raise CalibrationDataError(
                f"recipe 'ptq4vm' needs at least {self.min_calibration_samples} calibration images for its per-token "
                f"statistics; got {pixels.shape[0]} (the paper uses {self.default_calibration_samples}: "
                "num_calibration_samples=256 with a data set that large)"
            )
        settings = self.targets.linears(model, self.args.targets)
        if not settings:
            return QuantPlan(recipe=self.name)
        log: list[dict] = []
        layers = calibrate_blockwise(model, pixels, self.blocks(settings), seed=self.seed, desc="ptq4vm", log=log)
        return QuantPlan(recipe=self.name, layers=layers, info={"blocks": log})

    Blocks = PTQ4VMBlocks  # the per-run object the engine drives

    def blocks(self, layers: dict[str, LayerSettings]) -> PTQ4VMBlocks:
        """The per-run engine object calibrating ``layers`` (full linear names -> settings)."""
        return self.Blocks(self.args, layers)
