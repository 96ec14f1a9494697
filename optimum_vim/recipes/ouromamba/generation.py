"""OuroMamba-Gen: synthetic calibration images for a Vision Mamba, optimised from Gaussian noise through the float
model (Ramachandran et al., ICCV 2025, stage 1; the methods specification §4.2).

The paper's generation loop is not in the official release (only a modified scan is), so the pieces below are built
from the method description; every choice the paper leaves open is marked ``[open]`` with what we picked.

Per block and scan direction, the float model's selective-scan inputs (Δ, A, B, C) are captured by pre-hooks on the
float scan modules the model's family adapter names (they stay in the autograd graph). From them:

1. **Implicit attention toward the class token.** Mamba's implicit attention of output token i to source token j is
   ``α[i, j, e] = Σ_n C_i[n] · Π_{k between j and i} exp(Δ_k[e] A[e, n]) · Δ_j[e] B_j[n]``. We take the row of the
   class token (its position in the family's token layout): the forward scan reaches the patches before it, the backward
   scan the patches after it, so each direction contributes one side of the grid and the two are summed ("both scan
   directions"). The product of Ā is computed in closed form, ``exp(A · Σ Δ)``, from a cumulative sum of Δ.
   Deviation from the official attention code: it stops the Ā product one step short of the class token (it omits the
   class token's own Ā_cls); we keep the exact recurrence, which includes it.
2. **Δ-weighted p×p patching** (``patch_size``, p = 5 by default, the paper's best; the official code uses 3):
   vectors on the patch grid are aggregated over each patch's p×p neighbourhood, weighted by ``w_k = Σ_e Δ_k[e]``
   min-max normalised to [0, 1], replicate padding at the borders. What is patched (``patching``):

   * ``"attention"`` (default, ours): the per-patch attention vectors ``α[cls, j]`` of step 1, ``(b, P, E)``.
   * ``"state"`` (the official ``state_fusion``): the hidden states ``h_j`` (b, P, E, N) of the scan are patched,
     and a patch's feature is the class token's read-out of its patched state carried to the class token,
     ``Σ_n C_cls[n] · exp(A[e, n] · Σ_{k between} Δ_k[e]) · h_p(j)[e, n]``: the attention of step 1 with the
     patched state in place of ``Δ_j B_j``. How the official loop turns its patched states into the loss is not
     released; this read-out is ours ([open]).

   The two are **not** equal: ``α[cls, j]`` depends on ``Δ_j B_j`` (what token j writes into the state), ``h_j`` on
   every token scanned before j and on the input u, so patching one is not patching the other. ``"state"`` keeps
   (b, L, E, N) states per scan for the backward pass (a step loop over the tokens), ``"attention"`` only (b, P, E).
   The min-max normalisation is taken **per image over its patches**:
   the official ``selective_scan_ref`` normalises along the batch axis (``dim=0``), which makes one image's weights
   depend on the other images in the batch; we treat that as unintended. The class token is excluded from the grid
   wherever the config puts it (the official code drops index 0, which is a patch in the midclstok models).
3. **Patch-level InfoNCE** (``L_C``, CLAMP-ViT style) over the enhanced attention vectors of the patches of one image:
   for every anchor patch, the ``positives`` (12) most cosine-similar other patches are its positives (selected
   without gradient), all other patches its negatives.
4. **Class output loss** (``L_O``): cross-entropy of the logits toward a target class sampled per image.
5. **Image priors** ([open], not in the paper): every iteration, each image enters the model rolled by a random
   shift of up to ``jitter`` pixels (default half the patch stride) and mirrored left-right at random (``flip``), and
   a total-variation term ``tv_weight · TV(x)`` (default 0.05) joins the loss. Without them the images stay pixel
   noise on the fixture; with them they show object shapes on a dark background and the quantized model calibrated
   on them comes 1.2 dB closer to the float one (benchmarks/RESULTS.md). ``jitter=0, flip=False, tv_weight=0`` is
   the paper's loop as described.

``L = contrastive_weight · mean_over_blocks(L_C) + class_weight · L_O (+ tv_weight · TV)``, minimised with Adam on the
pixels.

**Without a class token** ([open], ours; the paper reports MambaVision but releases no generation code for it). A
family whose head reads the mean of the tokens (MambaVision) has no class-token row to read, so step 1 reads the row
of the **pooled output** instead: ``Σ_i α[i, j, e]`` over the outputs ``i`` the scan carries token ``j`` to (padding
left out), the derivative of the pooled scan output by ``u_j`` (:func:`pooled_attention`; with ``patching="state"``
the patched states are read out the same way, :func:`pooled_state_attention`). Where the tokens lie comes from the
family adapter (:class:`~optimum_vim.models.family.ScanGrid`: MambaVision's scans run on the windows of each stage's
map, zero-padded to whole windows), so steps 2-3 work on each block's own map; blocks whose map has fewer than 3
positions cannot feed the InfoNCE and are left out when ``layers`` is None. Every map, with or without a class
token: the p×p neighbourhood is capped at the largest odd size that fits the map's shorter side ([open]: a larger one
covers every patch and leaves nothing to contrast).
Images never interact (no batch statistics), so they are optimised in independent chunks of ``batch_size``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...models.family import ScanGrid, family_of

logger = logging.getLogger(__name__)


class GenerationDivergedError(RuntimeError):
    """The generation loss became NaN or infinite; the message names the iteration (no images are returned)."""


# ---------------------------------------------------------------------------------------------------------------
# model access (through the model's family adapter)
def _float_model(model: nn.Module):
    family = family_of(model)
    family.check_float(model, "generate_calibration_images")
    return family


def _class_token(family, model) -> tuple[int, int]:
    """(class-token position, patch-grid side) of the model's token layout."""
    layout = family.token_layout(model)
    if layout.class_token is None:
        raise ValueError("OuroMamba-Gen reads the implicit attention towards the class token; this model's tokens "
                         "have no class token")
    if layout.grid[0] != layout.grid[1]:
        raise ValueError(f"OuroMamba-Gen's patching assumes a square patch grid; got {layout.grid}")
    return layout.class_token, layout.grid[0]


def _scan_modules(family, model: nn.Module, layers: Sequence[int] | None) -> list[tuple[int, bool, nn.Module]]:
    blocks = [name for name, _ in family.blocks(model)]
    depth = len(blocks)
    chosen = range(depth) if layers is None else layers
    mixers = family.mixers(model)
    out = []
    for i in chosen:
        if not isinstance(i, int) or not -depth <= i < depth:
            raise ValueError(f"layers must be block indices in [0, {depth}); got {list(layers)}")
        for mixer in (m for m in mixers if m.block == blocks[i]):
            for d in mixer.layout.directions:
                mod = mixer.module.get_submodule(d.scan)
                if not isinstance(mod, family.float_scan_class):
                    raise TypeError(
                        f"block {i}'s {d.scan} is a {type(mod).__name__}, not the float "
                        f"{family.float_scan_class.__name__}: generation runs on the float model (call it before "
                        "quantizing, or on a fresh from_pretrained)"
                    )
                out.append((i % depth, d.reverse, mod))
    if not out:
        raise ValueError("layers selects no block; pass None (all blocks) or a non-empty list of block indices")
    return out


def _contrastive_scans(family, model: nn.Module, layers: Sequence[int] | None):
    """The scans feeding ``L_C`` and, per block, where its scan tokens lie (:class:`ScanGrid`). With a class token
    every chosen block's scans (a square grid of at least 3 patches); without one, the chosen blocks whose maps
    have at least 3 patches (``layers=None`` skips the others, naming one of them is refused)."""
    modules = _scan_modules(family, model, layers)
    grids = {i: family.scan_grid(model, i) for i in sorted({i for i, _, _ in modules})}
    layout = family.token_layout(model)
    if layout.class_token is not None:
        _class_token(family, model)  # present and on a square grid
        if layout.num_patches < 3:
            raise ValueError(f"the patch InfoNCE needs at least 3 patches; this model has {layout.num_patches}")
        return modules, grids
    small = {i: g for i, g in grids.items() if g.num_patches < 3}
    if layers is not None and small:
        i, g = next(iter(small.items()))
        raise ValueError(f"the patch InfoNCE needs at least 3 patches per image; block {i}'s scans see a "
                         f"{g.rows}x{g.cols} map: leave it out of layers")
    chosen = [m for m in modules if m[0] not in small]
    if not chosen:
        raise ValueError("the patch InfoNCE needs at least 3 patches per image, and no block's scans see that many "
                         "at this image size: pass contrastive_weight=0 (the class output loss only)")
    return chosen, grids


# ---------------------------------------------------------------------------------------------------------------
# the enhanced implicit attention
Patching = Literal["attention", "state"]
PATCHINGS = typing.get_args(Patching)


def _class_gap(delta: torch.Tensor, cls_pos: int, reverse: bool) -> tuple[slice, torch.Tensor] | None:
    """The tokens one scan direction carries into the class token's state and, for each, ``Σ Δ_k`` over the steps
    between it and the class token: ``(source slice, gap (b, J, E))``; None when the direction reaches no token."""
    length = delta.shape[1]
    if not reverse:
        if cls_pos == 0:
            return None
        # Σ_{k=j+1}^{cls} Δ_k for j < cls: a suffix sum over tokens 1..cls
        return slice(0, cls_pos), delta[:, 1 : cls_pos + 1].flip(1).cumsum(1).flip(1)
    if cls_pos == length - 1:
        return None
    # the backward scan walks j, j-1, ..., cls: Σ_{k=cls}^{j-1} Δ_k for j > cls
    return slice(cls_pos + 1, length), delta[:, cls_pos : length - 1].cumsum(1)


def class_token_attention(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, cls_pos: int,
                          reverse: bool) -> torch.Tensor:
    """Implicit attention of the class token's output to every token of one scan direction.

    Args:
        delta: (b, L, E) soft-plussed step sizes. A: (E, N). B, C: (b, L, N). cls_pos: class-token index.
        reverse: the backward scan (it reaches the tokens after the class token).

    Returns:
        (b, L, E) fp32: ``α[cls, j, e]`` for the tokens the direction carries into the class token's state, zero for
        the class token itself and for the tokens on the other side.
    """
    b, length, e = delta.shape
    delta, A, B, C = delta.float(), A.float(), B.float(), C.float()
    out = delta.new_zeros(b, length, e)
    c_cls = C[:, cls_pos]  # (b, N)
    carried = _class_gap(delta, cls_pos, reverse)
    if carried is None:
        return out
    src, gap = carried
    decay = torch.exp(gap.unsqueeze(-1) * A)  # (b, J, E, N), exponent <= 0
    bc = B[:, src] * c_cls.unsqueeze(1)  # (b, J, N)
    out[:, src] = torch.einsum("bjen,bjn->bje", decay, bc) * delta[:, src]
    return out


def class_token_state_attention(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                                C: torch.Tensor, cls_pos: int, reverse: bool, grid: int,
                                patch_size: int) -> torch.Tensor:
    """``patching="state"``: the scan's hidden states ``h_t`` (all tokens, scan order) are Δ-weighted p×p patched on
    the patch grid (the official ``state_fusion``; class token excluded), then read out by the class token after
    being carried to it (module docstring, step 2).

    Args: u, delta (b, L, E); A (E, N); B, C (b, L, N); grid: patches per side; patch_size: p.

    Returns:
        (b, P, E) fp32 per patch (class token removed), zero for the patches on the other side of the class token.
    """
    b, length, e = delta.shape
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    n = A.shape[1]
    states = scan_states(u, delta, A, B, reverse)
    patches = torch.cat([states[:, :cls_pos], states[:, cls_pos + 1 :]], dim=1).reshape(b, length - 1, e * n)
    patched = patch_neighbourhood(patches, patch_weights(delta, cls_pos), grid, patch_size).reshape(b, -1, e, n)
    patched = torch.cat([patched[:, :cls_pos], patched.new_zeros(b, 1, e, n), patched[:, cls_pos:]], dim=1)
    out = delta.new_zeros(b, length, e)
    carried = _class_gap(delta, cls_pos, reverse)
    if carried is not None:
        src, gap = carried
        carry = torch.exp(gap.unsqueeze(-1) * A) * patched[:, src]  # (b, J, E, N)
        out[:, src] = torch.einsum("bjen,bn->bje", carry, C[:, cls_pos])
    return torch.cat([out[:, :cls_pos], out[:, cls_pos + 1 :]], dim=1)


def scan_states(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                reverse: bool) -> torch.Tensor:
    """The hidden states ``h_t = exp(Δ_t A) h_(t-1) + Δ_t u_t B_t`` of one scan direction, fp32 (b, L, E, N) in token
    order (``reverse``: the scan walks the tokens from the last)."""
    b, length, e = delta.shape
    u, delta, A, B = u.float(), delta.float(), A.float(), B.float()
    # per-token views by unbind (its backward is one stack; indexing decay[:, t] would allocate a full-size gradient
    # per token in the backward pass)
    decay = torch.exp(delta.unsqueeze(-1) * A).unbind(1)  # L x (b, E, N)
    write = ((delta * u).unsqueeze(-1) * B.unsqueeze(2)).unbind(1)  # Δ_t u_t B_t
    h = delta.new_zeros(b, e, A.shape[1])
    states = [None] * length
    for t in (range(length - 1, -1, -1) if reverse else range(length)):
        h = decay[t] * h + write[t]
        states[t] = h
    return torch.stack(states, 1)


def pooled_readout(delta: torch.Tensor, A: torch.Tensor, C: torch.Tensor, real: torch.Tensor,
                   reverse: bool) -> torch.Tensor:
    """How the pooled output of one scan direction reads each token's state (families without a class token).

    ``R_j[e, n] = Σ_i real_i · C_i[n] · exp(A[e, n] · Σ_{k between j and i} Δ_k[e])`` over the outputs ``i`` the scan
    carries token ``j`` to (``i >= j``; ``i <= j`` for ``reverse``), by the recurrence
    ``R_j = real_j C_j + exp(Δ_(j+1) A) R_(j+1)``. ``real`` (b, L) bool masks padding out of the pool.

    Returns: (b, L, E, N) fp32.
    """
    delta, A, C = delta.float(), A.float(), C.float()
    read = C * real.unsqueeze(-1).to(C.dtype)
    if reverse:
        delta, read = delta.flip(1), read.flip(1)
    length, e = delta.shape[1], delta.shape[2]
    decay = torch.exp(delta.unsqueeze(-1) * A).unbind(1)  # L x (b, E, N)
    read = read.unsqueeze(2).unbind(1)  # L x (b, 1, N)
    r = read[length - 1].expand(-1, e, -1)
    out = [None] * length
    out[length - 1] = r
    for j in range(length - 2, -1, -1):
        r = read[j] + decay[j + 1] * r
        out[j] = r
    out = torch.stack(out, 1)
    return out.flip(1) if reverse else out


def pooled_attention(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, real: torch.Tensor,
                     reverse: bool) -> torch.Tensor:
    """Implicit attention of the pooled output to every token of one scan direction (families without a class token,
    whose head reads the mean of the tokens): ``Σ_i real_i α[i, j, e]`` = ``Σ_n R_j[e, n] Δ_j[e] B_j[n]``
    (:func:`pooled_readout`), the derivative of the sum of the real outputs by ``u_j`` less the skip term. The mean
    the head reads divides it by the map's positions, a constant the InfoNCE's cosine ignores.

    Args: delta (b, L, E); A (E, N); B, C (b, L, N); real (b, L) bool. Returns: (b, L, E) fp32.
    """
    readout = pooled_readout(delta, A, C, real, reverse)
    return torch.einsum("bjen,bjn->bje", readout, B.float()) * delta.float()


def pooled_state_attention(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                           grid: ScanGrid, reverse: bool, patch_size: int) -> torch.Tensor:
    """``patching="state"`` without a class token: the scan's hidden states are Δ-weighted p×p patched on the map
    (:class:`~optimum_vim.models.family.ScanGrid`), then read out by the pooled output (:func:`pooled_readout`).

    Args: u, delta (scan batch, L, E); A (E, N); B, C (scan batch, L, N). Returns: (images, P, E) fp32 per map position.
    """
    e, n = delta.shape[2], A.shape[1]
    states = grid.to_grid(scan_states(u, delta, A, B, reverse))  # (images, P, E, N)
    images = states.shape[0]
    patched = patch_neighbourhood(states.reshape(images, grid.num_patches, e * n), patch_weights(delta, grid=grid),
                                  (grid.rows, grid.cols), patch_size)
    patched = grid.from_grid(patched.reshape(images, grid.num_patches, e, n))
    readout = pooled_readout(delta, A, C, grid.real_tokens(images, delta.device), reverse)
    return grid.to_grid(torch.einsum("bjen,bjen->bje", readout, patched))


def patch_weights(delta: torch.Tensor, cls_pos: int | None = None, grid: ScanGrid | None = None) -> torch.Tensor:
    """(b, L, E) Δ -> (images, P) patching weights: Σ_e Δ per patch token, min-max normalised per image. Give one of
    ``cls_pos`` (the class-token index: the other tokens are the patches) or ``grid`` (where the scan tokens lie on
    the map, :class:`ScanGrid`). A constant Δ map gives all-ones weights (plain neighbourhood sum)."""
    if (cls_pos is None) == (grid is None):
        raise TypeError("patch_weights takes one of cls_pos or grid")
    w = delta.float().sum(-1)
    if grid is not None:
        w = grid.to_grid(w)
    else:
        w = torch.cat([w[:, :cls_pos], w[:, cls_pos + 1 :]], dim=1)
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (w - lo) / span.clamp_min(torch.finfo(w.dtype).tiny), torch.ones_like(w))


def patch_neighbourhood(features: torch.Tensor, weights: torch.Tensor, grid: int | tuple[int, int],
                        patch_size: int) -> torch.Tensor:
    """Δ-weighted p×p aggregation on the patch grid: ``f_p(τ) = Σ_{k∈N_p(τ)} w_k f(k)``, replicate padding.

    Args:
        features: (b, P, E) per-patch vectors in row-major grid order (P = rows * cols). weights: (b, P).
        grid: patches per side, or ``(rows, cols)``.
        patch_size: p, capped at the largest odd size that fits the map's shorter side.

    Returns:
        (b, P, E).
    """
    b, p_count, e = features.shape
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    if p_count != rows * cols:
        raise ValueError(f"expected {rows * cols} patches for a {rows}x{cols} grid; got {p_count}")
    x = (features * weights.unsqueeze(-1)).transpose(1, 2).reshape(b, e, rows, cols)
    # [open] a neighbourhood no larger than the map: on a map shorter than p a p x p window covers every patch (all
    # replicate padding beyond the map), every patch gets the same features and the InfoNCE has no gradient
    patch_size = min(patch_size, (min(rows, cols) - 1) // 2 * 2 + 1)
    if patch_size > 1:
        half = patch_size // 2
        x = F.pad(x, (half, half, half, half), mode="replicate")
        x = F.avg_pool2d(x, patch_size, stride=1) * float(patch_size * patch_size)
    return x.reshape(b, e, p_count).transpose(1, 2)


def patch_info_nce(features: torch.Tensor, positives: int, temperature: float) -> torch.Tensor:
    """Patch-level InfoNCE within each image: for each anchor, the ``positives`` most cosine-similar other patches
    (chosen without gradient) against all other patches. features: (b, P, E) -> scalar (mean over anchors, images)."""
    b, p_count, _ = features.shape
    k = min(positives, p_count - 2)  # [open] small grids: keep at least one negative
    if k < 1:
        raise ValueError(f"the patch InfoNCE needs at least 3 patches per image; this model has {p_count}")
    f = F.normalize(features, dim=-1, eps=1e-12)
    logits = f @ f.transpose(1, 2) / temperature  # (b, P, P)
    eye = torch.eye(p_count, dtype=torch.bool, device=features.device)
    logits = logits.masked_fill(eye, float("-inf"))
    pos_idx = logits.detach().topk(k, dim=-1).indices
    pos = torch.gather(logits, -1, pos_idx)
    return (torch.logsumexp(logits, -1) - torch.logsumexp(pos, -1)).mean()


# ---------------------------------------------------------------------------------------------------------------
# the generation loss
class _ScanCapture:
    """Forward pre-hooks on the chosen scan modules, keeping their (Δ, A, B, C) inputs of the last forward."""

    def __init__(self, modules):
        self.modules = modules
        self.captured: dict[tuple[int, bool], tuple] = {}
        self.handles = []

    def __enter__(self):
        for layer, reverse, mod in self.modules:
            def hook(_mod, args, key=(layer, reverse)):
                self.captured[key] = tuple(args[:5])  # (u, Δ, A, B, C)

            self.handles.append(mod.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def generation_loss(model: nn.Module, pixel_values: torch.Tensor, targets: torch.Tensor | None = None, *,
                    patch_size: int = 5, positives: int = 12, temperature: float = 0.1,
                    contrastive_weight: float = 1.0, class_weight: float = 1.0,
                    layers: Sequence[int] | None = None,
                    patching: str = "attention") -> tuple[torch.Tensor, dict[str, float]]:
    """OuroMamba-Gen's loss on a batch of images (differentiable w.r.t. ``pixel_values``); ``patching``: what the
    Δ-weighted patching aggregates (module docstring, step 2).

    Returns ``(loss, {"loss", "contrastive", "class"})``; the dict holds floats for logging.
    """
    family = _float_model(model)
    if patching not in PATCHINGS:
        raise ValueError(f"patching must be one of {PATCHINGS}; got {patching!r}")
    if class_weight and not family.num_labels(model):
        raise ValueError("the class output loss needs a classifier head: pass an image classifier, or "
                         "class_weight=0 for the contrastive loss only")
    if contrastive_weight:
        modules, grids = _contrastive_scans(family, model, layers)
    else:  # the class output loss alone reads no scan
        modules, grids = [], {}
    with _ScanCapture(modules) as cap:
        logits = family.logits(model, pixel_values)
    parts = {}
    total = pixel_values.new_zeros((), dtype=torch.float32)
    if contrastive_weight:
        per_layer: dict[int, torch.Tensor] = {}
        for (layer, _reverse), (u, delta, A, B, C) in sorted(cap.captured.items()):
            grid = grids[layer]
            if grid.class_token is None:  # the pooled output's attention on the block's map
                patched = _pooled_features(u, delta, A, B, C, grid, _reverse, patch_size, patching)
            else:
                patched = _class_token_features(u, delta, A, B, C, grid, _reverse, patch_size, patching)
            per_layer[layer] = per_layer[layer] + patched if layer in per_layer else patched
        l_c = torch.stack([patch_info_nce(f, positives, temperature) for f in per_layer.values()]).mean()
        total = total + contrastive_weight * l_c
        parts["contrastive"] = float(l_c.detach())
    if class_weight:
        if targets is None:
            raise ValueError("class_weight > 0 needs target classes")
        l_o = F.cross_entropy(logits.float(), targets)
        total = total + class_weight * l_o
        parts["class"] = float(l_o.detach())
    parts["loss"] = float(total.detach())
    return total, parts


def _class_token_features(u, delta, A, B, C, grid: ScanGrid, reverse: bool, patch_size: int,
                          patching: str) -> torch.Tensor:
    """(b, P, E) enhanced attention towards the class token of one scan direction (module docstring, steps 1-2) on
    its square grid (checked by :func:`_contrastive_scans`)."""
    cls_pos, side = grid.class_token, grid.rows
    if patching == "state":
        return class_token_state_attention(u, delta, A, B, C, cls_pos, reverse, side, patch_size)
    attn = grid.to_grid(class_token_attention(delta, A, B, C, cls_pos, reverse))  # (b, P, E) patch tokens only
    return patch_neighbourhood(attn, patch_weights(delta, cls_pos), side, patch_size)


def _pooled_features(u, delta, A, B, C, grid: ScanGrid, reverse: bool, patch_size: int,
                     patching: str) -> torch.Tensor:
    """(images, P, E) enhanced attention of the pooled output of one scan direction on its block's map (module
    docstring, "Without a class token")."""
    if patching == "state":
        return pooled_state_attention(u, delta, A, B, C, grid, reverse, patch_size)
    images = delta.shape[0] // grid.scans_per_image
    attn = grid.to_grid(pooled_attention(delta, A, B, C, grid.real_tokens(images, delta.device), reverse))
    return patch_neighbourhood(attn, patch_weights(delta, grid=grid), (grid.rows, grid.cols), patch_size)


# ---------------------------------------------------------------------------------------------------------------
# the public generator
def _pixel_bounds(processor, channels: int):
    """Valid range of normalised pixels, (lo, hi) each (1, C, 1, 1), from a processor's mean/std; None without one."""
    if processor is None:
        return None
    mean = torch.as_tensor(processor.image_mean, dtype=torch.float32).reshape(-1)
    std = torch.as_tensor(processor.image_std, dtype=torch.float32).reshape(-1)
    if mean.numel() == 1:
        mean, std = mean.expand(channels), std.expand(channels)
    if mean.numel() != channels or std.numel() != channels:
        raise ValueError(f"processor mean/std have {mean.numel()} channels; the model has {channels}")
    lo, hi = (0.0 - mean) / std, (1.0 - mean) / std
    return lo.reshape(1, -1, 1, 1), hi.reshape(1, -1, 1, 1)


def to_pil_images(images: torch.Tensor, processor=None) -> list:
    """(n, C, H, W) normalised pixels -> PIL images (un-normalised with the processor's mean/std when given)."""
    from PIL import Image

    x = images.detach().float().cpu()
    if processor is not None:
        mean = torch.as_tensor(processor.image_mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std = torch.as_tensor(processor.image_std, dtype=torch.float32).reshape(1, -1, 1, 1)
        x = x * std + mean
    else:  # no statistics known: stretch each image to [0, 1] for display
        lo = x.amin((1, 2, 3), keepdim=True)
        hi = x.amax((1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0], mode="L") if a.shape[-1] == 1 else Image.fromarray(a) for a in arr]


def _sample_targets(n: int, num_labels: int, generator: torch.Generator) -> torch.Tensor:
    # [open] the paper does not say how target classes are drawn: class-balanced (each class n / num_labels times,
    # the remainder to random classes), shuffled with the seed
    base = torch.arange(n) % num_labels
    return base[torch.randperm(n, generator=generator)]


@dataclass(frozen=True)
class GenerationOptions:
    """OuroMamba-Gen's options, declared once: :func:`generate_calibration_images` takes them as keywords (or as
    ``options=``) and the OuroMamba recipe exposes the ones the paper varies as ``recipe_args`` (``gen_*``,
    ``patch_size``, ``positives``, ``contrastive_weight``). See :func:`generate_calibration_images` for each."""

    iterations: int = 1000
    patch_size: int = 5
    positives: int = 12
    temperature: float = 0.1
    lr: float = 0.1
    batch_size: int = 32
    contrastive_weight: float = 1.0
    class_weight: float = 1.0
    jitter: int | None = None  # None: half the patch stride
    flip: bool = True
    tv_weight: float = 0.05
    patching: Patching = "attention"

    @classmethod
    def build(cls, values: dict, base: GenerationOptions | None = None) -> GenerationOptions:
        """``base`` (default: the defaults) with ``values`` set, each checked against its declared type, validated."""
        from ...options import coerce_fields, field_types

        types_ = field_types(cls)
        unknown = sorted(set(values) - set(types_))
        if unknown:
            raise TypeError(f"generate_calibration_images got unexpected options {unknown}; its options are "
                            f"{sorted(types_)}")
        opts = dataclasses.replace(base or cls(), **coerce_fields(types_, values))
        opts.validate()
        return opts

    def validate(self, names: dict[str, str] | None = None, owner: str = "") -> None:
        """Range checks; ``names`` / ``owner`` word the errors as the caller's options (the recipe's ``gen_*``)."""
        names = names or {}

        def word(field: str) -> str:
            return f"{owner} {names.get(field, field)}".strip()

        checks = [
            (self.iterations >= 0, "iterations", "must be an int >= 0"),
            (self.patch_size >= 1 and self.patch_size % 2 == 1, "patch_size",
             "must be an odd int >= 1 (a centred p x p neighbourhood; the paper uses 5)"),
            (self.positives >= 1, "positives", "must be an int >= 1"),
            (self.temperature > 0 and math.isfinite(self.temperature), "temperature", "must be > 0"),
            (self.lr > 0 and math.isfinite(self.lr), "lr", "must be > 0"),
            (self.batch_size >= 1, "batch_size", "must be a positive int"),
            (self.contrastive_weight >= 0 and math.isfinite(self.contrastive_weight), "contrastive_weight",
             "must be a number >= 0"),
            (self.class_weight >= 0 and math.isfinite(self.class_weight), "class_weight", "must be a number >= 0"),
            (self.jitter is None or self.jitter >= 0, "jitter",
             "must be an int >= 0 (pixels of random shift per axis; 0: off) or None (half the patch stride)"),
            (self.tv_weight >= 0 and math.isfinite(self.tv_weight), "tv_weight", "must be a number >= 0 (0: off)"),
        ]
        for ok, field, text in checks:
            if not ok:
                raise ValueError(f"{word(field)} {text}; got {getattr(self, field)!r}")
        if self.contrastive_weight + self.class_weight <= 0:
            raise ValueError(f"{word('contrastive_weight')} and {word('class_weight')} must not both be 0")


@torch.enable_grad()  # the pixels are trained by backprop, also when the caller quantizes under no_grad
def generate_calibration_images(
    model: nn.Module,
    n: int = 128,
    *,
    targets: torch.Tensor | Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    processor=None,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, int, dict], None] | None = None,
    return_pil: bool = False,
    return_targets: bool = False,
    options: GenerationOptions | None = None,
    **option_values,
):
    """Generates ``n`` data-free calibration images with OuroMamba-Gen (see the module docstring for the loss).

    Args (the options of :class:`GenerationOptions` are keywords too, or given together as ``options``):
        model: the float image classifier (``VimForImageClassification``, ``MambaVisionForImageClassification``;
            a backbone with ``class_weight=0``), of a family with an adapter (:mod:`optimum_vim.models.family`). It is
            not modified (its parameters' ``requires_grad`` and train/eval mode are restored). Without a class token
            (MambaVision) the attention read is the pooled output's (module docstring).
        n: number of images (the paper: 128). iterations: Adam steps per image (the paper: 1000).
        patch_size: odd neighbourhood side p of the state patching (paper's best 5; 1 disables patching).
        positives: positives per anchor patch in the InfoNCE (paper: top 12).
        temperature: InfoNCE temperature. [open] not given by the paper; 0.1.
        lr: Adam learning rate on the normalised pixels. [open] not given; 0.1 (CLAMP-ViT-style Adam on pixels).
        batch_size: images optimised together; images are independent, so this only bounds memory.
        contrastive_weight, class_weight: weights of ``L_C`` and ``L_O`` ([open] the paper sums them: 1 and 1;
            ``contrastive_weight=0`` is the "class loss only" ablation).
        targets: (n,) target classes; default class-balanced and shuffled with ``seed``.
        layers: block indices whose scans feed ``L_C`` ([open] default all blocks, averaged; without a class token
            the blocks whose map has at least 3 positions).
        jitter, flip: [open] image priors the paper does not mention (DeepInversion-style augmentation): at every
            iteration each image enters the model rolled by a random shift of up to ``jitter`` pixels per axis
            (``None``: half the patch stride, 2 pixels on the fixture) and, with ``flip``, mirrored left-right with
            probability 1/2 (drawn per image from ``seed``, so the images still do not depend on ``batch_size``).
            ``jitter=0, flip=False, tv_weight=0`` is the paper's loop as described.
        tv_weight: [open] weight of a total-variation prior added to the loss (mean squared difference of
            neighbouring normalised pixels per image); 0: off (the paper's loss ``L_C + L_O`` alone). With the
            priors the images show object shapes on a dark background instead of pixel noise, and W4A4O8 calibrated
            on them gains 1.2 dB logit SQNR on the fixture (benchmarks/RESULTS.md).
        patching: ``"attention"`` (ours) patches the class-token attention vectors, ``"state"`` the hidden states as
            the official ``state_fusion`` (module docstring, step 2; more memory: (b, L, E, N) per scan).
        processor: the model's image processor; when given, pixels are kept inside the valid normalised range
            (the image of [0, 1] under its mean/std) and PIL images are un-normalised with it.
        seed: seeds the Gaussian init and the target sampling; equal seeds give bit-identical images.
        callback: called as ``callback(iteration, chunk_index, parts)`` after every step (``parts``: float losses).
        return_pil: return a list of PIL images instead of a tensor. return_targets: also return the targets.

    Returns:
        ``(n, C, H, W)`` fp32 normalised pixel values (model input space) on the model's device, or PIL images;
        with ``return_targets`` a tuple ``(images, targets)``.

    Raises:
        GenerationDivergedError: the loss became NaN / infinite (names the iteration; nothing is returned).
    """
    family = _float_model(model)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    opts = GenerationOptions.build(option_values, options)
    iterations, patch_size, positives, temperature = opts.iterations, opts.patch_size, opts.positives, opts.temperature
    lr, batch_size, contrastive_weight, class_weight = opts.lr, opts.batch_size, opts.contrastive_weight, opts.class_weight
    flip, tv_weight, patching = opts.flip, opts.tv_weight, opts.patching
    jitter = max(1, family.patch_stride(model) // 2) if opts.jitter is None else opts.jitter
    num_labels = family.num_labels(model)
    if class_weight and not num_labels:
        raise ValueError("the class output loss needs a classifier head: pass an image classifier, or "
                         "class_weight=0")
    # validates the block selection (and, for L_C, the maps its scans see) before any work
    if contrastive_weight:
        _contrastive_scans(family, model, layers)
    else:
        _scan_modules(family, model, layers)
    param = next(model.parameters())
    device = param.device
    gen = torch.Generator().manual_seed(seed)
    channels, height, width = family.input_shape(model)
    # Gaussian noise in the model's (normalised) input space, drawn once for all images so that the images do not
    # depend on batch_size
    init = torch.randn(n, channels, height, width, generator=gen)
    if targets is None:
        tgt = _sample_targets(n, num_labels, gen) if class_weight else torch.zeros(n, dtype=torch.long)
    else:
        tgt = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
        if tgt.numel() != n or (class_weight and (tgt.min() < 0 or tgt.max() >= num_labels)):
            raise ValueError(f"targets must be {n} class indices in [0, {num_labels}); got {tgt.tolist()[:8]}...")
    # per image and iteration: (dy, dx) roll and mirror flag of the augmentation prior (drawn only when it is on, so
    # that with the priors off the images are exactly those of the paper's loop)
    shifts = torch.randint(-jitter, jitter + 1, (n, iterations, 2), generator=gen) if jitter else None
    mirrors = (torch.rand(n, iterations, generator=gen) < 0.5) if flip else None
    bounds = _pixel_bounds(processor, channels)
    if bounds is not None:
        init = torch.maximum(torch.minimum(init, bounds[1]), bounds[0])
        bounds = (bounds[0].to(device), bounds[1].to(device))
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    chunks = list(range(0, n, batch_size))
    bar = tqdm(total=len(chunks) * iterations, desc="ouromamba-gen", unit="it", disable=not progress)
    out = []
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        for ci, start in enumerate(chunks):
            x = init[start : start + batch_size].to(device=device, dtype=param.dtype).clone().requires_grad_(True)
            t = tgt[start : start + batch_size].to(device)
            # [open] optimizer: Adam with default betas on the pixels, constant learning rate
            opt = torch.optim.Adam([x], lr=lr)
            for it in range(iterations):
                opt.zero_grad(set_to_none=True)
                rows = slice(start, start + batch_size)
                seen = _augment(x, None if shifts is None else shifts[rows, it],
                                None if mirrors is None else mirrors[rows, it])
                loss, parts = generation_loss(
                    model, seen, t, patch_size=patch_size, positives=positives, temperature=temperature,
                    contrastive_weight=contrastive_weight, class_weight=class_weight, layers=layers,
                    patching=patching,
                )
                if tv_weight:
                    tv = total_variation(x)
                    loss = loss + tv_weight * tv
                    parts["tv"] = float(tv.detach())
                    parts["loss"] = float(loss.detach())
                if not torch.isfinite(loss):
                    raise GenerationDivergedError(
                        f"OuroMamba-Gen diverged at iteration {it} (images {start}..{start + x.shape[0] - 1}): "
                        f"loss {parts['loss']}; lower lr (now {lr}) or pass a processor to bound the pixels"
                    )
                loss.backward()
                opt.step()
                if bounds is not None:
                    with torch.no_grad():
                        x.copy_(torch.maximum(torch.minimum(x, bounds[1]), bounds[0]))
                if callback is not None:
                    callback(it, ci, parts)
                bar.update(1)
                if it % 10 == 0 or it == iterations - 1:
                    bar.set_postfix(loss=f"{parts['loss']:.4f}")
            out.append(x.detach().float())
    finally:
        bar.close()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    images = torch.cat(out, 0)
    logger.info("OuroMamba-Gen: %d images, %d iterations each", n, iterations)
    result = to_pil_images(images, processor) if return_pil else images
    return (result, tgt) if return_targets else result


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean over images of the mean squared difference of vertically and horizontally neighbouring pixels."""
    dv = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean((1, 2, 3))
    dh = (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean((1, 2, 3))
    return (dv + dh).mean()


def _augment(x: torch.Tensor, shifts: torch.Tensor | None, mirrors: torch.Tensor | None) -> torch.Tensor:
    """Each image rolled by its (dy, dx) and mirrored left-right where its flag is set (differentiable); ``x``
    itself when both are None (the priors off)."""
    if shifts is None and mirrors is None:
        return x
    shifts = [(0, 0)] * len(x) if shifts is None else shifts.tolist()
    mirrors = [False] * len(x) if mirrors is None else mirrors.tolist()
    out = []
    for img, (dy, dx), m in zip(x, shifts, mirrors):
        img = torch.roll(img, shifts=(dy, dx), dims=(-2, -1)) if dy or dx else img
        out.append(img.flip(-1) if m else img)
    return torch.stack(out)


__all__ = [
    "PATCHINGS",
    "GenerationOptions",
    "GenerationDivergedError",
    "to_pil_images",
    "class_token_attention",
    "class_token_state_attention",
    "pooled_attention",
    "pooled_readout",
    "pooled_state_attention",
    "scan_states",
    "generate_calibration_images",
    "generation_loss",
    "patch_info_nce",
    "patch_neighbourhood",
    "patch_weights",
]
