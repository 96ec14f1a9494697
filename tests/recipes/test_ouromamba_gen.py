"""OuroMamba-Gen (recipes/ouromamba/generation.py): the attention it optimises is Mamba's real implicit attention,
the patching and the InfoNCE do what they claim, and generation is seeded, improves its loss and works on any grid."""

from __future__ import annotations

import pytest
import torch

import optimum_vim
from optimum_vim import VimBackbone, VimConfig, VimForImageClassification
from optimum_vim.ops.scan import selective_scan_torch
from optimum_vim.recipes.ouromamba.generation import (
    GenerationDivergedError,
    class_token_attention,
    class_token_state_attention,
    generation_loss,
    patch_info_nce,
    patch_neighbourhood,
    patch_weights,
)


def _tiny(image_size=12, patch=4, stride=4, layers=2, channels=1, seed=0):
    torch.manual_seed(seed)
    cfg = VimConfig(hidden_size=16, num_hidden_layers=layers, d_state=4, expand=1, patch_size=patch, stride=stride,
                    image_size=image_size, num_channels=channels, num_labels=5)
    return VimForImageClassification(cfg).eval()


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_class_token_attention_is_the_jacobian_of_the_scan(reverse):
    # y_cls = Σ_j α[cls, j] u_j + D u_cls: the attention toward the class token is d y_cls / d u_j (j != cls)
    torch.manual_seed(0)
    b, length, e, n, cls = 2, 9, 3, 4, 4
    delta = torch.rand(b, length, e) * 0.8 + 0.05
    A = -torch.rand(e, n) * 2 - 0.1
    B, C = torch.randn(b, length, n), torch.randn(b, length, n)
    u = torch.randn(b, length, e, requires_grad=True)
    y = selective_scan_torch(u, delta, A, B, C, None, reverse=reverse)
    jac = torch.zeros(b, length, e)
    for ch in range(e):
        g, = torch.autograd.grad(y[:, cls, ch].sum(), u, retain_graph=True)
        jac[:, :, ch] = g[:, :, ch]
    attn = class_token_attention(delta, A, B, C, cls, reverse)
    seen = slice(cls + 1, length) if reverse else slice(0, cls)
    unseen = slice(0, cls + 1) if reverse else slice(cls, length)
    torch.testing.assert_close(attn[:, seen], jac[:, seen], rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(attn[:, unseen]) == 0
    assert torch.count_nonzero(jac[:, seen]) > 0


def test_patch_weights_are_per_image():
    # the official code min-max normalises along the batch axis; ours must not depend on the other images
    torch.manual_seed(0)
    delta = torch.rand(3, 10, 4)
    w = patch_weights(delta, cls_pos=4)
    assert w.shape == (3, 9)
    for i in range(3):
        torch.testing.assert_close(w[i : i + 1], patch_weights(delta[i : i + 1], 4))
        assert w[i].min() == 0 and w[i].max() == 1
    scaled = delta.clone()
    scaled[0] *= 100  # a different image in the batch leaves image 1's weights unchanged
    torch.testing.assert_close(patch_weights(scaled, 4)[1], w[1])


def test_patch_neighbourhood_matches_a_direct_sum():
    torch.manual_seed(0)
    grid, p, e = 4, 3, 2
    f, w = torch.randn(2, grid * grid, e), torch.rand(2, grid * grid)
    got = patch_neighbourhood(f, w, grid, p)
    fw = (f * w[..., None]).reshape(2, grid, grid, e)
    want = torch.zeros_like(fw)
    for r in range(grid):
        for c in range(grid):
            for dr in range(-1, 2):
                for dc in range(-1, 2):
                    rr, cc = min(max(r + dr, 0), grid - 1), min(max(c + dc, 0), grid - 1)  # replicate padding
                    want[:, r, c] += fw[:, rr, cc]
    torch.testing.assert_close(got, want.reshape(2, grid * grid, e))
    torch.testing.assert_close(patch_neighbourhood(f, w, grid, 1), f * w[..., None])


def test_info_nce_prefers_clustered_patches():
    torch.manual_seed(0)
    centres = torch.randn(2, 8) * 5
    clustered = torch.cat([centres[0] + 0.1 * torch.randn(8, 8), centres[1] + 0.1 * torch.randn(8, 8)])[None]
    noise = torch.randn(1, 16, 8)
    assert patch_info_nce(clustered, 7, 0.1) < patch_info_nce(noise, 7, 0.1)
    with pytest.raises(ValueError, match="at least 3 patches"):
        patch_info_nce(torch.randn(1, 2, 4), 12, 0.1)


def test_generation_is_seeded_improves_its_loss_and_leaves_the_model_alone():
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    hist = []
    # without the random augmentation prior, so that the per-iteration loss is comparable (TV prior on)
    kw = dict(iterations=6, patch_size=3, positives=3, lr=0.05, batch_size=3, jitter=0, flip=False, progress=False)
    x, t = optimum_vim.generate_calibration_images(model, 5, seed=3, return_targets=True,
                                                   callback=lambda it, ci, parts: hist.append((ci, parts["loss"])),
                                                   **kw)
    assert x.shape == (5, 1, 12, 12) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert sorted(t.tolist()) == [0, 1, 2, 3, 4]  # class-balanced: 5 images, 5 classes, shuffled
    # bit-identical with the same seed, different with another one and from the Gaussian start
    x2 = optimum_vim.generate_calibration_images(model, 5, seed=3, **kw)
    assert torch.equal(x, x2)
    assert not torch.equal(x, optimum_vim.generate_calibration_images(model, 5, seed=4, **kw))
    init = torch.randn(5, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    assert (x - init).abs().max() > 0.05
    # each chunk's loss went down over its iterations
    for chunk in (0, 1):
        losses = [loss for ci, loss in hist if ci == chunk]
        assert len(losses) == 6 and losses[-1] < losses[0]
    # the model is untouched, its mode and grad flags restored
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_batch_size_does_not_change_the_images():
    model = _tiny()
    kw = dict(iterations=3, patch_size=3, positives=2, seed=1, progress=False)
    a = optimum_vim.generate_calibration_images(model, 4, batch_size=4, **kw)
    b = optimum_vim.generate_calibration_images(model, 4, batch_size=2, **kw)
    # equal up to float rounding, which Adam's normalised first steps amplify where a pixel's gradient is near zero
    # (a draw of the augmentation per chunk instead of per image would move pixels by ~lr = 0.1)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-2)
    plain = dict(kw, jitter=0, flip=False, tv_weight=0.0)
    torch.testing.assert_close(optimum_vim.generate_calibration_images(model, 4, batch_size=4, **plain),
                               optimum_vim.generate_calibration_images(model, 4, batch_size=2, **plain),
                               rtol=1e-4, atol=1e-4)


def test_the_class_loss_reaches_its_targets(fixture_dir):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(fixture_dir)
    targets = torch.tensor([9, 1, 3])  # ankle boot, trouser, dress
    x = optimum_vim.generate_calibration_images(model, 3, iterations=15, lr=0.1, targets=targets,
                                                contrastive_weight=0.0, jitter=0, flip=False, progress=False)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits.argmax(-1), targets)


@pytest.mark.parametrize(
    "image_size,patch,stride,layers", [(12, 4, 4, 2), (16, 4, 4, 1), (14, 4, 2, 1)], ids=["3x3", "4x4-even", "6x6-overlap"]
)
def test_any_vim_geometry(image_size, patch, stride, layers):
    model = _tiny(image_size=image_size, patch=patch, stride=stride, layers=layers, channels=3)
    cfg = model.config
    x = torch.randn(2, 3, image_size, image_size, requires_grad=True)
    loss, parts = generation_loss(model, x, torch.tensor([0, 1]), patch_size=5, positives=12)
    loss.backward()
    assert torch.isfinite(loss) and x.grad.abs().sum() > 0 and set(parts) == {"loss", "contrastive", "class"}
    imgs = optimum_vim.generate_calibration_images(model, 2, iterations=2, patch_size=5, progress=False,
                                                   return_pil=True)
    assert len(imgs) == 2 and imgs[0].size == (image_size, image_size) and imgs[0].mode == "RGB"
    assert cfg.grid_size ** 2 == cfg.num_patches


def test_processor_bounds_the_pixels():
    model = _tiny()

    class Proc:
        image_mean, image_std = [0.5], [0.25]

    x = optimum_vim.generate_calibration_images(model, 2, iterations=3, lr=1.0, processor=Proc(), progress=False)
    assert x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6
    assert (x.abs() >= 2.0 - 1e-6).any()  # the bound is active (a large lr pushes pixels against it)
    pil = optimum_vim.generate_calibration_images(model, 2, iterations=0, processor=Proc(), progress=False,
                                                  return_pil=True)
    assert pil[0].mode == "L" and pil[0].size == (12, 12)


def test_bad_input_is_refused_with_what_to_do():
    model = _tiny()
    with pytest.raises(ValueError, match="odd"):
        optimum_vim.generate_calibration_images(model, 2, patch_size=4, progress=False)
    with pytest.raises(ValueError, match="block indices"):
        optimum_vim.generate_calibration_images(model, 2, layers=[7], progress=False)
    with pytest.raises(TypeError, match="no model-family adapter for Linear"):
        optimum_vim.generate_calibration_images(torch.nn.Linear(2, 2), 2, progress=False)
    with pytest.raises(TypeError, match="needs a float VimForImageClassification"):
        optimum_vim.generate_calibration_images(VimBackbone(model.config), 2, progress=False)
    with pytest.raises(ValueError, match="class indices"):
        optimum_vim.generate_calibration_images(model, 2, targets=[0, 9], progress=False)
    for bad, match in (({"jitter": -1}, "jitter"), ({"jitter": 1.5}, "jitter"), ({"flip": 1}, "flip"),
                       ({"tv_weight": -0.1}, "tv_weight"), ({"tv_weight": float("nan")}, "tv_weight")):
        with pytest.raises(ValueError, match=match):
            optimum_vim.generate_calibration_images(model, 2, progress=False, **bad)


def test_augmentation_rolls_and_mirrors_each_image_alone():
    from optimum_vim.recipes.ouromamba.generation import _augment

    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.float32).reshape(2, 1, 4, 5)
    out = _augment(x, torch.tensor([[1, -2], [0, 0]]), torch.tensor([True, False]))
    assert torch.equal(out[0], torch.roll(x[0], (1, -2), (-2, -1)).flip(-1))
    assert torch.equal(out[1], x[1])


def test_image_priors_are_seeded_and_smooth_the_images():
    model = _tiny()
    kw = dict(iterations=8, patch_size=3, positives=3, lr=0.2, seed=2, progress=False)
    plain = optimum_vim.generate_calibration_images(model, 4, jitter=0, flip=False, tv_weight=0.0, **kw)
    # the defaults are on: jitter = half the patch stride (2 here), flip, TV weight 0.05
    assert torch.equal(optimum_vim.generate_calibration_images(model, 4, **kw),
                       optimum_vim.generate_calibration_images(model, 4, jitter=2, flip=True, tv_weight=0.05, **kw))
    hist = []
    prior = dict(jitter=2, flip=True, tv_weight=5.0)
    smooth = optimum_vim.generate_calibration_images(model, 4, callback=lambda it, ci, parts: hist.append(parts),
                                                     **prior, **kw)
    assert torch.equal(smooth, optimum_vim.generate_calibration_images(model, 4, **prior, **kw))
    assert not torch.equal(smooth, optimum_vim.generate_calibration_images(model, 4, jitter=2, flip=True, **kw))
    assert "tv" in hist[0] and hist[-1]["tv"] < hist[0]["tv"]
    from optimum_vim.recipes.ouromamba.generation import total_variation

    assert total_variation(smooth) < total_variation(plain)
    # per-image draws: the chunking still does not change the images (up to float rounding, as without priors)
    short = {**kw, "iterations": 3}
    torch.testing.assert_close(optimum_vim.generate_calibration_images(model, 4, batch_size=4, **prior, **short),
                               optimum_vim.generate_calibration_images(model, 4, batch_size=2, **prior, **short),
                               rtol=1e-4, atol=1e-4)


def test_a_diverging_generation_stops_with_the_iteration():
    model = _tiny()
    with torch.no_grad():  # a model whose logits overflow: the class loss is not finite
        model.head.weight.fill_(float("inf"))
    with pytest.raises(GenerationDivergedError, match="iteration 0"):
        optimum_vim.generate_calibration_images(model, 2, iterations=3, progress=False)


def _scan_with_states(b, length, e, n, reverse, seed=1):
    """Seeded scan inputs (Δ, A, B, C, u) and the reference scan's hidden states (b, L, E, N) in token order."""
    from optimum_vim_kernels.reference import selective_scan_q_ref

    torch.manual_seed(seed)
    delta = torch.rand(b, length, e) * 0.8 + 0.05
    A = -torch.rand(e, n) * 2 - 0.1
    B, C, u = torch.randn(b, length, n), torch.randn(b, length, n), torch.randn(b, length, e)
    states = torch.zeros(b, length, e, n)

    def keep(t, h, _scale):
        states[:, t] = h

    selective_scan_q_ref(u, delta, A, B, C, reverse=reverse, state_callback=keep)
    return delta, A, B, C, u, states


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_state_patching_reads_the_patched_states_out_towards_the_class_token(reverse):
    """patching="state" (the official state_fusion): the scan's states are Δ-weighted patched, then carried to the
    class token and read out by C_cls; not the attention-vector patching, which depends on Δ_j B_j only."""

    b, grid, e, n, cls = 2, 3, 3, 4, 4
    length = grid * grid + 1
    delta, A, B, C, u, states = _scan_with_states(b, length, e, n, reverse)
    patches = torch.cat([states[:, :cls], states[:, cls + 1:]], 1).reshape(b, grid * grid, e * n)
    patched = patch_neighbourhood(patches, patch_weights(delta, cls), grid, 3).reshape(b, grid * grid, e, n)
    want = torch.zeros(b, grid * grid, e)
    for p in range(grid * grid):
        j = p if p < cls else p + 1  # token index of patch p
        if (j < cls) == reverse:
            continue  # the other direction carries this patch
        between = range(j + 1, cls + 1) if j < cls else range(cls, j)
        gap = sum(delta[:, k] for k in between)  # (b, E)
        want[:, p] = torch.einsum("ben,bn->be", torch.exp(gap.unsqueeze(-1) * A) * patched[:, p], C[:, cls])
    got = class_token_state_attention(u, delta, A, B, C, cls, reverse, grid, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    attn = class_token_attention(delta, A, B, C, cls, reverse)
    attn = patch_neighbourhood(torch.cat([attn[:, :cls], attn[:, cls + 1:]], 1), patch_weights(delta, cls), grid, 3)
    side = want.abs().sum(-1) > 0
    ratio = got[side] / attn[side]
    assert not torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))  # not the attention patching, rescaled


def test_state_patching_generates_seeded_images_other_than_the_attention_ones():
    model = _tiny()
    kw = dict(iterations=3, patch_size=3, seed=2, progress=False, jitter=0, flip=False, tv_weight=0.0)
    state = optimum_vim.generate_calibration_images(model, 3, patching="state", **kw)
    assert torch.equal(state, optimum_vim.generate_calibration_images(model, 3, patching="state", **kw))
    assert not torch.equal(state, optimum_vim.generate_calibration_images(model, 3, **kw))
    with pytest.raises(ValueError, match="'patching' must be one of"):
        optimum_vim.generate_calibration_images(model, 3, patching="tokens", **kw)


# ---------------------------------------------------------------------------------------------------------------
# families without a class token (MambaVision): the pooled output's attention on each block's map
def _tiny_mambavision(image_size=40, seed=0):
    """Stage 3 sees a 3x3 map in 2x2 windows (padded to 4x4), stage 4 a 2x2 map in one window at 40x40."""
    from optimum_vim.models.mambavision import MambaVisionConfig, MambaVisionForImageClassification

    torch.manual_seed(seed)
    cfg = MambaVisionConfig(dim=8, in_dim=4, depths=[1, 1, 2, 2], num_heads=[1, 1, 2, 2], window_size=[8, 8, 2, 2],
                            d_state=4, mlp_ratio=2.0, image_size=image_size, num_channels=1, num_labels=5)
    return MambaVisionForImageClassification(cfg).eval()


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_pooled_attention_is_the_jacobian_of_the_pooled_scan(reverse):
    # Σ_i real_i y_i = Σ_j (Σ_i real_i α[i, j]) u_j (+ D terms): the pooled attention is its derivative by u_j, the
    # padded outputs left out of the pool
    from optimum_vim.recipes.ouromamba.generation import pooled_attention

    torch.manual_seed(0)
    b, length, e, n = 2, 7, 3, 4
    delta = torch.rand(b, length, e) * 0.8 + 0.05
    A = -torch.rand(e, n) * 2 - 0.1
    B, C = torch.randn(b, length, n), torch.randn(b, length, n)
    real = torch.ones(b, length, dtype=torch.bool)
    real[:, -2:] = False  # a window's padding
    u = torch.randn(b, length, e, requires_grad=True)
    pooled = (selective_scan_torch(u, delta, A, B, C, None, reverse=reverse) * real.unsqueeze(-1)).sum(1)
    jac = torch.zeros(b, length, e)
    for ch in range(e):
        g, = torch.autograd.grad(pooled[:, ch].sum(), u, retain_graph=True)
        jac[:, :, ch] = g[:, :, ch]
    attn = pooled_attention(delta, A, B, C, real, reverse)
    torch.testing.assert_close(attn, jac, rtol=1e-5, atol=1e-6)
    # forward, the padding at the end reaches no real output; backward it reaches all of them
    assert (torch.count_nonzero(attn[:, -2:]) > 0) == reverse


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_state_patching_without_a_class_token_reads_the_patched_states_out_by_the_pool(reverse):
    """patching="state" on a windowed map: states patched on the 3x3 map (windows of 2x2, padded to 4x4), then read
    out by every real output of their window the scan carries them to; checked position by position."""

    from optimum_vim.models.family import ScanGrid
    from optimum_vim.recipes.ouromamba.generation import pooled_state_attention

    images, side, ws, e, n = 2, 3, 2, 3, 4
    grid = ScanGrid(side, side, window=ws)
    delta, A, B, C, u, states = _scan_with_states(images * 4, ws * ws, e, n, reverse)

    def where(img, r, c):  # (scan row, token) of a map position: 2 windows per side, row-major
        return img * 4 + (r // ws) * 2 + c // ws, (r % ws) * ws + c % ws

    pos = [(r, c) for r in range(side) for c in range(side)]
    at = {(img, p): where(img, *rc) for img in range(images) for p, rc in enumerate(pos)}
    weights = torch.stack([torch.stack([delta[at[img, p]].sum() for p in range(9)]) for img in range(images)])
    weights = (weights - weights.amin(1, keepdim=True)) / (weights.amax(1, keepdim=True) - weights.amin(1, keepdim=True))
    feats = torch.stack([torch.stack([states[at[img, p]].reshape(-1) for p in range(9)]) for img in range(images)])
    patched = patch_neighbourhood(feats, weights, (side, side), 3).reshape(images, 9, e, n)
    want = torch.zeros(images, 9, e)
    for img in range(images):
        for p in range(9):
            s, j = at[img, p]
            real_tokens = {at[img, q][1] for q in range(9) if at[img, q][0] == s}
            for i in real_tokens:
                if (i < j) if not reverse else (i > j):
                    continue  # the scan does not carry token j to output i
                between = range(j + 1, i + 1) if i >= j else range(i, j)
                gap = sum((delta[s, k] for k in between), torch.zeros(e))
                want[img, p] += torch.einsum("en,n->e", torch.exp(gap.unsqueeze(-1) * A) * patched[img, p], C[s, i])
    got = pooled_state_attention(u, delta, A, B, C, grid, reverse, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_scan_grid_puts_the_windows_back_as_the_model_partitions_them():
    from optimum_vim.models.family import ScanGrid
    from optimum_vim.models.mambavision.modeling_mambavision import pad_to_windows, window_partition

    for side, ws in ((5, 2), (4, 2), (7, 7), (3, 1)):
        x = torch.randn(2, 3, side, side)
        grid = ScanGrid(side, side, window=ws)
        windows = window_partition(pad_to_windows(x, ws), ws)
        assert windows.shape[0] == 2 * grid.scans_per_image and windows.shape[1] == grid.sequence_length
        assert torch.equal(grid.to_grid(windows), x.flatten(2).transpose(1, 2))
        assert torch.equal(grid.from_grid(x.flatten(2).transpose(1, 2)), windows)
        real = grid.real_tokens(2)
        assert int(real.sum()) == 2 * side * side and torch.equal(grid.to_grid(real), torch.ones(2, side * side) > 0)
    cls = ScanGrid(2, 2, class_token=2)
    tokens = torch.arange(10.0).reshape(2, 5)
    assert torch.equal(cls.to_grid(tokens), torch.tensor([[0.0, 1, 3, 4], [5, 6, 8, 9]]))
    assert torch.equal(cls.from_grid(cls.to_grid(tokens)), tokens.masked_fill(torch.arange(5) == 2, 0))
    with pytest.raises(ValueError, match="no class token"):
        ScanGrid(2, 2, window=2, class_token=1)


def test_the_patch_neighbourhood_never_exceeds_the_map():
    # a 5x5 neighbourhood on a 2x2 map covers every patch: all features equal, no InfoNCE gradient. Capped at the
    # largest odd size that fits the shorter side (here 1; 3 on a 3x5 map); maps of 5 and more are unchanged
    torch.manual_seed(0)
    f, w = torch.randn(2, 4, 3), torch.rand(2, 4)
    assert torch.equal(patch_neighbourhood(f, w, 2, 5), patch_neighbourhood(f, w, 2, 1))
    f, w = torch.randn(2, 15, 3), torch.rand(2, 15)
    assert torch.equal(patch_neighbourhood(f, w, (3, 5), 5), patch_neighbourhood(f, w, (3, 5), 3))
    assert not torch.equal(patch_neighbourhood(f, w, (3, 5), 3), patch_neighbourhood(f, w, (3, 5), 1))


def test_generation_without_a_class_token_is_seeded_and_lowers_its_loss():
    from optimum_vim.models.family import family_of
    from optimum_vim.models.mambavision.modeling_mambavision import MambaVisionTokenBlock

    model = _tiny_mambavision()
    family = family_of(model)
    grids = {i: family.scan_grid(model, i) for i, (_, block) in enumerate(family.blocks(model))
             if isinstance(block, MambaVisionTokenBlock)}
    assert {(g.rows, g.window) for g in grids.values()} == {(3, 2), (2, 2)}
    kw = dict(iterations=12, patch_size=3, positives=2, lr=0.2, seed=3, progress=False)
    hist = []
    images = optimum_vim.generate_calibration_images(model, 4, callback=lambda it, ci, p: hist.append(p), **kw)
    assert images.shape == (4, 1, 40, 40) and torch.isfinite(images).all()
    assert torch.equal(images, optimum_vim.generate_calibration_images(model, 4, **kw))
    assert hist[0]["contrastive"] > 0 and hist[-1]["loss"] < hist[0]["loss"]
    state = optimum_vim.generate_calibration_images(model, 4, patching="state", **kw)
    assert torch.equal(state, optimum_vim.generate_calibration_images(model, 4, patching="state", **kw))
    assert not torch.equal(state, images)
    # the contrastive loss moves the pixels: without it the images differ
    assert not torch.equal(images, optimum_vim.generate_calibration_images(model, 4, contrastive_weight=0.0, **kw))


def test_generation_without_a_class_token_refuses_maps_too_small_for_the_infonce():
    model = _tiny_mambavision(image_size=28)  # stage 3: a 2x2 map, stage 4: 1x1
    kw = dict(iterations=1, patch_size=3, positives=2, progress=False)
    optimum_vim.generate_calibration_images(model, 2, **kw)  # layers=None leaves the 1x1 map's blocks out
    with pytest.raises(ValueError, match=r"block 7's scans see a 1x1 map: leave it out of layers"):
        optimum_vim.generate_calibration_images(model, 2, layers=[4, 7], **kw)
    with pytest.raises(ValueError, match="selects no block"):
        optimum_vim.generate_calibration_images(model, 2, layers=[0], **kw)
    tiny = _tiny_mambavision(image_size=16)  # every token stage sees a 1x1 map
    with pytest.raises(ValueError, match="contrastive_weight=0"):
        optimum_vim.generate_calibration_images(tiny, 2, **kw)
    assert optimum_vim.generate_calibration_images(tiny, 2, contrastive_weight=0.0, **kw).shape == (2, 1, 16, 16)
