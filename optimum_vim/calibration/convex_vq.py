"""Trainable stand-ins of ViM-VQ (methods.md §5.3-5.4): each sub-vector is a convex combination of its top-n nearest
codewords (the "hull"), with softmax ratios; codewords and ratios train jointly on the block-wise loss, hulls are
adaptively re-chosen, and sub-vectors are confirmed (hardened to one codeword and frozen) incrementally.

Calibration-only: :meth:`ConvexVQWeight.export` turns the trained state into a :class:`~.vq.VQWeight` (hard indices,
codebook rounded to its storage dtype), i.e. the buffers of a ``QLinear`` in the codebook format.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .vq import VQWeight, merge_subvectors, round_to_storage, split_subvectors


def _nearest_k(x: torch.Tensor, codebook: torch.Tensor, n: int, exclude: torch.Tensor | None = None,
               chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances (M, n) ascending and indices (M, n) of the ``n`` nearest codewords of each row of ``x`` (M, d),
    in float64 and chunked (a (M, C) distance matrix of a large layer would not fit); ``exclude`` (M, e) indices are
    skipped."""
    cd = codebook.detach().double()
    dists, idxs = [], []
    for start in range(0, x.shape[0], chunk):
        d = torch.cdist(x[start : start + chunk].detach().double(), cd)
        if exclude is not None:
            d.scatter_(1, exclude[start : start + chunk], float("inf"))
        v, i = d.topk(n, dim=1, largest=False)
        dists.append(v)
        idxs.append(i)
    return torch.cat(dists), torch.cat(idxs)


class ConvexVQWeight(nn.Module):
    """Soft VQ weight of one linear layer.

    ``codebook`` (C, d) and ``logits`` (M, n) are parameters (M = N * ceil(K/d) sub-vectors, n = ``candidates``);
    ``hull`` (M, n) holds each sub-vector's candidate codewords, ``frozen`` (M,) marks confirmed sub-vectors whose
    codeword is ``hard`` (M,). With a channel scale, ``scale`` (N, 1) is a parameter too.
    ``forward() -> W_hat`` (N, K).
    """

    def __init__(self, w: torch.Tensor, init: VQWeight, candidates: int):
        super().__init__()
        layout = init.layout
        self.layout = layout
        n_cand = min(candidates, layout.codebook_size)
        scale = init.scale.to(w.device) if init.scale is not None else None  # the k-means init is on the CPU
        target = split_subvectors(w.detach().float() / scale if scale is not None else w.detach().float(),
                                  layout.vector_dim).reshape(-1, layout.vector_dim)
        codebook = init.codebook.float().to(w.device, copy=True)
        near_d, hull = _nearest_k(target, codebook, n_cand)  # ascending: hull[:, 0] is the nearest codeword
        # VQ4DiT's distance-based init: l_k = log(d_farthest / d_k), so the farthest candidate gets 0 and nearer
        # ones proportionally more (the floor avoids log(0) for a sub-vector sitting on a codeword)
        near_d = near_d.clamp(min=1e-12)
        logits = torch.log(near_d[:, -1:] / near_d).float()
        self.codebook = nn.Parameter(codebook)
        self.logits = nn.Parameter(logits)
        self.scale = nn.Parameter(scale.float().clone()) if scale is not None else None
        self.register_buffer("hull", hull)
        self.register_buffer("frozen", torch.zeros(hull.shape[0], dtype=torch.bool, device=hull.device))
        self.register_buffer("hard", hull[:, 0].clone())

    # ------------------------------------------------------------------------------------------------ forward
    def ratios(self) -> torch.Tensor:
        """Convex-combination ratios (M, n) (rows sum to 1)."""
        return torch.softmax(self.logits, dim=1)

    def subvectors(self) -> torch.Tensor:
        """Current (M, d) sub-vectors: soft combinations, or the confirmed codeword for frozen ones."""
        soft = torch.einsum("mn,mnd->md", self.ratios(), self.codebook[self.hull])
        if not bool(self.frozen.any()):
            return soft
        return torch.where(self.frozen[:, None], self.codebook[self.hard], soft)

    def forward(self) -> torch.Tensor:
        lay = self.layout
        w = merge_subvectors(self.subvectors().reshape(lay.out_features, lay.num_vectors, lay.vector_dim),
                             lay.in_features)
        return w * self.scale if self.scale is not None else w

    def onehot_penalty(self) -> torch.Tensor:
        """``mean(pi * (1 - pi))`` over the soft sub-vectors (VQ4DiT's push towards one-hot ratios; the ViM-VQ recipe
        adds it to the block loss with ``onehot_regularizer=True``)."""
        live = ~self.frozen
        if not bool(live.any()):
            return self.logits.sum() * 0.0
        p = self.ratios()[live]
        return (p * (1 - p)).mean()

    # --------------------------------------------------------------------------------------- hull maintenance
    @torch.no_grad()
    def replace_candidates(self, threshold: float) -> int:
        """Adaptive hull replacement (methods.md §5.3 step 4; the rule is ours): in every soft sub-vector whose
        weakest candidate's ratio fell below ``threshold``, that candidate is swapped for the codeword nearest to the
        sub-vector's current value that is not in its hull yet, if that codeword is nearer than the one it replaces.
        The swapped-in candidate keeps the old logit, so the ratios (and the sub-vector, up to the tiny share moved)
        do not jump. Returns the number of swaps."""
        p = self.ratios()
        weak_p, weak = p.min(1)
        rows = ((weak_p < threshold) & ~self.frozen).nonzero().flatten()
        if rows.numel() == 0:
            return 0
        current = self.subvectors()[rows]
        best_d, best = _nearest_k(current, self.codebook, 1, exclude=self.hull[rows])  # outside the hull only
        best_d, best = best_d[:, 0], best[:, 0]
        old = self.hull[rows, weak[rows]]
        old_d = (current.double() - self.codebook[old].double()).norm(dim=1)
        take = best_d < old_d
        rows, best = rows[take], best[take]
        self.hull[rows, weak[rows]] = best
        return int(rows.numel())

    @torch.no_grad()
    def confirm(self, threshold: float, min_fraction: float = 0.0) -> int:
        """Incremental VQ (methods.md §5.4): freezes the soft sub-vectors whose top ratio exceeds ``threshold``
        (VQ4DiT: 0.99) on their top candidate, then, if fewer than ``min_fraction`` of all sub-vectors are frozen,
        the most confident remaining ones until that fraction is reached (the schedule that guarantees everything
        is hard by the end). Returns how many were frozen now."""
        top_p, top = self.ratios().max(1)
        new = (top_p > threshold) & ~self.frozen
        want = int(min_fraction * self.frozen.numel() + 0.5) - int((self.frozen | new).sum())
        if want > 0:
            conf = top_p.masked_fill(self.frozen | new, -1.0)
            extra = conf.topk(min(want, int((conf >= 0).sum()))).indices
            new[extra] = True
        self.hard[new] = self.hull[new, top[new]]
        self.frozen |= new
        return int(new.sum())

    @property
    def frozen_fraction(self) -> float:
        return float(self.frozen.float().mean())

    # ------------------------------------------------------------------------------------------------- export
    @torch.no_grad()
    def export(self) -> VQWeight:
        """Hard VQ weight: every sub-vector takes its confirmed codeword, or its highest-ratio candidate when still
        soft (the one-shot hardening of ``incremental=False``); codebook and scale rounded to the storage dtype."""
        top = self.hull.gather(1, self.ratios().argmax(1, keepdim=True)).squeeze(1)
        idx = torch.where(self.frozen, self.hard, top)
        lay = self.layout
        codebook = round_to_storage(self.codebook, lay.codebook_dtype)
        scale = round_to_storage(self.scale, lay.codebook_dtype) if self.scale is not None else None
        return VQWeight(layout=lay, codebook=codebook, indices=idx.reshape(lay.out_features, lay.num_vectors).cpu(),
                        scale=scale)


class ConvexVQLinear(nn.Module):
    """A linear layer whose weight is a :class:`ConvexVQWeight` (calibration stand-in for a codebook ``QLinear``);
    the bias, if any, trains with the codebook."""

    def __init__(self, linear: nn.Linear, vq: ConvexVQWeight):
        super().__init__()
        self.vq = vq
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = nn.Parameter(linear.bias.detach().float().clone()) if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.vq().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
