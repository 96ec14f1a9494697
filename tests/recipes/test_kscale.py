"""kscale recipe (k-scaled PTQ, Shi et al. 2025): search helpers, what is quantized, the 8-bit hidden state, kernels,
save / reload, dequantize and refusals. Calibration runs on few images with a short candidate grid to stay fast."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification

import optimum_vim  # noqa: F401
from optimum_vim import ViMQuantizationConfig, quantize_model
from optimum_vim.calibration.search import (
    candidate_factors,
    cluster_labels,
    fake_quant,
    mean_cosine,
    reparam_factors,
    search_cluster_scales,
    search_scale,
    search_state_scales,
)
from optimum_vim.modules import QConv1d, QLinear, QOutput, QSelectiveScan
from optimum_vim.ops.dispatch import use_kernels
from optimum_vim.recipes import get_recipe_class
from tests.support.helpers import eval_logits, random_images, sqnr_db

FAST = {"search_candidates": 21, "search_rounds": 2}


def _cfg(**recipe_args):
    return ViMQuantizationConfig(recipe="kscale", weight_bits=8, act_bits=8, calibration_dataset=random_images(8),
                                 recipe_args={**FAST, **recipe_args})


@pytest.fixture(scope="module")
def fp_model(tiny_vim_dir):
    return AutoModelForImageClassification.from_pretrained(tiny_vim_dir).eval()


@pytest.fixture(scope="module")
def kscale_model(tiny_vim_dir):
    return AutoModelForImageClassification.from_pretrained(tiny_vim_dir, quantization_config=_cfg()).eval()


# ----------------------------------------------------------------------------------------------- search helpers
def test_candidate_grid_is_the_papers():
    f = candidate_factors(101)
    assert f.numel() == 101 and f[0].item() == pytest.approx(0.01) and f[-1].item() == pytest.approx(1.2)
    assert torch.allclose(f[1:] - f[:-1], torch.full((100,), 0.0119, dtype=torch.float64))


def test_search_scale_is_the_best_candidate_and_beats_max_abs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=gen)
    x[0, 0] = 40.0  # one outlier: max-abs wastes the grid, a clipped scale is better
    init = x.abs().max().item() / 127.5
    f = candidate_factors(31)
    best = search_scale(x, x, init, f, -128, 127)
    scores = [mean_cosine(x, fake_quant(x, init * v, -128, 127)) for v in f.tolist()]
    assert best == pytest.approx(init * f[max(range(len(scores)), key=scores.__getitem__)].item())
    assert mean_cosine(x, fake_quant(x, best, -128, 127)) > mean_cosine(x, fake_quant(x, init, -128, 127))


def test_token_clusters_power_of_two_and_channel_clusters_improve():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 20, 16, generator=gen) * torch.logspace(-2, 1, 20).view(1, -1, 1)
    labels = cluster_labels(x, "token", 4, seed=0)
    assert labels.shape == (20,) and labels.dtype == torch.int32 and set(labels.tolist()) == {0, 1, 2, 3}
    means = x.abs().mean((0, 2))
    assert means[labels == 0].max() < means[labels == 3].min()  # relabelled by centroid: 0 is the smallest group
    s = search_cluster_scales(x, x, labels, "token", candidate_factors(21), -128, 127, power_of_two=True)
    ratio = torch.log2(s.double() / s[0].double())
    assert torch.equal(ratio, ratio.round()) and (ratio[1:] > 0).all()
    xc = x.transpose(1, 2).contiguous()  # outliers along channels now
    lab_c = cluster_labels(xc, "channel", 4, seed=0)
    init = search_cluster_scales(xc, xc, lab_c, "channel", candidate_factors(21), -128, 127, search=False)
    found = search_cluster_scales(xc, xc, lab_c, "channel", candidate_factors(21), -128, 127, rounds=2)
    cos = [mean_cosine(xc, fake_quant(xc, sc[lab_c.long()].view(1, 1, -1), -128, 127)) for sc in (init, found)]
    assert cos[1] >= cos[0]


def test_reparam_factors_separate_a_rank_one_map():
    c, length, d = torch.linspace(1, 8, 6), torch.linspace(0.5, 1, 5), torch.logspace(-1, 1, 4)
    H = c.view(-1, 1, 1) * length.view(1, -1, 1) * d.view(1, 1, -1)
    r_c, r_l, r_d = reparam_factors(H)
    flat = H / (r_c.view(-1, 1, 1) * r_l.view(1, -1, 1) * r_d.view(1, 1, -1))
    assert flat.std() / flat.mean() < H.std() / H.mean()  # flatter after the reparameterisation
    assert r_c.shape == (6,) and r_l.shape == (5,) and r_d.shape == (4,)


def _scan_inputs(seed: int, b: int, length: int, e: int, n: int):
    """Random (u, delta, A, B, C) of one scan direction."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(b, length, e, generator=gen)
    delta = torch.rand(b, length, e, generator=gen) * 0.5
    A = -torch.rand(e, n, generator=gen) - 0.2
    return u, delta, A, torch.randn(b, length, n, generator=gen), torch.randn(b, length, n, generator=gen)


def test_state_search_beats_max_abs_on_next_step_outputs():
    length = 12
    u, delta, A, B, C = _scan_inputs(2, 3, length, 8, 4)
    from optimum_vim_kernels.reference import selective_scan_q_ref

    ref = selective_scan_q_ref(u, delta, A, B, C)
    out = {}
    for search in (False, True):
        s = search_state_scales(u, delta, A, B, C, reverse=False, factors=candidate_factors(41), search=search,
                                qmin=-8, qmax=7)  # 4-bit codes so that the state's rounding matters
        assert s.shape == (length,) and (s > 0).all()
        out[search] = selective_scan_q_ref(u, delta, A, B, C, h_scale=s, h_qmin=-8, h_qmax=7)
    assert mean_cosine(ref, out[True]) > mean_cosine(ref, out[False])


# ----------------------------------------------------------------------------------------------- the recipe
def test_what_is_quantized(kscale_model, fp_model):
    mixer = kscale_model.vim.layers[0].mixer
    for name in ("in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj"):
        lin = getattr(mixer, name)
        assert isinstance(lin, QLinear) and lin.bits == 8 and lin.qweight.dtype == torch.int8
        assert torch.unique(lin.weight_scale).numel() == 1  # per-tensor weight scale
    for name in ("conv1d", "conv1d_b"):
        conv = getattr(mixer, name)
        assert isinstance(conv, QConv1d) and conv.weight_scale.numel() == 1
        assert conv.output_quantizer.granularity == "channel_cluster"
        assert conv.input_quantizer.scale.item() == mixer.act_z.input_quantizer.scale.item()  # in_proj's output
    for name in ("act", "act_b", "act_z", "softplus", "softplus_b"):
        mod = getattr(mixer, name)
        assert isinstance(mod, QOutput) and mod.output_quantizer.granularity == "channel_cluster"
        assert mod.output_quantizer.qmin == -128 and mod.output_quantizer.labels.max() == 3
    assert mixer.dt_proj.input_quantizer.scale.item() == mixer.ssm.B_quantizer.scale.item()  # x_proj's output
    assert mixer.softplus.input_quantizer is not None
    iq = mixer.out_proj.input_quantizer
    assert iq.granularity == "token_cluster" and iq.labels.shape == (50,)
    ratio = torch.log2(iq.scale.double() / iq.scale[0].double())
    assert torch.equal(ratio, ratio.round())  # power-of-two token clusters
    for name in ("ssm", "ssm_b"):
        scan = getattr(mixer, name)
        assert isinstance(scan, QSelectiveScan) and scan.state_scale.shape == (50,)
        assert scan.state_channel_scale.shape == (64,) and scan.state_qmin == -128
        yq = scan.y_quantizer
        assert yq.granularity == "token_cluster" and yq.spec.channel_factor
        assert torch.equal(yq.factor, scan.state_channel_scale)  # r_C on y and on the state
        assert torch.equal(torch.log2(yq.scale / yq.scale[0]), torch.log2(yq.scale / yq.scale[0]).round())
    # dt_proj bias corrected; x_proj carries r_D in its B / C rows (dt rows untouched up to rounding)
    fp_mixer = fp_model.vim.layers[0].mixer
    assert not torch.equal(mixer.dt_proj.bias, fp_mixer.dt_proj.bias.float())
    r = fp_mixer.dt_rank
    w_hat, w = mixer.x_proj.dequantized_weight(), fp_mixer.x_proj.weight
    assert (w_hat[:r] - w[:r]).abs().max() <= mixer.x_proj.weight_scale[0, 0] / 2 + 1e-7
    assert (w_hat[r:] - w[r:]).abs().max() > mixer.x_proj.weight_scale[0, 0]
    assert "head" not in kscale_model.config.quantization_config.layers


def test_fidelity_and_calibrate_leaves_model_unchanged(kscale_model, fp_model):
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    ref = eval_logits(fp_model, x)
    assert sqnr_db(ref, eval_logits(kscale_model, x)) > 25
    before = {k: v.clone() for k, v in fp_model.state_dict().items()}
    recipe = get_recipe_class("kscale").from_config(_cfg())
    plan = recipe.calibrate(fp_model, [random_images(8)])
    assert all(torch.equal(before[k], v) for k, v in fp_model.state_dict().items())
    assert plan.layers and all(hasattr(m, "weight") for m in [fp_model.vim.layers[0].mixer.in_proj])
    plan2 = recipe.calibrate(fp_model, [random_images(8)])  # seeded: bit-identical plans
    for name, layer in plan.layers.items():
        assert all(torch.equal(t, plan2.layers[name].tensors[k]) for k, t in layer.tensors.items())


def test_minmax_baseline_and_float_state(tiny_vim_dir, fp_model):
    base = AutoModelForImageClassification.from_pretrained(
        tiny_vim_dir, quantization_config=_cfg(num_clusters=1, scale_search="minmax", reparameterize=False))
    mixer = base.vim.layers[0].mixer
    assert mixer.out_proj.input_quantizer.granularity == "tensor"
    assert mixer.conv1d.output_quantizer.granularity == "tensor"
    assert mixer.ssm.state_channel_scale is None and "channel_factor" not in mixer.ssm.y_quantizer.spec.to_dict()
    # max-abs: the input scale is exactly max|x| / 127.5 of the observed tensor
    h = mixer.ssm.state_scale
    assert (h > 0).all()
    no_h = AutoModelForImageClassification.from_pretrained(tiny_vim_dir, quantization_config=_cfg(state_bits=None))
    assert no_h.vim.layers[0].mixer.ssm.state_scale is None
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    ref = eval_logits(fp_model, x)
    assert sqnr_db(ref, eval_logits(base, x)) > 15 and sqnr_db(ref, eval_logits(no_h, x)) > 25


# ----------------------------------------------------------------------------------------------- hidden state
def test_state_is_integers_times_scales_at_every_step(kscale_model, monkeypatch):
    from optimum_vim_kernels.reference import selective_scan_q_ref

    import optimum_vim.modules.scan as scan_mod

    seen = []

    def recording(u, delta, A, B, C, D=None, z=None, **kw):
        def cb(t, h, s):
            seen.append((t, h.clone(), s.clone()))
        return selective_scan_q_ref(u, delta, A, B, C, D, z, state_callback=cb, **kw)

    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    expected = eval_logits(kscale_model, x)
    monkeypatch.setattr(scan_mod, "selective_scan_q", recording)
    with use_kernels("reference"):
        got = eval_logits(kscale_model, x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert len(seen) == 2 * 2 * 50  # 2 layers x 2 directions x 50 steps
    scan = kscale_model.vim.layers[0].mixer.ssm
    for t, h, s in seen[:50]:  # first scan: layer 0 forward direction
        torch.testing.assert_close(s.reshape(-1), (scan.state_scale[t] * scan.state_channel_scale).reshape(-1))
        codes = h / s
        assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 128
        assert codes.round().abs().max() > 4  # the state really uses the 8-bit grid


@pytest.mark.slow
def test_saved_state_scales_change_logits_and_reload_is_bit_identical(fixture_dir, kscale_model, tmp_path):
    kscale_model.save_pretrained(tmp_path / "tiny")  # the random tiny model reloads bit-identically too
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    assert torch.equal(eval_logits(AutoModelForImageClassification.from_pretrained(tmp_path / "tiny"), x),
                       eval_logits(kscale_model, x))
    # the trained fixture: its scans matter for the logits (the random model's barely do)
    AutoModelForImageClassification.from_pretrained(fixture_dir, quantization_config=_cfg()).save_pretrained(
        tmp_path / "q")
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "q")
    expected = eval_logits(again, x)
    assert torch.equal(eval_logits(AutoModelForImageClassification.from_pretrained(tmp_path / "q"), x), expected)
    assert isinstance(again.vim.layers[1].mixer.ssm_b, QSelectiveScan)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["recipe"] == "kscale" and cfg["recipe_args"]["search_candidates"] == 21
    assert "kscale" in (tmp_path / "q" / "README.md").read_text()
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    keys = [k for k in tensors if k.endswith((".ssm.state_scale", ".ssm_b.state_scale"))]
    assert len(keys) == 12
    for k in keys:
        tensors[k] = tensors[k] * 8  # a coarser per-step state grid
    save_file(tensors, tmp_path / "q" / "model.safetensors", metadata={"format": "pt", **_metadata(tmp_path / "q")})
    coarse = AutoModelForImageClassification.from_pretrained(tmp_path / "q")
    changed = eval_logits(coarse, x)
    assert (changed - expected).abs().max() > 0.05 * expected.abs().max(), (changed - expected).abs().max()


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return dict(f.metadata() or {})


def test_dequantize_drops_state_quantization(kscale_model, fp_model):
    model = copy.deepcopy(kscale_model).dequantize()
    assert not any(isinstance(m, (QLinear, QSelectiveScan, QOutput, QConv1d)) for m in model.modules())
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    ref = eval_logits(fp_model, x)
    # float activations and state, 8-bit weights, r_D folded into x_proj (exact in float): closer than quantized
    assert sqnr_db(ref, eval_logits(model, x)) > sqnr_db(ref, eval_logits(kscale_model, x))


# ----------------------------------------------------------------------------------------------- kernels
def test_triton_serves_kscale_model_like_the_reference(kscale_model, monkeypatch):
    import optimum_vim_kernels.gemm as gemm
    import optimum_vim_kernels.scan as scan

    calls = {"quant_gemm_int8": 0, "quant_gemm_float": 0, "selective_scan_q_state": 0}
    real_gemm, real_scan = gemm.quant_gemm, scan.selective_scan_q

    def counting_gemm(a, *args, **kw):
        calls["quant_gemm_float" if a.is_floating_point() else "quant_gemm_int8"] += 1
        return real_gemm(a, *args, **kw)

    def counting_scan(*args, **kw):
        calls["selective_scan_q_state"] += kw.get("h_scale") is not None and not args[3].is_floating_point()
        return real_scan(*args, **kw)

    monkeypatch.setattr(gemm, "quant_gemm", counting_gemm)
    monkeypatch.setattr(scan, "selective_scan_q", counting_scan)
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    with use_kernels("reference"):
        ref = eval_logits(kscale_model, x)
    assert sum(calls.values()) == 0
    with use_kernels("triton"):  # raises if any quantized op cannot be served by a kernel
        out = eval_logits(kscale_model, x)
    # per layer: in_proj, dt_proj x2, out_proj with int8 codes (out_proj: token-cluster scales); x_proj x2 on float
    # values already on the 8-bit grid (channel-cluster u); both scans with int8 B / C and the 8-bit state
    assert calls == {"quant_gemm_int8": 2 * 4, "quant_gemm_float": 2 * 2, "selective_scan_q_state": 2 * 2}
    assert sqnr_db(ref, out) > 40


# ----------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs,match", [
    ({"weight_bits": 4, "act_bits": 8}, "W8A8.*ptq4vm.*ouromamba"),
    ({"weight_bits": 8, "act_bits": 4}, "W8A8.*ptq4vm"),
    ({"weight_bits": 8, "act_bits": None}, "act_bits=8"),
    ({"recipe_args": {"num_clusters": 0}}, "num_clusters"),
    ({"recipe_args": {"scale_search": "mse"}}, "scale_search"),
    ({"recipe_args": {"state_bits": 4}}, "state_bits"),
    ({"recipe_args": {"search_candidates": 1}}, "search_candidates"),
    ({"recipe_args": {"search_rounds": 0}}, "search_rounds"),
    ({"recipe_args": {"reparameterize": "yes"}}, "reparameterize"),
    ({"recipe_args": {"search_images": 0}}, "search_images"),
    ({"recipe_args": {"y_search": "float"}}, "y_search"),
    ({"recipe_args": {"state_score": "h"}}, "state_score"),
    ({"recipe_args": {"power_of_two": "never"}}, "power_of_two"),
    ({"recipe_args": {"preset": "paper", "search_images": 64}}, "preset 'paper' sets search_images=None"),
], ids=["w4", "a4", "weight-only", "clusters", "search", "state-bits", "candidates", "rounds", "reparam",
        "search-images", "y-search", "state-score", "pow2", "preset-clash"])
def test_refusals(kwargs, match):
    kw = {"recipe": "kscale", "weight_bits": 8, "act_bits": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        ViMQuantizationConfig(**kw)


def test_too_few_images_for_the_clusters_and_nothing_half_applied(fp_model):
    model = copy.deepcopy(fp_model)
    cfg = ViMQuantizationConfig(recipe="kscale", weight_bits=8, act_bits=8, calibration_dataset=random_images(3),
                                recipe_args=FAST)
    with pytest.raises(ValueError, match="3 calibration images.*at least 4"):
        quantize_model(model, cfg)
    assert not any(isinstance(m, QLinear) for m in model.modules())


def test_sequence_length_differs_from_calibration(kscale_model):
    mixer = kscale_model.vim.layers[0].mixer
    e, n = 64, 4
    u, delta = torch.randn(1, 30, e), torch.rand(1, 30, e)
    B, C = torch.randn(1, 30, n), torch.randn(1, 30, n)
    with pytest.raises(ValueError, match="per-step state scales were calibrated for 50 tokens; got 30"):
        mixer.ssm(u, delta, -torch.ones(e, n), B, C, torch.ones(e))
    with pytest.raises(ValueError, match="calibrated for 50 tokens"):
        mixer.out_proj(torch.randn(1, 30, e))


# ----------------------------------------------------------------------------------------------- official-code switches
def test_paper_preset_and_256_images_by_default():
    cls = get_recipe_class("kscale")
    assert cls.default_calibration_samples == 256  # the paper's and the official code's count
    args = cls.build_args({"preset": "paper", "search_candidates": 21})
    assert (args.search_images, args.y_search, args.state_score, args.power_of_two) == (
        None, "quantized_state", "y_over_rc", "snap_after")
    assert args.search_candidates == 21 and args.num_clusters == 4


def test_power_of_two_snapped_after_a_free_search():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 20, 16, generator=gen) * torch.logspace(-2, 1, 20).view(1, -1, 1)
    labels = cluster_labels(x, "token", 4, seed=0)
    factors = candidate_factors(21)
    free = search_cluster_scales(x, x, labels, "token", factors, -128, 127)
    after = search_cluster_scales(x, x, labels, "token", factors, -128, 127, power_of_two=True, snap_after=True)
    ratio = torch.log2(after.double() / after[0].double())
    assert torch.equal(ratio, ratio.round())
    assert after[0] == free[0]  # the base cluster is searched alone either way
    torch.testing.assert_close(after[1:].double(), after[0].double() * torch.pow(2.0, torch.round(
        torch.log2(free[1:].double() / free[0].double()))))


def test_state_search_can_score_the_reparameterised_output():
    e = 8
    u, delta, A, B, C = _scan_inputs(4, 3, 10, e, 4)
    kw = dict(reverse=False, factors=candidate_factors(41), qmin=-8, qmax=7)
    plain = search_state_scales(u, delta, A, B, C, **kw)
    assert torch.equal(search_state_scales(u, delta, A, B, C, score_factor=torch.ones(e), **kw), plain)
    skewed = torch.logspace(-2, 2, e)  # y / r_C weights the channels differently: another cosine, other scales
    assert not torch.equal(search_state_scales(u, delta, A, B, C, score_factor=skewed, **kw), plain)


def test_official_switches_change_only_what_they_name(fp_model):
    cls = get_recipe_class("kscale")
    x = [random_images(8)]

    def plan(**args):
        return cls.from_config(_cfg(**args)).calibrate(copy.deepcopy(fp_model), x)

    base, after = plan(), plan(y_search="quantized_state")
    scan = "vim.layers.1.mixer.ssm"
    assert torch.equal(base.layers[scan].tensors["state_scale"], after.layers[scan].tensors["state_scale"])
    assert torch.equal(base.layers[scan].tensors["y_quantizer.labels"], after.layers[scan].tensors["y_quantizer.labels"])
    assert not torch.equal(base.layers[scan].tensors["y_quantizer.scale"], after.layers[scan].tensors["y_quantizer.scale"])
    assert torch.equal(base.layers["vim.layers.1.mixer.in_proj"].tensors["qweight"],
                       after.layers["vim.layers.1.mixer.in_proj"].tensors["qweight"])
    scored = plan(state_score="y_over_rc")
    assert not torch.equal(base.layers[scan].tensors["state_scale"], scored.layers[scan].tensors["state_scale"])
    assert torch.equal(base.layers[scan].tensors["y_quantizer.scale"], scored.layers[scan].tensors["y_quantizer.scale"])
