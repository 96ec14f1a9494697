"""ViM-VQ (Deng et al., ICCV 2025): 1-3 bit weight-only vector quantization of the block linears.

Representation (methods.md §5.2): one codebook (C, d) per linear over d-dim sub-vectors of each output row, stored
as packed ``log2 C``-bit indices + the codebook (``QLinear`` format "vq"), optionally with a per-output-channel
scale. Defaults per bit width: 3 bit C=64 d=2, 2 bit C=256 d=4, 1 bit C=256 d=8. Codebooks start from the shared
seeded k-means (``calibration/kmeans.py``).

Size rule (the paper gives none; ours): codebooks and scales are stored in fp16 (``codebook_dtype``), and each
layer's codebook is halved until (1) it holds at most a quarter of the layer's sub-vectors (VQ4DiT's clamp) and
(2) the layer's bytes (indices + codebook + scale) do not exceed RTN at the same bits with per-group g32 scales
(``size_budget="rtn_g32"``; ``None`` keeps only the clamp). Small layers (``x_proj``, ``dt_proj`` on small models)
therefore get smaller codebooks and fewer index bits than the nominal rate.

Calibration (default ``convex=True, incremental=True``, methods.md §5.3-5.4): block by block on the shared engine
(``calibration/blockwise.py``, its default 1 - cos block-output loss), every sub-vector is a softmax-weighted convex
combination of its ``candidates`` nearest codewords; ratios and codewords train jointly (RMSprop), hulls are
re-chosen as ratios collapse, and sub-vectors are confirmed incrementally until all are hard, after which the
codebooks are fine-tuned. ``convex=False, incremental=False`` is plain k-means VQ (the paper's "basic VQ"
ablation): data-free. ``convex=True, incremental=False`` hardens once at the end ("+ convex").

No one-hot regulariser by default: VQ4DiT (the authors' predecessor code; ViM-VQ's is not public) adds
``n * mean(pi (1 - pi))`` over the soft sub-vectors to its loss on the steps where that term did not fall below its
lowest value so far; here incremental hardening alone drives the ratios to one-hot. ``onehot_regularizer=True`` adds
VQ4DiT's term with VQ4DiT's rule (ablation row ``ViM-VQ W2 + one-hot regulariser`` in ``benchmarks/accuracy.py``).

Bad input: a ``vector_dim`` that does not divide a layer's width is padded (the last sub-vector of each row is
zero-padded; the padding is dropped on decode), a codebook larger than a layer's sub-vector count is refused,
4+ bits are refused with a pointer to ``rtn`` / ``ptq4vm``, and ``act_bits`` must be None (weight-only; the weight
quantizer is separate from any activation choice, so a later recipe can combine them).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..calibration.blockwise import calibrate_blockwise, cosine_block_loss, fixed_threads
from ..calibration.convex_vq import ConvexVQLinear, ConvexVQWeight
from ..calibration.vq import DEFAULT_VQ_SETTINGS, VQLayout, choose_codebook_size, kmeans_vq
from ..modules.spec import CodebookDtype
from .base import LayerPlan, QuantPlan, Recipe

logger = logging.getLogger(__name__)

SIZE_BUDGETS = {"rtn_g32": 32, None: None}
# inferred hyper-parameters (methods.md §5.3-5.4 give no values; ours, named here and in the README):
# a hull candidate whose ratio fell below REPLACE_BELOW is swapped for a better codeword (§5.3 step 4), and with
# incremental=True every sub-vector is confirmed by HARDEN_FRACTION of a block's steps (the rest fine-tune codebooks)
REPLACE_BELOW = 0.02
HARDEN_FRACTION = 0.75


@dataclass
class ViMVQArgs:
    """Options of the ViM-VQ recipe (``ViMQuantizationConfig(recipe_args=...)``).

    Representation: ``vector_dim`` / ``codebook_size`` (None: the per-bit defaults; given together they must make
    ``log2(codebook_size) / vector_dim`` equal the weight bits), ``channel_scale``, ``codebook_dtype``,
    ``size_budget``, ``kmeans_iterations`` (methods.md §5.2: 100), ``targets``.
    Optimisation (``convex``): ``candidates`` (hull size n, VQ4DiT's 2), ``iterations`` (steps per block),
    ``batch_size``, ``lr_codebook`` / ``lr_ratios`` (VQ4DiT's RMSprop 1e-4 / 5e-2), ``replace_every``;
    ``incremental``: ``confirm_threshold`` (VQ4DiT's 0.99).
    """

    vector_dim: int | None = None
    codebook_size: int | None = None
    channel_scale: bool = False
    codebook_dtype: CodebookDtype = "float16"
    size_budget: Literal["rtn_g32"] | None = "rtn_g32"
    kmeans_iterations: int = 100
    convex: bool = True
    incremental: bool = True
    candidates: int = 2
    iterations: int = 100
    batch_size: int = 32
    lr_codebook: float = 1e-4
    lr_ratios: float = 5e-2
    replace_every: int = 10
    confirm_threshold: float = 0.99
    targets: tuple[str, ...] | None = None  # roles of the linears (None: the model family's, Vim's six)
    # VQ4DiT's one-hot regulariser n * mean(pi (1 - pi)) over the soft sub-vectors, added to the block loss on the
    # steps where it did not fall below its running minimum (VQ4DiT's rule); off by default (ablation row)
    onehot_regularizer: bool = False

    def validate(self) -> None:
        for name in ("vector_dim", "codebook_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be a positive int or None; got {v!r}")
        if self.vector_dim is not None and self.vector_dim > 16:
            raise ValueError(f"vector_dim must be <= 16 (longer sub-vectors need codebooks beyond 8-bit indices); "
                             f"got {self.vector_dim}")
        if self.codebook_size is not None:
            c = self.codebook_size
            if c < 2 or c & (c - 1) or c > 256:
                raise ValueError(f"codebook_size must be a power of two in [2, 256] (indices are stored with "
                                 f"log2(codebook_size) <= 8 bits); got {c}")
        for name in ("kmeans_iterations", "iterations", "batch_size", "replace_every"):
            v = getattr(self, name)
            if v < (0 if name == "kmeans_iterations" else 1):
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if not 2 <= self.candidates <= 16:
            raise ValueError(f"candidates (codewords per sub-vector hull) must be an int in [2, 16]; got "
                             f"{self.candidates!r}")
        for name in ("lr_codebook", "lr_ratios"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0; got {v!r}")
        if not 0.5 < self.confirm_threshold < 1.0:
            raise ValueError(f"confirm_threshold must be in (0.5, 1); got {self.confirm_threshold!r}")
        if self.incremental and not self.convex:
            raise ValueError("incremental=True hardens the convex-combination ratios: it needs convex=True")

    def settings_for(self, bits: int) -> tuple[int, int]:
        """(vector_dim, codebook_size) at ``bits`` per weight."""
        d_default, c_default = DEFAULT_VQ_SETTINGS[bits]
        d, c = self.vector_dim, self.codebook_size
        if d is None and c is None:
            return d_default, c_default
        if c is None:
            if bits * d > 8:
                raise ValueError(f"{bits} bits x vector_dim {d} needs {bits * d}-bit indices; indices are stored with "
                                 f"at most 8 bits: use vector_dim <= {8 // bits} at {bits} bits")
            return d, 1 << (bits * d)
        log_c = c.bit_length() - 1
        if d is None:
            if log_c % bits:
                raise ValueError(f"codebook_size {c} ({log_c} index bits) is not a whole number of {bits}-bit weights; "
                                 f"give vector_dim too or use 2**({bits} * d) codewords")
            return log_c // bits, c
        if log_c != bits * d:
            raise ValueError(f"codebook_size {c} with vector_dim {d} is {log_c}/{d} bits per weight, not {bits}; use "
                             f"codebook_size {1 << (bits * d)} or another vector_dim")
        return d, c


class ViMVQRecipe(Recipe):
    """ViM-VQ: codebook weights (k-means init; convex-combination search and incremental hardening with ``convex``)."""

    name = "vimvq"
    Args = ViMVQArgs
    weight_bits = (1, 2, 3)
    act_bits = (None,)

    @classmethod
    def check_bits(cls, weight_bits, act_bits) -> None:
        if act_bits is not None:
            raise ValueError(
                f"recipe 'vimvq' quantizes weights only (activations stay float); got act_bits={act_bits!r}: use "
                "act_bits=None, or 'rtn' / 'ptq4vm' for activation quantization"
            )
        if weight_bits not in cls.weight_bits:
            raise ValueError(
                f"recipe 'vimvq' is for 1-3 bit weights; got weight_bits={weight_bits!r}: for 4 bits and more use "
                "recipe='rtn' (round-to-nearest, per group) or 'ptq4vm'"
            )

    def __init__(self, args, targets, seed=0, image_processor=None):
        super().__init__(args, targets, seed, image_processor)
        # the (vector_dim, codebook_size) choice depends on the bits, which the Args cannot see: check every width
        # the config uses here, before any layer is touched
        for bits in sorted(targets.weight_widths()):
            self.args.settings_for(bits)

    @classmethod
    def requires_data(cls, config) -> bool:
        return bool((config.recipe_args or {}).get("convex", ViMVQArgs.convex))

    def layouts(self, model) -> dict[str, tuple[VQLayout, int]]:
        """Per quantized linear: its layout and weight bits (overrides and skips applied). Validates every layer
        before anything is computed, so a bad setting fails before calibration starts."""
        out = {}
        for name, settings in self.targets.linears(model, self.args.targets).items():
            bits = settings.weight_bits
            d, c = self.args.settings_for(bits)
            linear = model.get_submodule(name)
            n, k = linear.out_features, linear.in_features
            n_sub = n * -(-k // d)
            if self.args.codebook_size is None and c > n_sub:  # a default larger than the layer: clamp, not refuse
                c = 1 << (n_sub.bit_length() - 1)
            try:
                size = choose_codebook_size(
                    n, k, bits, d, c, channel_scale=self.args.channel_scale, codebook_dtype=self.args.codebook_dtype,
                    budget_group_size=SIZE_BUDGETS[self.args.size_budget],
                )
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            if size != c:
                logger.info("%s: codebook %d -> %d (size clamp)", name, c, size)
            out[name] = (VQLayout(n, k, d, size, self.args.channel_scale, self.args.codebook_dtype), bits)
        return out

    def kmeans_init(self, name: str, weight: torch.Tensor, layout: VQLayout, order: int):
        """The k-means codebook of one layer; seeded by the config seed and the layer's position, so ``convex``
        starts from exactly the plain-VQ result."""
        return kmeans_vq(weight, layout, seed=self.seed + order, iters=self.args.kmeans_iterations)

    def calibrate(self, model, batches) -> QuantPlan:
        # the engine's fixed thread count for the k-means too: on a shared CPU a multi-threaded run mostly waits
        with fixed_threads():
            return self._calibrate(model, batches)

    def _calibrate(self, model, batches) -> QuantPlan:
        layouts = self.layouts(model)
        plan = QuantPlan(recipe=self.name)
        soft = {}
        if self.args.convex:
            if not batches:
                raise ValueError("vimvq with convex=True trains on calibration images; pass calibration_dataset "
                                 "(or use convex=False for data-free k-means VQ)")
            block_recipe = ViMVQBlockRecipe(self, layouts)
            log: list[dict] = []
            soft = calibrate_blockwise(model, torch.cat(list(batches)), block_recipe, seed=self.seed,
                                       desc="vimvq", log=log)
            plan.info["blocks"] = log
            plan.info["layers"] = block_recipe.stats
        with torch.no_grad():
            rest = [(i, n) for i, n in enumerate(layouts) if n not in soft]
            for i, name in tqdm(rest, desc="vimvq k-means", unit="layer", leave=False, disable=not rest):
                layout = layouts[name][0]
                linear = model.get_submodule(name)
                vq = self.kmeans_init(name, linear.weight, layout, i)
                plan.layers[name] = LayerPlan(spec=layout.spec(linear.bias is not None),
                                              tensors=vq.tensors(linear.bias))
        plan.layers.update(soft)
        plan.layers = {n: plan.layers[n] for n in layouts}  # model order
        plan.info["bits_per_weight"] = plan_bits_per_weight(plan)
        return plan


def plan_bits_per_weight(plan: QuantPlan) -> float:
    """Stored bits per weight of the plan's linears: indices + codebooks + scales (bias excluded)."""
    bits = weights = 0
    for layer in plan.layers.values():
        weights += layer.spec.in_features * layer.spec.out_features
        bits += 8 * sum(t.numel() * t.element_size() for k, t in layer.tensors.items()
                        if k in ("qweight", "codebook", "weight_scale"))
    return bits / weights if weights else float("nan")


class ViMVQBlockRecipe:
    """The block-wise part of ViM-VQ for :func:`~optimum_vim.calibration.blockwise.calibrate_blockwise`: per block,
    the target linears become :class:`ConvexVQLinear` stand-ins (k-means codebook, top-n hull, distance-based
    logits), trained with RMSprop on the engine's block loss; hulls are re-chosen every ``replace_every`` steps;
    with ``incremental``, sub-vectors are confirmed on a schedule and the codebooks fine-tuned once all are hard.

    Schedule (``iterations`` = T steps per block; methods.md §5.4 leaves it open, this one is ours):

    * ``incremental=False`` (the "+ convex" ablation): T soft steps with hull replacement, then one-shot hardening
      (each sub-vector takes its highest-ratio codeword) when the block is exported;
    * ``incremental=True``: during the first ``HARDEN_FRACTION`` of the steps, every ``replace_every`` steps the
      sub-vectors whose top ratio exceeds ``confirm_threshold`` are frozen, and at least a linearly growing share of
      every layer (reaching 100 % at ``HARDEN_FRACTION * T``) is frozen, most confident first; the remaining steps
      fine-tune the codebooks (and scales, biases) with every index hard.
    """

    grad_clip = None  # RMSprop normalises the step per parameter already
    _onehot_min = float("inf")

    def __init__(self, recipe: ViMVQRecipe, layouts: dict[str, tuple[VQLayout, int]]):
        self.recipe = recipe
        self.args = recipe.args
        self.layouts = layouts
        self.order = {name: i for i, name in enumerate(layouts)}
        self.stats: dict[str, dict] = {}
        self._stand_ins: dict[str, ConvexVQLinear] = {}

    def prepare_block(self, ctx):
        student = copy.deepcopy(ctx.block)
        student.requires_grad_(False)  # weight-only VQ: only the codebook stand-ins train
        self._stand_ins = {}
        self._onehot_min = float("inf")
        for rel in ctx.within(self.layouts):
            full = f"{ctx.name}.{rel}"
            linear = student.get_submodule(rel)
            layout = self.layouts[full][0]
            init = self.recipe.kmeans_init(full, linear.weight, layout, self.order[full])
            stand_in = ConvexVQLinear(linear, ConvexVQWeight(linear.weight, init, self.args.candidates))
            student.set_submodule(rel, stand_in)
            self._stand_ins[rel] = stand_in
        return student

    def block_optimizer(self, ctx, student):
        if not self._stand_ins:
            return None
        slow = [p for s in self._stand_ins.values() for p in (s.vq.codebook, s.vq.scale, s.bias) if p is not None]
        fast = [s.vq.logits for s in self._stand_ins.values()]
        # VQ4DiT's optimiser: RMSprop, alpha 0.9, codebooks (and biases) 1e-4, ratio logits 5e-2 (methods.md §5.5)
        return torch.optim.RMSprop([{"params": slow, "lr": self.args.lr_codebook},
                                    {"params": fast, "lr": self.args.lr_ratios}], alpha=0.9)

    def block_schedule(self, ctx) -> tuple[int, int]:
        return self.args.iterations, min(self.args.batch_size, ctx.num_samples)

    def block_loss(self, ctx, out, target):
        """The engine's block loss, plus VQ4DiT's one-hot regulariser with ``onehot_regularizer``: the mean over the
        block's soft layers of ``n * mean(pi (1 - pi))``, added only on steps where it did not fall below its lowest
        value so far (VQ4DiT adds it "when the soft loss stops decreasing")."""
        loss = cosine_block_loss(out, target)
        if not self.args.onehot_regularizer:
            return loss
        soft = [s.vq for s in self._stand_ins.values() if s.vq.frozen_fraction < 1.0]
        if not soft:
            return loss
        penalty = torch.stack([vq.logits.shape[1] * vq.onehot_penalty() for vq in soft]).mean()
        value = float(penalty.detach())
        if value <= self._onehot_min:
            self._onehot_min = value
            return loss
        return loss + penalty

    def on_step(self, ctx, student, step: int, steps: int) -> None:
        every = self.args.replace_every
        if (step + 1) % every:
            return
        harden_at = max(1, round(HARDEN_FRACTION * steps)) if self.args.incremental else None
        for s in self._stand_ins.values():
            if harden_at is not None and step + 1 > harden_at:
                continue  # all hard: codebook fine-tuning only
            s.vq.replace_candidates(REPLACE_BELOW)
            if harden_at is not None:
                # the last confirmation point at or before harden_at freezes everything left
                last = step + 1 + every > harden_at
                s.vq.confirm(self.args.confirm_threshold, 1.0 if last else (step + 1) / harden_at)

    def finalize_block(self, ctx, student) -> dict[str, LayerPlan]:
        out = {}
        for rel, s in self._stand_ins.items():
            full = f"{ctx.name}.{rel}"
            layout = self.layouts[full][0]
            self.stats[full] = {"frozen_before_export": s.vq.frozen_fraction}
            vq = s.vq.export()
            out[full] = LayerPlan(spec=layout.spec(s.bias is not None), tensors=vq.tensors(s.bias))
        self._stand_ins = {}
        return out
