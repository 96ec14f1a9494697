"""The shared seeded k-means (k-scaled clustering, VQ codebooks): correct clusters, determinism, refusals."""

from __future__ import annotations

import pytest
import torch

from optimum_vim.calibration.kmeans import kmeans, relabel_by_centroid


def test_separated_1d_groups_are_found_and_relabelled_by_centroid():
    gen = torch.Generator().manual_seed(1)
    groups = [torch.randn(50, generator=gen) * 0.01 + m for m in (5.0, -3.0, 0.5, 12.0)]
    x = torch.cat(groups)
    res = relabel_by_centroid(kmeans(x, 4, seed=0))
    assert torch.allclose(res.centroids.flatten(), torch.tensor([-3.0, 0.5, 5.0, 12.0]), atol=0.01)
    expected = torch.cat([torch.full((50,), i) for i in (2, 0, 1, 3)])
    assert torch.equal(res.labels, expected)


def test_vectors_reach_a_local_optimum_and_seed_reproduces_bitwise():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2000, 4, generator=gen)
    a, b = kmeans(x, 16, seed=3), kmeans(x, 16, seed=3)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    # Lloyd fixed point: each centroid is the mean of its points, each point is nearest to its centroid
    for j in range(16):
        assert torch.allclose(a.centroids[j], x[a.labels == j].mean(0), atol=1e-5)
    d = torch.cdist(x.double(), a.centroids.double())
    assert torch.equal(d.argmin(1), a.labels)
    assert len(set(a.labels.tolist())) == 16
    torch.set_num_threads(1)
    try:
        c = kmeans(x, 16, seed=3)
    finally:
        torch.set_num_threads(2)
    assert torch.equal(a.centroids, c.centroids)


def test_weights_pull_the_centroid():
    x = torch.tensor([[0.0], [1.0]])
    res = kmeans(x, 1, weights=torch.tensor([3.0, 1.0]))
    assert res.centroids.item() == pytest.approx(0.25)


def test_duplicate_points_keep_k_clusters_and_bad_input_is_refused():
    x = torch.tensor([0.0] * 10 + [1.0] * 10 + [2.0])
    res = kmeans(x, 3, seed=0)
    assert sorted(res.centroids.flatten().tolist()) == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="cannot form 30 clusters from 21 points"):
        kmeans(x, 30)
    with pytest.raises(ValueError, match="non-finite"):
        kmeans(torch.tensor([0.0, float("nan"), 1.0]), 2)
