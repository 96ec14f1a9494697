"""ViM-VQ recipe: codebook representation and sizing, plain k-means VQ, storage, forward, CLI, refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForImageClassification

from optimum_vim import ViMQuantizationConfig
from optimum_vim.calibration.blockwise import cosine_block_loss
from optimum_vim.calibration.tensors import rtn_weight_tensors
from optimum_vim.calibration.vq import (
    VQLayout,
    choose_codebook_size,
    kmeans_vq,
    merge_subvectors,
    rtn_bytes,
    split_subvectors,
)
from optimum_vim.modules import QLinear, VQWeightSpec, build_qmodule, load_qmodule_tensors
from optimum_vim.ops.dispatch import use_kernels
from optimum_vim.primitives import packed_row_bytes
from optimum_vim.recipes import QuantPlan, apply_plan, get_recipe_class, quantized_modules
from optimum_vim.size import bits_per_weight, quantized_layer_bytes


def _vq(bits, **recipe_args):
    """Plain k-means VQ (data-free), few Lloyd iterations to keep tests fast."""
    args = {"kmeans_iterations": 20, "convex": False, "incremental": False, **recipe_args}
    return ViMQuantizationConfig(recipe="vimvq", weight_bits=bits, recipe_args=args)


@pytest.fixture(scope="module")
def vq2_model(tiny_vim_dir):
    return AutoModelForImageClassification.from_pretrained(tiny_vim_dir, quantization_config=_vq(2))


# ----------------------------------------------------------------------------------------------- representation
def test_subvector_split_pads_and_merges_back():
    w = torch.randn(3, 10)
    sub = split_subvectors(w, 4)
    assert sub.shape == (3, 3, 4) and torch.equal(sub[:, -1, 2:], torch.zeros(3, 2))
    assert torch.equal(merge_subvectors(sub, 10), w)


def test_codebook_size_clamp_and_budget():
    # VQ4DiT clamp: at most a quarter of the sub-vectors (24 x 128 / 4 = 768 sub-vectors -> 192 -> 128)
    assert choose_codebook_size(24, 128, 2, 4, 256, budget_group_size=None) == 128
    # the RTN g32 budget halves it again: 128 fp16 codewords of 4 no longer fit the 1152 bytes of RTN W2 g32
    size = choose_codebook_size(24, 128, 2, 4, 256)
    assert size == 64
    assert VQLayout(24, 128, 4, size).weight_bytes() <= rtn_bytes(24, 128, 2) < VQLayout(24, 128, 4, 128).weight_bytes()
    # a big layer keeps its full codebook
    assert choose_codebook_size(256, 128, 2, 4, 256) == 256
    with pytest.raises(ValueError, match="more codewords than vectors"):
        choose_codebook_size(4, 8, 2, 4, 16)


def test_layout_bytes_match_the_stored_buffers():
    layout = VQLayout(12, 30, 4, 32, channel_scale=True)
    spec = layout.spec(bias=False)
    mod = build_qmodule(spec)
    held = sum(b.numel() * b.element_size() for b in mod.buffers())
    assert held == layout.weight_bytes() == 12 * packed_row_bytes(8, 5) + 32 * 4 * 2 + 12 * 2
    assert mod.codebook.dtype == torch.float16 and mod.weight_scale.dtype == torch.float16


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "channel-scale"])
def test_kmeans_vq_is_seeded_and_beats_rtn(scaled):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g) * torch.logspace(-1, 0, 64).unsqueeze(1)
    layout = VQLayout(64, 64, 4, 256, channel_scale=scaled)
    a, b = kmeans_vq(w, layout, seed=3, iters=30), kmeans_vq(w, layout, seed=3, iters=30)
    assert torch.equal(a.codebook, b.codebook) and torch.equal(a.indices, b.indices)
    assert not torch.equal(kmeans_vq(w, layout, seed=4, iters=30).codebook, a.codebook)
    # the stored codebook is exactly representable in fp16, and the stored layer decodes to what VQWeight says
    assert torch.equal(a.codebook, a.codebook.half().float())
    mod = build_qmodule(layout.spec(bias=False))
    load_qmodule_tensors(mod, a.tensors())
    assert torch.equal(mod.dequantized_weight(), a.dequantize())
    rtn = rtn_weight_tensors(w, 2, None)
    w_rtn = QLinear({"type": "linear", "in_features": 64, "out_features": 64, "bias": False,
                     "weight": {"format": "int", "bits": 2, "group_size": None}})
    load_qmodule_tensors(w_rtn, rtn)
    err_vq = (a.dequantize() - w).pow(2).mean()
    err_rtn = (w_rtn.dequantized_weight() - w).pow(2).mean()
    assert err_vq < 0.5 * err_rtn, (float(err_vq), float(err_rtn))


# ------------------------------------------------------------------------------------------------- the recipe
def test_recipe_quantizes_every_block_linear(vq2_model, tiny_vim_dir):
    mods = quantized_modules(vq2_model)
    assert len(mods) == 12 and all(m.format == "vq" and m.spec.weight.vector_dim == 4 for m in mods.values())
    in_proj = vq2_model.vim.layers[0].mixer.in_proj
    # 128 x 32 / 4 = 1024 sub-vectors (clamp: 256); RTN W2 g32 takes 1536 bytes: 256 or 128 fp16 codewords of 4 do
    # not fit beside the indices (1024 + 2048, 896 + 1024 bytes), 64 do (768 + 512)
    assert in_proj.spec.weight.codebook_size == 64 and in_proj.bits == 6
    float_model = AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        fp, q = float_model(x).logits, vq2_model(x).logits
    assert torch.isfinite(q).all() and not torch.equal(fp, q)
    sqnr = 10 * torch.log10(fp.pow(2).sum() / (q - fp).pow(2).sum())
    assert sqnr > 3, float(sqnr)


@pytest.mark.parametrize("bits", [3, 2, 1])
def test_size_never_exceeds_rtn_g32_on_the_fixture(fixture_dir, bits):
    model = AutoModelForImageClassification.from_pretrained(fixture_dir)
    recipe = get_recipe_class("vimvq").from_config(_vq(bits))
    layouts = recipe.layouts(model)
    assert len(layouts) == 36
    for name, (layout, b) in layouts.items():
        assert b == bits and layout.weight_bytes() <= rtn_bytes(layout.out_features, layout.in_features, bits), name
    vq_total = sum(lay.weight_bytes() for lay, _ in layouts.values())
    rtn_total = sum(rtn_bytes(lay.out_features, lay.in_features, bits) for lay, _ in layouts.values())
    assert vq_total <= rtn_total
    # without the budget, 1-bit codebooks (256 x 8 fp16 = 4 KiB per layer) would exceed it
    if bits == 1:
        free = get_recipe_class("vimvq").from_config(_vq(1, size_budget=None)).layouts(model)
        assert sum(lay.weight_bytes() for lay, _ in free.values()) > rtn_total


def test_calibrate_leaves_the_model_untouched(tiny_vim_dir):
    model = AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = get_recipe_class("vimvq").from_config(_vq(3)).calibrate(model, None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert 2.5 < plan.info["bits_per_weight"] < 4.5


def test_seeded_runs_are_bit_identical(tiny_vim_dir, vq2_model):
    again = AutoModelForImageClassification.from_pretrained(tiny_vim_dir, quantization_config=_vq(2))
    a, b = vq2_model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_reload_dequantize(vq2_model, tmp_path):
    vq2_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["recipe"] == "vimvq" and cfg["layers"]["vim.layers.0.mixer.in_proj"]["weight"]["format"] == "vq"
    again = AutoModelForImageClassification.from_pretrained(tmp_path)
    a, b = vq2_model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert again.vim.layers[1].mixer.out_proj.codebook.dtype == torch.float16
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        y = again(x).logits
        assert torch.equal(y, vq2_model(x).logits)
        w = again.vim.layers[0].mixer.in_proj.dequantized_weight().clone()
        plain = again.dequantize()
        assert isinstance(plain.vim.layers[0].mixer.in_proj, torch.nn.Linear)
        assert torch.equal(plain.vim.layers[0].mixer.in_proj.weight, w)
        torch.testing.assert_close(plain(x).logits, y, rtol=1e-5, atol=1e-5)
    card = (tmp_path / "README.md").read_text()
    assert "bits per weight" in card and "vimvq" in card


def test_forced_triton_codebook_gemm_matches_reference(count_calls, tiny_vim_dir):
    from optimum_vim_kernels import gemm

    model = AutoModelForImageClassification.from_pretrained(
        tiny_vim_dir, quantization_config=_vq(3, channel_scale=True))
    # 3-bit: 6-bit indices (straddling bytes) for the big layers, fewer for the clamped ones
    assert {m.bits for m in quantized_modules(model).values()} >= {6}
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad(), use_kernels("reference"):
        ref = model(x).logits
    def check(*a, **k):
        assert k["codebook"] is not None

    calls = count_calls(gemm, "quant_gemm", check)
    with torch.no_grad(), use_kernels("triton"):
        out = model(x).logits
    assert calls["n"] == 12
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_non_dividing_vector_dim_is_padded(tiny_vim_dir):
    # vector_dim 3 divides none of the tiny model's widths (32, 64, 2): every row's last sub-vector is padded
    model = AutoModelForImageClassification.from_pretrained(
        tiny_vim_dir, quantization_config=_vq(2, vector_dim=3, codebook_size=64))
    dt = model.vim.layers[0].mixer.dt_proj
    assert dt.spec.weight.vector_dim == 3 and dt.qweight.shape[0] == 64
    assert dt.dequantized_weight().shape == (64, 2)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 1, 28, 28)).logits).all()


def test_cli_quantizes_with_vimvq(tiny_vim_dir, tmp_path, capsys):
    from optimum_vim.cli import main

    out = tmp_path / "vq1"
    assert main(["quantize", tiny_vim_dir, str(out), "--recipe", "vimvq", "--weight-bits", "1",
                 "--recipe-arg", "kmeans_iterations=10", "--recipe-arg", "convex=false",
                 "--recipe-arg", "incremental=false", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["quantized_modules"] == 12 and summary["recipe"] == "vimvq"
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.vim.layers[0].mixer.in_proj.spec.weight.vector_dim == 8
    assert bits_per_weight(model) == quantized_layer_bytes(model)["bits_per_weight"]
    assert 0.5 < bits_per_weight(model) < 3.0


# -------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"weight_bits": 4}, "1-3 bit.*'rtn'.*'ptq4vm'"),
        ({"weight_bits": 2, "act_bits": 8}, "weights only.*act_bits=None"),
        ({"recipe_args": {"vector_dim": 4}}, "needs 12-bit indices"),
        ({"weight_bits": 2, "recipe_args": {"codebook_size": 100}}, "power of two"),
        ({"weight_bits": 2, "recipe_args": {"codebook_size": 64, "vector_dim": 4}}, "not 2"),
        ({"weight_bits": 2, "recipe_args": {"convex": False}}, "needs convex=True"),
        ({"weight_bits": 2, "recipe_args": {"candidates": 1}}, "candidates"),
        ({"weight_bits": 2, "recipe_args": {"lr_ratios": -1.0}}, "lr_ratios"),
        ({"weight_bits": 2, "recipe_args": {"codebook_dtype": "bfloat16"}}, "codebook_dtype"),
        ({"weight_bits": 2, "recipe_args": {"size_budget": "rtn_g64"}}, "size_budget"),
        ({"weight_bits": 2, "recipe_args": {"groups": 2}}, "no options"),
        ({"weight_bits": 2, "recipe_args": {"onehot_regularizer": "yes"}}, "onehot_regularizer"),
    ],
    ids=["4-bit", "act-bits", "index-bits", "pow2", "rate", "incremental", "candidates", "lr", "dtype", "budget",
         "unknown", "onehot"],
)
def test_config_refusals(kwargs, match):
    kwargs = {"weight_bits": 3, **kwargs}
    with pytest.raises(ValueError, match=match):  # the config or, for bit-dependent choices, the recipe refuses
        get_recipe_class("vimvq").from_config(ViMQuantizationConfig(recipe="vimvq", **kwargs))


def test_codebook_larger_than_a_layer_is_refused_before_any_work(tiny_vim_dir):
    cfg = _vq(2, codebook_size=256, vector_dim=4)
    model = AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    with pytest.raises(ValueError, match="x_proj: a 10x64 weight has 160 sub-vectors.*more codewords than vectors"):
        get_recipe_class("vimvq").from_config(cfg).calibrate(model, None)


# --------------------------------------------------------------------------------- convex combination (§5.3-5.4)
def _convex(candidates=2, scaled=False, seed=0):
    from optimum_vim.calibration.convex_vq import ConvexVQWeight

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 24, generator=g)
    init = kmeans_vq(w, VQLayout(16, 24, 4, 16, channel_scale=scaled), seed=1, iters=20)
    return w, init, ConvexVQWeight(w, init, candidates)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "channel-scale"])
def test_convex_init_is_the_kmeans_result_softened(scaled):
    w, init, cvq = _convex(3, scaled)
    p = cvq.ratios()
    assert p.shape == (16 * 6, 3) and torch.allclose(p.sum(1), torch.ones(96))
    # distance-based init: the nearest codeword gets the largest ratio, the farthest candidate logit 0
    assert torch.equal(cvq.hull[:, 0], init.indices.reshape(-1)) and bool((p[:, 0] >= p[:, 1]).all())
    assert torch.equal(cvq.logits[:, -1], torch.zeros(96))
    assert torch.equal(cvq.export().indices, init.indices)
    # the soft weight lies between the candidates: closer to W than the hard k-means weight is
    assert (cvq().detach() - w).pow(2).mean() < (init.dequantize() - w).pow(2).mean()


def test_confirm_freezes_confident_then_everything():
    _, _, cvq = _convex(2)
    with torch.no_grad():
        cvq.logits.zero_()  # undecided: ratios 0.5 / 0.5
        cvq.logits[:10] = torch.tensor([8.0, -8.0])  # ratio ~1 on candidate 0
        cvq.logits[10:20] = torch.tensor([-8.0, 8.0])  # ratio ~1 on candidate 1
    assert cvq.confirm(0.99) == 20 and cvq.frozen_fraction == pytest.approx(20 / 96)
    assert torch.equal(cvq.hard[10:20], cvq.hull[10:20, 1])
    assert cvq.confirm(0.99, min_fraction=0.5) == 28  # the most confident remaining ones up to half
    cvq.confirm(0.99, min_fraction=1.0)
    assert bool(cvq.frozen.all())
    # fully frozen: the forward is the hard weight, exactly what is exported and stored
    torch.testing.assert_close(cvq().detach(), cvq.export().dequantize(), rtol=0, atol=1e-3)
    assert cvq.onehot_penalty().item() == 0


def test_hull_replacement_swaps_a_collapsed_candidate_for_a_nearer_codeword():
    _, _, cvq = _convex(2)
    with torch.no_grad():
        cvq.logits[:] = torch.tensor([6.0, -6.0])  # candidate 1 collapsed everywhere
        far = (cvq.codebook[cvq.hull[0, 0]] - cvq.codebook).norm(dim=1).argmax()
        cvq.hull[0, 1] = far  # a far-away weak candidate: replaceable
    before = cvq.hull.clone()
    swaps = cvq.replace_candidates(0.02)
    assert swaps >= 1 and cvq.hull[0, 1] != far
    changed = (cvq.hull != before).any(1)
    assert bool((cvq.hull[changed, 0] == before[changed, 0]).all())  # the strong candidate is kept
    assert bool((cvq.hull[:, 0] != cvq.hull[:, 1]).all())  # no codeword twice in a hull
    current = cvq.subvectors().detach()
    new_d = (current[0] - cvq.codebook[cvq.hull[0, 1]]).norm()
    assert new_d < (current[0] - cvq.codebook[far]).norm()


# ------------------------------------------------------------------------------------ block-wise optimisation
def _calib_images(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g)


def _block_cfg(bits=2, **recipe_args):
    args = {"kmeans_iterations": 10, "convex": True, "incremental": True, "iterations": 12, "replace_every": 4,
            "batch_size": 8, **recipe_args}
    return ViMQuantizationConfig(recipe="vimvq", weight_bits=bits, recipe_args=args)


@pytest.mark.parametrize("incremental", [False, True], ids=["convex", "convex+incremental"])
def test_blockwise_optimisation_beats_plain_kmeans(tiny_vim_dir, incremental):
    model = AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = _calib_images()
    recipe = get_recipe_class("vimvq").from_config(_block_cfg(incremental=incremental, lr_ratios=0.1))
    plan = recipe.calibrate(model, [images[:8], images[8:]])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(plan.layers) == 12 and all(isinstance(lp.spec.weight, VQWeightSpec) for lp in plan.layers.values())
    assert len(plan.info["blocks"]) == 2
    frozen = [s["frozen_before_export"] for s in plan.info["layers"].values()]
    assert all(f == 1.0 for f in frozen) if incremental else all(f == 0.0 for f in frozen)
    # the block-0 loss the engine measured on the frozen quantized block, against plain k-means VQ's on the same
    # (embedding) input: the optimisation starts from that k-means codebook and must improve on it
    plain = get_recipe_class("vimvq").from_config(_block_cfg(convex=False, incremental=False)).calibrate(model, None)
    with torch.no_grad():
        h = model.vim.embed(images)
        target, _ = model.vim.layers[0](h, None)
        block = copy.deepcopy(model.vim.layers[0])
        local = {k[len("vim.layers.0."):]: v for k, v in plain.layers.items() if k.startswith("vim.layers.0.")}
        apply_plan(block, QuantPlan(recipe="vimvq", layers=local))
        plain_loss = cosine_block_loss(block(h, None)[0], target).item()
    assert plan.info["blocks"][0]["quantized_loss"] < plain_loss, (plan.info["blocks"][0], plain_loss)


def test_blockwise_runs_are_seeded(tiny_vim_dir):
    model = AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    images = [_calib_images()]
    a = get_recipe_class("vimvq").from_config(_block_cfg(iterations=6)).calibrate(model, images)
    b = get_recipe_class("vimvq").from_config(_block_cfg(iterations=6)).calibrate(model, images)
    for name, lp in a.layers.items():
        assert all(torch.equal(t, b.layers[name].tensors[k]) for k, t in lp.tensors.items()), name


def test_convex_needs_calibration_data(tiny_vim_dir):
    cfg = _block_cfg()
    assert get_recipe_class("vimvq").requires_data(cfg)
    model = AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    with pytest.raises(ValueError, match="calibration_dataset"):
        get_recipe_class("vimvq").from_config(cfg).calibrate(model, None)


def test_onehot_regulariser_follows_vq4dits_rule(tiny_vim_dir):
    """onehot_regularizer: n * mean(pi (1 - pi)) of the soft sub-vectors joins the block loss only on steps where it
    did not fall below its lowest value so far; off by default."""
    from optimum_vim.calibration.blockwise import BlockContext
    from optimum_vim.models.family import family_of
    from optimum_vim.recipes.vimvq import ViMVQBlockRecipe

    model = AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    out = torch.randn(2, 50, 32)
    for flag in (False, True):
        recipe = get_recipe_class("vimvq").from_config(_block_cfg(onehot_regularizer=flag))
        block = ViMVQBlockRecipe(recipe, recipe.layouts(model))
        ctx = BlockContext(index=0, name="vim.layers.0", block=copy.deepcopy(model.vim.layers[0]).eval(),
                           family=family_of(model), generator=torch.Generator(), num_samples=8, num_blocks=2)
        block.prepare_block(ctx)
        vqs = [s.vq for s in block._stand_ins.values()]
        losses = []
        for logit in (1.0, 0.0, 50.0):  # initial ratios, flat ratios (largest penalty), near one-hot
            with torch.no_grad():
                for vq in vqs:
                    vq.logits.zero_()
                    vq.logits[:, 0] = logit
            losses.append(block.block_loss(ctx, out, out).item())
        if not flag:
            assert losses == pytest.approx([0.0] * 3, abs=1e-6)  # identical outputs: the cosine loss alone
        else:
            # first value: the running minimum (not added); flat: above it, added (2 * 0.25 per layer); one-hot: a new
            # minimum (not added)
            assert losses[0] == pytest.approx(0.0, abs=1e-6) and losses[2] == pytest.approx(0.0, abs=1e-6)
            assert losses[1] == pytest.approx(2 * 0.25, abs=1e-5)
    images = [_calib_images()]
    fast = dict(iterations=12, incremental=False, lr_ratios=0.5)  # ratios that move enough for the penalty to rise
    plain = get_recipe_class("vimvq").from_config(_block_cfg(**fast)).calibrate(model, images)
    regular = get_recipe_class("vimvq").from_config(_block_cfg(**fast, onehot_regularizer=True)).calibrate(model, images)
    assert any(not torch.equal(t, regular.layers[n].tensors[k]) for n, lp in plain.layers.items()
               for k, t in lp.tensors.items())
