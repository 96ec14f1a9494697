"""Seeded k-means, shared by every recipe that clusters: k-scaled PTQ (1-D k-means over per-token / per-channel mean
magnitudes) and vector quantization (codebooks over d-dimensional weight sub-vectors).

Deterministic on CPU for a given seed whatever the thread count: the initialisation draws from a private
``torch.Generator``, assignments are exact arg-mins (ties broken towards the lower index), and centroid updates are
``index_add_`` sums in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KMeansResult:
    """``centroids`` (k, d) float32, ``labels`` (n,) int64, ``inertia`` (sum of squared distances, float)."""

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(n, k) squared Euclidean distances in float64, computed exactly as sum((x - c)^2) for small d and through the
    expanded form (clamped at 0) for large d."""
    if x.shape[1] <= 8:
        return (x.unsqueeze(1) - c.unsqueeze(0)).pow(2).sum(-1)
    d = x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1).unsqueeze(0)
    return d.clamp_(min=0)


def _chunked_argmin(x: torch.Tensor, c: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    labels, best = [], []
    for start in range(0, x.shape[0], chunk):
        d = _sq_dists(x[start : start + chunk], c)
        m, i = d.min(1)
        labels.append(i)
        best.append(m)
    return torch.cat(labels), torch.cat(best)


def kmeans_plus_plus_init(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling) on float64 data (n, d)."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = [x[first]]
    closest = _sq_dists(x, x[first : first + 1]).squeeze(1)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than k: reuse points (empty clusters are re-seeded later)
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            idx = int(torch.multinomial((closest / total).float(), 1, generator=gen))
        centroids.append(x[idx])
        closest = torch.minimum(closest, _sq_dists(x, x[idx : idx + 1]).squeeze(1))
    return torch.stack(centroids)


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    iters: int = 50,
    weights: torch.Tensor | None = None,
    tol: float = 0.0,
    init: torch.Tensor | None = None,
) -> KMeansResult:
    """Lloyd's k-means of ``x`` (n, d) (a 1-D tensor is treated as (n, 1)) into ``k`` clusters.

    Args:
        seed: seeds the k-means++ initialisation (ignored when ``init`` is given).
        iters: maximum Lloyd iterations; stops early when assignments no longer change (or the inertia improves by
            less than ``tol`` relative).
        weights: optional non-negative per-point weights (n,) for the centroid means (e.g. importance weights).
        init: optional initial centroids (k, d).

    Empty clusters are re-seeded on the point farthest from its centroid, so all ``k`` centroids stay distinct while
    there are at least ``k`` distinct points. Raises ValueError when ``k`` exceeds the number of points or the data is
    not finite.
    """
    if x.dim() == 1:
        x = x.unsqueeze(1)
    if x.dim() != 2:
        raise ValueError(f"kmeans expects (n, d) data; got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int; got {k!r}")
    if k > n:
        raise ValueError(f"cannot form {k} clusters from {n} points; use k <= {n}")
    xd = x.detach().double().cpu()
    if not torch.isfinite(xd).all():
        raise ValueError("kmeans got non-finite data (NaN or inf)")
    w = None if weights is None else weights.detach().double().cpu().reshape(-1)
    if w is not None and (w.numel() != n or (w < 0).any()):
        raise ValueError("kmeans weights must be n non-negative values")
    gen = torch.Generator().manual_seed(int(seed))
    c = init.detach().double().cpu().clone() if init is not None else kmeans_plus_plus_init(xd, k, gen)
    if c.shape != (k, xd.shape[1]):
        raise ValueError(f"init must have shape {(k, xd.shape[1])}; got {tuple(c.shape)}")
    mass = torch.ones(n, dtype=torch.float64) if w is None else w
    labels, best = _chunked_argmin(xd, c)
    prev_inertia = float("inf")
    for _ in range(max(iters, 0)):
        sums = torch.zeros_like(c).index_add_(0, labels, xd * mass.unsqueeze(1))
        counts = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, mass)
        empty = (counts == 0).nonzero().flatten().tolist()
        new_c = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp(min=1e-300).unsqueeze(1), c)
        if empty:
            far = best.clone()
            for j in empty:  # farthest points become the empty clusters' centroids
                idx = int(far.argmax())
                new_c[j] = xd[idx]
                far[idx] = -1.0
        new_labels, best = _chunked_argmin(xd, new_c)
        c = new_c
        inertia = float(best.sum())
        converged = torch.equal(new_labels, labels) and not empty
        labels = new_labels
        if converged or (tol > 0 and prev_inertia - inertia <= tol * max(prev_inertia, 1e-300)):
            break
        prev_inertia = inertia
    return KMeansResult(centroids=c.float(), labels=labels, inertia=float(best.sum()))


def relabel_by_centroid(result: KMeansResult) -> KMeansResult:
    """Sorts 1-D clusters by centroid (ascending; by centroid norm for d > 1), so label 0 is the smallest group."""
    key = result.centroids[:, 0] if result.centroids.shape[1] == 1 else result.centroids.norm(dim=1)
    order = torch.argsort(key, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return KMeansResult(centroids=result.centroids[order], labels=rank[result.labels], inertia=result.inertia)
