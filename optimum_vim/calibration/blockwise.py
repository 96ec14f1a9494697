"""The block-wise calibration engine shared by the learned recipes (PTQ4VM, OuroMamba, ViM-VQ).

:func:`calibrate_blockwise` walks the model's blocks in order (its family adapter,
:mod:`optimum_vim.models.family`, names them, embeds the inputs and runs one block). For block ``i``:

1. the float block (the *teacher*) runs on the **float stream** (the stream state as the float model computes it:
   for Vim the hidden states and the fp32 residual stream it carries) and gives the target;
2. the recipe builds a *student* from the block (``prepare_block``: usually a copy whose linears are swapped for the
   differentiable stand-ins of :mod:`optimum_vim.calibration.fakequant`), which runs on the **quantized stream** (the
   outputs of the blocks quantized so far) and is trained with the recipe's optimiser, schedule and loss, in eval
   mode like the teacher (drop-path and dropout off; only the tensors in the recipe's optimiser change)
   (default: mean over batch and tokens of ``1 - cos`` along the hidden dimension of the block's hidden output;
   :data:`BLOCK_LOSSES` names the alternatives);
3. the recipe freezes the student into ``LayerPlan``\\ s (``finalize_block``); the engine applies them to a copy of
   the float block with :func:`~optimum_vim.modules.plan.apply_plan` (the real quantized modules, reference ops) and
   pushes the quantized stream through it, so the next block trains on exactly what inference will feed it.

Memory: the engine holds the current block's float and quantized input streams (and the target) for the calibration
set, never the whole model's activations. The model itself is not modified: the plans are returned and applied by
the caller, so a failing block leaves nothing half-applied.

Reproducibility on all cores: batches are drawn with a generator seeded per block, and the work is cut into pieces
that depend on the shapes only, never on the thread count. PyTorch runs at one intra-op thread (its reductions and
GEMMs would split their sums by thread count); the parallelism comes from running the pieces on
:data:`CALIBRATION_THREADS` Python threads (PyTorch ops and the fused CPU scan release the GIL):

* streaming the calibration set through a block: fixed chunks of ``_CHUNK`` samples, concatenated in order;
* a training step: the step's batch in fixed pieces of ``_TRAIN_CHUNK`` samples, each piece's forward (its own
  autograd graph) on a worker, the block loss on the concatenated output in the caller, then each piece's backward
  (``torch.autograd.grad`` of the piece's output with its slice of the output gradient) on a worker; the parameter
  gradients are the sum of the pieces' gradients in piece order (by the chain rule, the gradient of the whole
  batch's loss).

Every piece is computed by one thread in a fixed order and every sum across pieces runs in piece order, so seeded
runs are bit-identical for any thread count (tested for 1 and 2). What a piece computes must not draw from the global
random generator (the stand-ins and Vim blocks in eval-like use do not).

Determinism on CUDA (the engine, like every recipe, runs on the model's device): reruns of a seeded calibration on
the same GPU model and software stack (driver, CUDA, PyTorch, Triton) are bit-identical where every pass is a forward
pass (RTN, k-scale, k-means VQ, and the initialisation of the learned recipes): PyTorch's CUDA reductions,
single-stream cuBLAS and our Triton kernels (fixed launch configurations, no atomics) repeat their sums in the same
order, and the k-means of k-scale / ViM-VQ always runs on the CPU in float64. The training steps of PTQ4VM, OuroMamba
(and OuroMamba-Gen) and ViM-VQ are not guaranteed to be: CUDA backward passes may accumulate with atomic adds in a
varying order (the gradient of an indexing / gather such as ViM-VQ's codeword lookup does).
``torch.use_deterministic_algorithms(True)`` with ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` set before CUDA starts makes
PyTorch choose deterministic kernels (or raise where it has none). Never bit-identical: a CPU run against a GPU run,
or two GPU models (other summation orders; cuDNN convolutions default to TF32). ``benchmarks/gpu_check.sh`` checks
the reruns on a GPU (``rerun_bit_identical`` in its e2e.json and, deterministic, e2e_det.json).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import copy
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.family import ModelFamily, family_of
from ..modules.plan import LayerPlan, QuantPlan, apply_plan

CALIBRATION_THREADS: int | None = (int(os.environ["OPTIMUM_VIM_CALIBRATION_THREADS"])
                                   if os.environ.get("OPTIMUM_VIM_CALIBRATION_THREADS") else None)
"""Worker threads of the block-wise calibration (``OPTIMUM_VIM_CALIBRATION_THREADS``); None: the caller's
``torch.get_num_threads()`` (all cores by default). The results do not depend on it (see the module docstring)."""

_CHUNK = 64  # samples per forward when streaming the calibration set through a block
_TRAIN_CHUNK = 32  # samples per forward / backward piece of a training step (fixed: results never depend on threads)


class _Workers:
    """Runs pieces of work on ``threads`` Python threads and returns their results in piece order. Each piece runs
    with the caller's grad mode and context variables (the kernel policy of ``use_kernels``)."""

    def __init__(self, threads: int):
        self.threads = max(1, int(threads))
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def map(self, fn, items) -> list:
        items = list(items)
        if self.threads == 1 or len(items) <= 1:
            return [fn(x) for x in items]
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="optimum-vim-calib")
        grad = torch.is_grad_enabled()
        ctx = contextvars.copy_context()

        def run(x):
            with torch.set_grad_enabled(grad):
                return ctx.copy().run(fn, x)

        return list(self._pool.map(run, items))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


_serial = _Workers(1)


class BlockwiseCalibrationError(RuntimeError):
    """A block's calibration diverged (non-finite loss or output); the message names the block."""


class BlockRecipe(Protocol):
    """What a recipe implements to use the engine (duck-typed; optional members are marked)."""

    def prepare_block(self, ctx: BlockContext) -> nn.Module: ...

    def block_optimizer(self, ctx: BlockContext, student: nn.Module) -> torch.optim.Optimizer | None: ...

    def block_schedule(self, ctx: BlockContext) -> tuple[int, int]: ...

    def finalize_block(self, ctx: BlockContext, student: nn.Module) -> dict[str, LayerPlan]: ...

    # optional: grad_clip (float | None attribute), block_loss(ctx, out, target), on_step(ctx, student, step, steps)


@dataclass
class BlockContext:
    """What the recipe sees of block ``index``: the float block, its streams, a seeded generator."""

    index: int
    name: str  # full module name of the block, e.g. "vim.layers.3"
    block: nn.Module  # the float teacher (fp32 copy); recipes must not modify it
    family: ModelFamily  # the model's family adapter (how to run a block, the mixers' layout)
    generator: torch.Generator
    num_samples: int
    num_blocks: int
    # the stream state entering the block on each stream (for Vim ``(hidden, residual)``, residual None for block 0)
    streams: dict[str, tuple] = field(repr=False, default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # per-block notes the recipe or engine records
    workers: _Workers = field(repr=False, default=_serial)  # the engine's worker threads (pieces in fixed order)

    def inputs(self, stream: str = "float") -> tuple:
        """The stream state entering the block on the ``"float"`` or ``"quant"`` stream (the family's
        :meth:`~optimum_vim.models.family.ModelFamily.embed` / ``run_block`` state; Vim: ``(hidden, residual)``,
        residual None for block 0)."""
        if stream not in self.streams:
            raise ValueError(f"stream must be one of {sorted(self.streams)}; got {stream!r}")
        return self.streams[stream]

    def within(self, table: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of ``table`` (keyed by full module names) inside this block, keyed by their name relative to
        the block (``"vim.layers.3.mixer.in_proj"`` -> ``"mixer.in_proj"``), in ``table``'s order."""
        start = self.name + "."
        return {n[len(start):]: v for n, v in table.items() if n.startswith(start)}

    def capture(self, names: list[str], stream: str = "float") -> dict[str, torch.Tensor]:
        """The first positional input of each named submodule of the float block (names relative to the block,
        e.g. ``"mixer.in_proj"``) when the float block runs on ``stream``, concatenated over the calibration set."""
        return {n: got["x"] for n, got in self.capture_args(names, {"x": 0}, stream).items()}

    @torch.no_grad()
    def capture_args(self, names: list[str], positions: Mapping[str, int],
                     stream: str = "float") -> dict[str, dict[str, torch.Tensor]]:
        """Like :meth:`capture`, several positional inputs of each named submodule: ``{name: {key: tensor}}`` for
        ``positions = {key: argument index}`` (e.g. a scan's u, delta, B and C)."""
        chunks = list(_chunks(self.inputs(stream)))
        got = {n: {k: [None] * len(chunks) for k in positions} for n in names}
        current = threading.local()  # the chunk a worker is running, so that its inputs land in chunk order
        handles = []
        for n in names:
            mod = self.block.get_submodule(n)

            def keep(_m, args, n=n):
                for k, i in positions.items():
                    got[n][k][current.index] = args[i].detach()

            handles.append(mod.register_forward_pre_hook(keep))

        def run(i):
            current.index = i
            self.family.run_block(self.block, chunks[i])

        try:
            self.workers.map(run, range(len(chunks)))
        finally:
            for handle in handles:
                handle.remove()
        return {n: {k: torch.cat(v) for k, v in d.items()} for n, d in got.items()}


def _chunks(state: tuple, size: int = _CHUNK) -> Iterator[tuple]:
    """A stream state (tensors sharing the sample axis, or None) cut into pieces of ``size`` samples."""
    for i in range(0, state[0].shape[0], size):
        yield _take(state, slice(i, i + size))


def _take(state: tuple, index) -> tuple:
    """The samples ``index`` (a slice or an index tensor) of every tensor of a stream state."""
    return tuple(None if t is None else t[index] for t in state)


def _concat(states: list[tuple]) -> tuple:
    """Pieces of a stream state concatenated along the sample axis (in piece order)."""
    return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*states))


@torch.no_grad()
def _run_block(family, block: nn.Module, state: tuple, workers: _Workers = _serial) -> tuple:
    return _concat(workers.map(lambda piece: family.run_block(block, piece), _chunks(state)))


@contextlib.contextmanager
def fixed_threads(n: int = 1):
    """Runs the body with ``torch.set_num_threads(n)`` and restores the caller's setting."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Runs the body with every module of ``model`` in eval mode (no drop-path, no dropout in the embedding) and
    restores each module's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


def cosine_block_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PTQ4VM's block loss: mean over (batch, token) of ``1 - cos`` along the hidden dimension."""
    return (1 - nn.functional.cosine_similarity(out.float(), target.float(), dim=-1)).mean()


def nmse_block_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Magnitude-aware counterpart of :func:`cosine_block_loss`: mean over (batch, token) of
    ``|out - target|^2 / (2 |target|^2)`` along the hidden dimension.

    With ``r = |out| / |target|`` a token's term is ``(1 + r^2) / 2 - r cos``: it equals ``1 - cos`` when the norms
    match, but it also penalises a wrong norm, which the cosine cannot see. Measured on the fixture (W4A4): 100 JLSS
    steps on the cosine loss lower ``1 - cos`` of every block by 20-37 % while shrinking the block outputs to about
    0.88 of the float norm (0.95 before training), so the block's output SQNR falls; the residual stream adds the
    shrunken outputs and passes the error on."""
    out, target = out.float(), target.float()
    return ((out - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp(min=1e-12)).mean() / 2


BlockLoss = Literal["cosine", "nmse"]
BLOCK_LOSSES = {"cosine": cosine_block_loss, "nmse": nmse_block_loss}
"""Block losses a recipe can select by name (``recipe_args={"loss": ...}`` of PTQ4VM and OuroMamba)."""


class SelectableBlockLoss:
    """Mixin of recipes whose options carry ``loss`` (a :data:`BLOCK_LOSSES` name): the engine's ``block_loss``."""

    def block_loss(self, ctx: BlockContext, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return BLOCK_LOSSES[self.args.loss](out, target)


def _check_finite(t: torch.Tensor, what: str, block: str) -> None:
    if not torch.isfinite(t).all():
        raise BlockwiseCalibrationError(
            f"block {block}: {what} is not finite; the calibration diverged or the model produces NaN/inf there. "
            "Nothing was applied to the model. Lower the learning rates, check the calibration images, or skip this "
            "block (modules_to_not_convert)."
        )


def calibrate_blockwise(model: nn.Module, pixel_values: torch.Tensor, recipe: BlockRecipe, *, seed: int = 0,
                        desc: str = "calibrating", threads: int | None = None,
                        log: list[dict] | None = None) -> dict[str, LayerPlan]:
    """Calibrates ``model``'s blocks one after another with ``recipe`` and returns the ``LayerPlan``\\ s of all blocks
    (full module names). ``model`` is not modified. See the module docstring for the procedure.

    ``log``, when given, receives one dict per block: its name, the first and last training loss and
    ``quantized_loss``, the default cosine loss of the frozen quantized block (on the quantized stream) against the
    float target. ``threads``: worker threads (default :data:`CALIBRATION_THREADS`, else the caller's
    ``torch.get_num_threads()``); the plans do not depend on it."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[0] == 0:
        raise ValueError("block-wise calibration needs a non-empty (n, C, H, W) tensor of calibration images")
    if not torch.isfinite(pixel_values).all():
        raise ValueError("the calibration images contain NaN or inf values")
    family = family_of(model)
    device = next(model.parameters()).device
    blocks = family.blocks(model)
    plans: dict[str, LayerPlan] = {}
    threads = threads or CALIBRATION_THREADS or torch.get_num_threads()
    workers = _Workers(threads)
    with contextlib.closing(workers), fixed_threads(1), torch.no_grad(), _eval_mode(model):
        state = _concat([family.embed(model, p.to(device)) for p in pixel_values.split(_CHUNK)])
        streams = {"float": state, "quant": state}
        for i, (name, float_block) in enumerate(blocks):
            teacher = copy.deepcopy(float_block).float().eval()
            ctx = BlockContext(
                index=i, name=name, block=teacher, family=family,
                generator=torch.Generator().manual_seed(seed * 1_000_003 + i), num_samples=state[0].shape[0],
                num_blocks=len(blocks), streams=dict(streams), workers=workers,
            )
            next_float = _run_block(family, teacher, streams["float"], workers)
            target = family.block_output(next_float)
            _check_finite(target, "the float block's output", name)
            with torch.enable_grad():
                student = recipe.prepare_block(ctx)
                _train_block(ctx, recipe, student, target, desc)
            block_plans = recipe.finalize_block(ctx, student)
            for key, lp in block_plans.items():
                if not key.startswith(name + "."):
                    raise ValueError(f"finalize_block of {name} returned a plan for {key!r}, outside the block")
                for t_name, t in lp.tensors.items():
                    if t.is_floating_point():
                        _check_finite(t, f"the exported tensor {key}.{t_name}", name)
            plans.update(block_plans)
            quant_block = copy.deepcopy(teacher)
            local = QuantPlan(recipe="blockwise", layers={k[len(name) + 1:]: v for k, v in block_plans.items()})
            apply_plan(quant_block, local)
            next_quant = _run_block(family, quant_block, streams["quant"], workers)
            q_out = family.block_output(next_quant)
            _check_finite(q_out, "the quantized block's output", name)
            if log is not None:
                log.append({"block": name, **ctx.info, "quantized_loss": cosine_block_loss(q_out, target).item()})
            streams = {"float": next_float, "quant": next_quant}
            del teacher, student, quant_block
    return plans


def _train_block(ctx: BlockContext, recipe, student: nn.Module, target: torch.Tensor, desc: str) -> None:
    optimizer = recipe.block_optimizer(ctx, student)
    if optimizer is None:
        return
    steps, batch_size = recipe.block_schedule(ctx)
    if steps <= 0:
        return
    batch_size = min(batch_size, ctx.num_samples)
    state = ctx.inputs("quant")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    loss_fn = getattr(recipe, "block_loss", None)
    clip = getattr(recipe, "grad_clip", None)
    on_step = getattr(recipe, "on_step", None)
    # the student stays in eval mode (like the teacher): only the stand-ins' trainable tensors train, and drop-path /
    # dropout of a checkpoint saved with their rates must not drop inputs the float target never drops
    student.eval()
    bar = tqdm(range(steps), desc=f"{desc} block {ctx.index + 1}/{ctx.num_blocks}", leave=False,
               disable=None)
    first = last = None
    for step in bar:
        if batch_size >= ctx.num_samples:
            idx = None
        else:
            idx = torch.randperm(ctx.num_samples, generator=ctx.generator)[:batch_size].sort().values
            idx = idx.to(state[0].device)
        s = state if idx is None else _take(state, idx)
        t = target if idx is None else target[idx]
        optimizer.zero_grad(set_to_none=True)
        loss = _step_gradients(ctx, student, params, s, t, loss_fn)
        if not torch.isfinite(loss):
            raise BlockwiseCalibrationError(
                f"block {ctx.name}: the calibration loss became {loss.item()} at step {step + 1}/{steps}. Nothing was "
                "applied to the model; lower the learning rates or check the calibration images."
            )
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        if on_step is not None:
            on_step(ctx, student, step, steps)
        value = loss.item()
        first = value if first is None else first
        last = value
        bar.set_postfix(loss=f"{value:.5f}")
    ctx.info.update(first_loss=first, last_loss=last, steps=steps)


def _step_gradients(ctx: BlockContext, student: nn.Module, params: list[torch.Tensor], state: tuple, target,
                    loss_fn) -> torch.Tensor:
    """One training step's loss, its gradients accumulated into ``params``' ``.grad``: the batch's forward and backward
    in fixed pieces on the workers, the loss on the whole output (see the module docstring). Returns the loss."""
    params = [p for p in params if p.requires_grad]  # a recipe may freeze tensors while training (ViM-VQ)
    pieces = [slice(i, i + _TRAIN_CHUNK) for i in range(0, state[0].shape[0], _TRAIN_CHUNK)]
    family = ctx.family
    outs = ctx.workers.map(lambda sl: family.block_output(family.run_block(student, _take(state, sl))), pieces)
    out = torch.cat([o.detach() for o in outs]).requires_grad_(True)
    loss = loss_fn(ctx, out, target) if loss_fn is not None else cosine_block_loss(out, target)
    # the loss may also read parameters directly (a regulariser): those gradients come with the output's
    direct = torch.autograd.grad(loss, [out, *params], allow_unused=True)
    grad_out = direct[0]
    parts = ctx.workers.map(
        lambda i: torch.autograd.grad(outs[i], params, grad_outputs=grad_out[pieces[i]], allow_unused=True),
        range(len(pieces)))
    for k, p in enumerate(params):
        total = direct[1 + k]
        for part in parts:  # piece order: a fixed summation order
            g = part[k]
            if g is not None:
                total = g if total is None else total + g
        if total is not None:
            p.grad = total if p.grad is None else p.grad + total
    return loss.detach()
