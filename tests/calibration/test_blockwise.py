"""The block-wise calibration engine: streams, reproducibility, divergence handling, the shared stand-ins."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageClassification

from optimum_vim import ViMQuantizationConfig
from optimum_vim.calibration.blockwise import BlockwiseCalibrationError, calibrate_blockwise, cosine_block_loss
from optimum_vim.calibration.fakequant import FakeQuantLinear, LearnedActQuantizer, LearnedWeightQuantizer
from optimum_vim.calibration.lp_init import lp_token_affine, lp_weight_scale
from optimum_vim.modules import QLinear, build_qmodule, load_qmodule_tensors
from optimum_vim.recipes.ptq4vm import PTQ4VMBlocks, PTQ4VMRecipe


def _run(model, cls=PTQ4VMBlocks, **args):
    """The per-run engine object of a 2-step PTQ4VM W4A4 run on ``model`` (``cls``: a subclass that records what the
    engine does)."""
    cfg = ViMQuantizationConfig(recipe="ptq4vm", weight_bits=4, act_bits=4, recipe_args={"steps": 2, **args})
    recipe = PTQ4VMRecipe.from_config(cfg)
    return cls(recipe.args, recipe.targets.linears(model, recipe.args.targets))


@pytest.fixture(scope="module")
def tiny(tiny_vim_dir):
    return AutoModelForImageClassification.from_pretrained(tiny_vim_dir)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(3))


def test_student_trains_on_the_quantized_stream_teacher_on_the_float_one(tiny, pixels):
    seen = []

    class Recording(PTQ4VMBlocks):
        def prepare_block(self, ctx):
            seen.append({s: ctx.inputs(s) for s in ("float", "quant")})
            return super().prepare_block(ctx)

    recipe = _run(tiny, Recording)
    log = []
    plans = calibrate_blockwise(tiny, pixels, recipe, seed=0, log=log)
    assert len(plans) == 12 and all(k.startswith("vim.layers.") for k in plans)
    (h0f, r0f), (h0q, r0q) = seen[0]["float"], seen[0]["quant"]
    assert r0f is None and r0q is None and torch.equal(h0f, h0q)  # block 0: both streams are the embedding
    with torch.no_grad():
        emb = tiny.vim.embed(pixels)
        out0, res0 = tiny.vim.layers[0](emb, None)
    (h1f, r1f), (h1q, r1q) = seen[1]["float"], seen[1]["quant"]
    torch.testing.assert_close(h1f, out0)  # the float stream is the float model's
    torch.testing.assert_close(r1f, res0)
    assert r1q.dtype == torch.float32 and not torch.equal(h1q, h1f)  # the quantized stream carries block 0's error
    assert [entry["block"] for entry in log] == ["vim.layers.0", "vim.layers.1"]
    assert all(0 <= entry["quantized_loss"] < 1 for entry in log)
    assert all(isinstance(tiny.get_submodule(n), torch.nn.Linear) for n in plans)  # the model is left untouched


def test_calibration_is_bit_identical_whatever_the_thread_count(tiny, pixels):
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            recipe = _run(tiny)
            results.append(calibrate_blockwise(tiny, pixels, recipe, seed=5))
    finally:
        torch.set_num_threads(old)
    assert torch.get_num_threads() == old
    a, b = results
    assert a.keys() == b.keys()
    for name in a:
        for t in a[name].tensors:
            assert torch.equal(a[name].tensors[t], b[name].tensors[t]), f"{name}.{t}"


def test_non_finite_loss_stops_with_the_block_name(tiny, pixels):
    class Diverging(PTQ4VMBlocks):
        def block_loss(self, ctx, out, target):
            loss = cosine_block_loss(out, target)
            return loss * float("nan") if ctx.index == 1 else loss

    recipe = _run(tiny, Diverging)
    with pytest.raises(BlockwiseCalibrationError, match=r"vim\.layers\.1.*step 1/2.*Nothing was applied"):
        calibrate_blockwise(tiny, pixels, recipe)
    assert all(isinstance(m, torch.nn.Linear) for n, m in tiny.named_modules() if n.endswith("in_proj"))


def test_a_block_producing_nan_is_named(tiny_vim_dir, pixels):
    model = AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    with torch.no_grad():
        model.vim.layers[1].mixer.out_proj.weight[0, 0] = float("nan")
    recipe = _run(model)
    with pytest.raises(BlockwiseCalibrationError, match=r"block vim\.layers\.1: the float block's output"):
        calibrate_blockwise(model, pixels, recipe)


def test_capture_returns_the_float_inputs_of_submodules(tiny, pixels):
    captured = {}

    class Capturing(PTQ4VMBlocks):
        def prepare_block(self, ctx):
            if ctx.index == 0:
                captured.update(ctx.capture(["mixer.in_proj", "mixer.out_proj"]))
            return super().prepare_block(ctx)

    calibrate_blockwise(tiny, pixels, _run(tiny, Capturing, steps=0))
    x = captured["mixer.in_proj"]
    assert x.shape == (16, 50, 32) and captured["mixer.out_proj"].shape == (16, 50, 64)
    with torch.no_grad():
        block = tiny.vim.layers[0]
        normed = block.norm(tiny.vim.embed(pixels))
    torch.testing.assert_close(x, normed)


def test_bad_pixel_values_are_refused(tiny):
    recipe = _run(tiny)
    with pytest.raises(ValueError, match="non-empty"):
        calibrate_blockwise(tiny, torch.empty(0, 1, 28, 28), recipe)
    with pytest.raises(ValueError, match="NaN or inf"):
        calibrate_blockwise(tiny, torch.full((2, 1, 28, 28), float("nan")), recipe)
    with pytest.raises(TypeError, match="no model-family adapter for Linear"):
        calibrate_blockwise(torch.nn.Linear(2, 2), torch.randn(2, 1, 28, 28), recipe)


# ------------------------------------------------------------------------------------------ shared stand-ins
def test_lp_weight_scale_beats_minmax_and_never_loses():
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    w[:, 0] = 12.0  # one outlier column: clipping pays off at 4 bits
    step = lp_weight_scale(w, 4)
    minmax = w.abs().amax(1, keepdim=True) / 7
    assert (step <= minmax + 1e-7).all() and (step < minmax - 1e-6).any()

    def err(s):
        q = (w / s).round().clamp(-7, 7) * s
        return (w - q).abs().pow(2.4).mean(1)

    assert (err(step) <= err(minmax) + 1e-7).all()


def test_lp_token_affine_per_position_and_includes_minmax():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 64, generator=g) * torch.tensor([0.1, 1, 10, 1, 1]).view(1, 5, 1)
    x[:, 3] = x[:, 3].abs() + 2  # a positive-only position: the range is widened to include 0
    scale, zero = lp_token_affine(x, 4, candidates=20)
    assert scale.shape == zero.shape == (5,)
    assert scale[0] < scale[1] < scale[2]  # follows the per-position spread
    assert zero[3] == 0 and (zero >= 0).all() and (zero <= 15).all()
    one = lp_token_affine(x, 4, candidates=1)  # the single candidate is plain min-max
    lo, hi = x.amin((0, 2)).clamp(max=0), x.amax((0, 2)).clamp(min=0)
    torch.testing.assert_close(one[0], (hi - lo) / 15)
    with pytest.raises(ValueError, match="positive"):
        lp_token_affine(x, 4, p=0)


def test_fake_quant_linear_exports_the_module_it_simulates():
    g = torch.Generator().manual_seed(2)
    linear = torch.nn.Linear(32, 16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(16, 32, generator=g))
    x = torch.randn(3, 7, 32, generator=g)
    sigma = torch.rand(32, generator=g) + 0.5
    w = linear.weight * sigma
    step, zero = lp_token_affine(x / sigma, 4, candidates=10)
    fq = FakeQuantLinear(linear, LearnedWeightQuantizer(lp_weight_scale(w, 4, candidates=10), 4),
                         LearnedActQuantizer(step, 4, zero), sigma)
    plan = fq.export()
    assert plan.spec.smooth and plan.spec.input.granularity == "token" and not plan.spec.input.symmetric
    q = build_qmodule(plan.spec)
    load_qmodule_tensors(q, plan.tensors)
    assert isinstance(q, QLinear)
    with torch.no_grad():
        torch.testing.assert_close(q(x), fq(x), rtol=1e-5, atol=1e-5)
    # sigma is folded into the stored codes: the effective weight is the float weight up to 4-bit rounding
    assert (q.effective_weight() - linear.weight).abs().max() < (w.abs().amax(1) / 7 / sigma.min()).max()


@pytest.mark.parametrize("recipe,args", [
    ("ptq4vm", {"steps": 3}),
    ("ouromamba", {"epochs": 2, "candidates": 20}),
], ids=["ptq4vm", "ouromamba"])
def test_two_worker_threads_give_bit_identical_plans(tiny, recipe, args, monkeypatch):
    """80 images: 3 training pieces (32, 32, 16) and 2 streaming chunks per step, so two workers really share the
    work; the plans equal the one-thread run bit for bit (OuroMamba on real images: its generation is not part of
    the engine)."""
    import threading

    import optimum_vim
    from optimum_vim.calibration import blockwise

    pixels = torch.randn(80, 1, 28, 28, generator=torch.Generator().manual_seed(11))
    cfg = ViMQuantizationConfig(recipe=recipe, weight_bits=4, act_bits=4, recipe_args=args)
    threads_seen = set()
    real_map = blockwise._Workers.map

    def recording_map(self, fn, items):
        def wrapped(x):
            threads_seen.add(threading.get_ident())
            return fn(x)
        return real_map(self, wrapped, items)

    monkeypatch.setattr(blockwise._Workers, "map", recording_map)
    plans = {}
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            threads_seen.clear()
            plans[threads] = optimum_vim.recipes.get_recipe_class(recipe).from_config(cfg).calibrate(tiny, [pixels]).layers
            assert len(threads_seen) == threads
    finally:
        torch.set_num_threads(old)
    assert plans[1].keys() == plans[2].keys() and len(plans[1]) > 0
    for name, lp in plans[1].items():
        for t, v in lp.tensors.items():
            assert torch.equal(v, plans[2][name].tensors[t]), f"{name}.{t}"


def test_blocks_stay_in_eval_mode_while_the_stand_ins_train(pixels):
    """Drop-path and dropout are off while a learned recipe calibrates: a checkpoint saved with drop_path_rate /
    drop_rate (and even a model handed over in train mode) gives exactly the plans of the same weights without them,
    and no module of the student is in train mode during the optimiser steps."""
    from optimum_vim import VimConfig, VimForImageClassification

    def build(**rates):
        torch.manual_seed(7)
        cfg = VimConfig(hidden_size=32, num_hidden_layers=3, d_state=4, expand=2, patch_size=4, stride=4,
                        image_size=28, num_channels=1, num_labels=10, **rates)
        return VimForImageClassification(cfg)

    plain = build().eval()
    noisy = build(drop_path_rate=0.6, drop_rate=0.3).train()
    assert noisy.vim.layers[2].drop_path > 0 and noisy.vim.pos_drop.p > 0
    modes = []

    class Recording(PTQ4VMBlocks):
        def on_step(self, ctx, student, step, steps):
            modes.append(any(m.training for m in student.modules()))

    plans = [calibrate_blockwise(m, pixels, _run(m, Recording), seed=0) for m in (plain, noisy)]
    a, b = plans
    for name in a:
        for t in a[name].tensors:
            assert torch.equal(a[name].tensors[t], b[name].tensors[t]), f"{name}.{t}"
    assert modes and not any(modes)
    assert noisy.training and all(m.training for m in noisy.modules())  # the caller's mode is restored


def test_lp_token_affine_can_widen_only_the_winner_as_the_official_code():
    """widen="winner": candidates scored on their own (unwidened) range, the chosen one widened to include 0 (the
    official PTQ4VM / OuroMamba init); the default widens every candidate before scoring it."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, 40, generator=g)
    x[:, 1] = x[:, 1].abs() * 0.2 + 3.0  # positive only, far from 0: widening changes the candidates' grids
    x[0, 1, :2] = 6.0
    x[:, 2, 0] = 12.0  # one large value: clipping pays
    scale, zero = lp_token_affine(x, 4, candidates=25, widen="winner")
    for t in range(3):  # the official search written out for one position
        v = x[:, t].reshape(-1)
        lo0, hi0 = v.min(), v.max()
        best, best_range = float("inf"), (lo0, hi0)
        for i in range(25):
            a = i / 50
            lo, hi = lo0 + a * (hi0 - lo0), hi0 - a * (hi0 - lo0)
            s = ((hi - lo) / 15).clamp(min=1e-8)
            z = torch.round(-lo / s)
            err = (v - ((torch.round(v / s) + z).clamp(0, 15) - z) * s).abs().pow(2.4).mean()
            if err < best:
                best, best_range = err, (lo, hi)
        lo, hi = min(best_range[0], 0.0), max(best_range[1], 0.0)
        torch.testing.assert_close(scale[t], ((hi - lo) / 15).clamp(min=1e-8))
        assert zero[t] == torch.round(-lo / scale[t]).clamp(0, 15)
    default = lp_token_affine(x, 4, candidates=25)
    assert default[0][1] != scale[1]
    with pytest.raises(ValueError, match="widen"):
        lp_token_affine(x, 4, widen="never")
