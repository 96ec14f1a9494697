"""Recipe ``ouromamba``: data-free for real, the extractor on every block linear and on each scan direction's S6
tensors, accurate on the trained fixture, saved / reloaded bit-identically, and bad input refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

import optimum_vim
from optimum_vim import ViMQuantizationConfig, quantize_model
from optimum_vim.evaluation import evaluate, load_named_dataset
from optimum_vim.modules import QActivation
from optimum_vim.recipes.ouromamba.generation import GenerationDivergedError
from tests.support.helpers import forbid_real_data

FAST = dict(num_synthetic=12, gen_iterations=8, epochs=2)


def _config(act_bits=4, **recipe_args):
    return ViMQuantizationConfig(recipe="ouromamba", weight_bits=4, act_bits=act_bits,
                                 recipe_args={**FAST, **recipe_args})


@pytest.fixture(scope="module")
def float_model(fixture_dir):
    return AutoModelForImageClassification.from_pretrained(fixture_dir).eval()


@pytest.fixture(scope="module")
def w4a4(fixture_dir):
    return AutoModelForImageClassification.from_pretrained(fixture_dir, quantization_config=_config()).eval()


@pytest.fixture(scope="module")
def subset():
    return load_named_dataset("fashion-mnist", "test", limit=400)


def test_is_data_free_for_real(fixture_dir, monkeypatch):
    forbid_real_data(monkeypatch)
    cfg = _config(num_synthetic=4, gen_iterations=2, epochs=1)
    assert not optimum_vim.recipes.get_recipe_class("ouromamba").requires_data(cfg)
    model = AutoModelForImageClassification.from_pretrained(fixture_dir, quantization_config=cfg)
    assert model.config.quantization_config.calibration_source.startswith("calibrated on 4 synthetic images")


def test_data_free_api_equals_the_cli_for_the_same_seed(tiny_vim_dir, tmp_path):
    """from_pretrained(path, quantization_config=...) without an image_processor bounds the synthetic pixels with the
    checkpoint's processor, as the CLI (and benchmarks/accuracy.py) do: same seed, same stored tensors."""
    from safetensors.torch import load_file

    from optimum_vim.cli import main

    args = dict(num_synthetic=4, gen_iterations=3, epochs=1)
    out = tmp_path / "cli"
    cli_args = ["quantize", tiny_vim_dir, str(out), "--recipe", "ouromamba", "--weight-bits", "4", "--act-bits", "4"]
    for key, value in args.items():
        cli_args += ["--recipe-arg", f"{key}={value}"]
    assert main(cli_args) == 0
    api = AutoModelForImageClassification.from_pretrained(
        tiny_vim_dir, quantization_config=ViMQuantizationConfig(recipe="ouromamba", weight_bits=4, act_bits=4,
                                                                recipe_args=args))
    api.save_pretrained(tmp_path / "api", model_card=False)
    cli_tensors, api_tensors = load_file(out / "model.safetensors"), load_file(tmp_path / "api" / "model.safetensors")
    assert cli_tensors.keys() == api_tensors.keys()
    for key in cli_tensors:
        assert torch.equal(cli_tensors[key], api_tensors[key]), key


def test_every_block_linear_and_both_scans_get_the_extractor(w4a4):
    mixer = w4a4.vim.layers[1].mixer
    for name in ("in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj"):
        layer = getattr(mixer, name)
        assert layer.spec.weight.to_dict() == {"format": "int", "bits": 4, "group_size": None}
        iq = layer.spec.input
        assert iq.granularity == "dynamic_outlier" and iq.bits == 4 and iq.outlier_bits == 8
        assert iq.refresh == 10 and iq.outlier_sigma == 3.0 and iq.reverse == name.endswith("_b")
    fwd, bwd = mixer.ssm, mixer.ssm_b
    for scan, reverse in ((fwd, False), (bwd, True)):
        for name in ("u", "delta", "B", "C"):
            q = getattr(scan, f"{name}_quantizer")
            assert isinstance(q, QActivation) and q.spec.reverse is reverse
            assert q.symmetric is (name != "delta") and q.spec.outlier_sigma == (4.0 if name == "delta" else 3.0)
    # each direction has its own quantizers (the official code shares one set per block)
    assert fwd.u_quantizer is not bwd.u_quantizer
    assert not torch.equal(fwd.u_quantizer.scale, bwd.u_quantizer.scale)


@pytest.mark.slow
def test_w4a4_data_free_stays_accurate(float_model, w4a4, subset, fixture_dir):
    proc = AutoImageProcessor.from_pretrained(fixture_dir)
    fp = evaluate(float_model, subset, proc, batch_size=200, progress=False).top1
    q = evaluate(w4a4, subset, proc, batch_size=200, progress=False).top1
    assert q >= 0.95 * fp, (q, fp)


def test_calibrate_leaves_the_model_alone_and_is_seeded(float_model):
    before = {k: v.clone() for k, v in float_model.state_dict().items()}
    cls = optimum_vim.recipes.get_recipe_class("ouromamba")
    cfg = _config(num_synthetic=4, gen_iterations=2, epochs=1)
    a = cls.from_config(cfg).calibrate(float_model, None)
    b = cls.from_config(cfg).calibrate(float_model, None)
    assert all(torch.equal(before[k], v) for k, v in float_model.state_dict().items())
    assert a.layers.keys() == b.layers.keys() and len(a.layers) == 6 * 8  # 6 linears + 2 scans per block
    for name in a.layers:
        for t in a.layers[name].tensors:
            assert torch.equal(a.layers[name].tensors[t], b.layers[name].tensors[t]), (name, t)


def test_scan_steps_learn_unless_turned_off(float_model):
    cls = optimum_vim.recipes.get_recipe_class("ouromamba")
    fast = dict(num_synthetic=4, gen_iterations=2)
    init = cls.from_config(_config(**fast, epochs=0)).calibrate(float_model, None)
    frozen = cls.from_config(_config(**fast, epochs=2, train_scan_steps=False)).calibrate(float_model, None)
    learned = cls.from_config(_config(**fast, epochs=2)).calibrate(float_model, None)
    scans = [n for n in init.layers if n.endswith(("ssm", "ssm_b"))]
    assert len(scans) == 2 * len(float_model.vim.layers)
    for name in scans:
        for t in ("u", "delta", "B", "C"):
            key = f"{t}_quantizer.scale"
            # the S6 inits are captured on the float stream, so they do not depend on earlier blocks' training
            assert torch.equal(frozen.layers[name].tensors[key], init.layers[name].tensors[key]), (name, t)
            assert not torch.equal(learned.layers[name].tensors[key], init.layers[name].tensors[key]), (name, t)
            # the zero points of the affine Δ grid stay frozen
            if t == "delta":
                assert torch.equal(learned.layers[name].tensors["delta_quantizer.zero_point"],
                                   init.layers[name].tensors["delta_quantizer.zero_point"])
    lin = "vim.layers.2.mixer.in_proj"
    assert not torch.equal(frozen.layers[lin].tensors["input_quantizer.scale"],
                           init.layers[lin].tensors["input_quantizer.scale"])  # the linears learn either way
    # at 8-bit activations the default leaves them at their init (AdamW's steps are coarse against 8-bit scales)
    init8 = cls.from_config(_config(8, **fast, epochs=0)).calibrate(float_model, None)
    default8 = cls.from_config(_config(8, **fast, epochs=2)).calibrate(float_model, None)
    forced8 = cls.from_config(_config(8, **fast, epochs=2, train_scan_steps=True)).calibrate(float_model, None)
    key = "u_quantizer.scale"
    assert all(torch.equal(default8.layers[n].tensors[key], init8.layers[n].tensors[key]) for n in scans)
    assert not any(torch.equal(forced8.layers[n].tensors[key], init8.layers[n].tensors[key]) for n in scans)


def test_generation_priors_reach_the_generator(float_model, monkeypatch):
    import optimum_vim.recipes.ouromamba.generation as generation

    seen = []
    real = generation.generate_calibration_images

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_calibration_images", recording)
    cls = optimum_vim.recipes.get_recipe_class("ouromamba")
    cls.from_config(_config(num_synthetic=2, gen_iterations=2, epochs=0, gen_jitter=1, gen_flip=True,
                            gen_tv_weight=0.5)).calibrate(float_model, None)
    options = seen[0]["options"]
    assert (options.jitter, options.flip, options.tv_weight, options.iterations) == (1, True, 0.5, 2)


def test_real_data_ablation_uses_the_given_images(fixture_dir):
    train = load_named_dataset("fashion-mnist", "train", limit=16)
    cfg = ViMQuantizationConfig(recipe="ouromamba", weight_bits=4, act_bits=8, calibration_dataset=train,
                                num_calibration_samples=16, recipe_args={"epochs": 1})
    assert optimum_vim.recipes.get_recipe_class("ouromamba").requires_data(cfg)
    model = AutoModelForImageClassification.from_pretrained(fixture_dir, quantization_config=cfg)
    qc = model.config.quantization_config
    assert not qc.calibration_source.startswith("calibrated on")  # the real data set is named instead
    assert model.vim.layers[0].mixer.in_proj.spec.input.outlier_bits == 16  # W4A8O16


def test_static_outlier_ablation_stores_its_list(fixture_dir):
    cfg = _config(num_synthetic=4, gen_iterations=2, epochs=0, dynamic_outliers=False)
    model = AutoModelForImageClassification.from_pretrained(fixture_dir, quantization_config=cfg)
    iq = model.vim.layers[0].mixer.in_proj.input_quantizer
    assert iq.spec.static_outliers and iq.outlier_channels.shape == (128,)


def test_save_reload_is_bit_identical_and_dequantizes(w4a4, tmp_path):
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = w4a4(pixel_values=x).logits
    w4a4.save_pretrained(tmp_path)
    assert "calibrated on 12 synthetic images" in (tmp_path / "README.md").read_text()
    again = AutoModelForImageClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(pixel_values=x).logits, ref)
    deq = optimum_vim.dequantize_model(again)
    assert not optimum_vim.recipes.quantized_modules(deq)
    with torch.no_grad():
        assert torch.isfinite(deq(pixel_values=x).logits).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weight_bits=8, act_bits=4), "4 bits.*weight_bits=8"),
        (dict(weight_bits=4, act_bits=6), "act_bits 4 .*or 8"),
        (dict(weight_bits=4, act_bits=4, recipe_args={"outlier_bits": 4}), "outlier_bits"),
        (dict(weight_bits=4, act_bits=4, recipe_args={"patch_size": 4}), "odd"),
        (dict(weight_bits=4, act_bits=4, recipe_args={"refresh": 0}), "refresh"),
        (dict(weight_bits=4, act_bits=4, recipe_args={"dynamic_outliers": "yes"}), "dynamic_outliers"),
        (dict(weight_bits=4, act_bits=4, recipe_args={"epochs": -1}), "epochs"),
        (dict(weight_bits=4, act_bits=4, recipe_args={"train_scan_steps": 1}), "train_scan_steps"),
        (dict(weight_bits=4, act_bits=4, recipe_args={"gen_jitter": -1}), "gen_jitter"),
        (dict(weight_bits=4, act_bits=4, recipe_args={"gen_tv_weight": -0.5}), "gen_tv_weight"),
        (dict(weight_bits=4, act_bits=4, recipe_args={"num_synthetic": 0}), "num_synthetic"),
        (dict(weight_bits=4, act_bits=4, recipe_args={"loss": "l1"}), "'loss' must be one of"),
    ],
    ids=["w8", "a6", "outlier-bits", "patch", "refresh", "dynamic", "epochs", "train-scan", "jitter", "tv",
         "num-synthetic", "loss"],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViMQuantizationConfig(recipe="ouromamba", **kwargs)


def test_diverging_generation_stops_and_applies_nothing(fixture_dir):
    model = AutoModelForImageClassification.from_pretrained(fixture_dir)
    with torch.no_grad():
        model.head.weight.fill_(float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(GenerationDivergedError, match="iteration 0"):
        quantize_model(model, _config(num_synthetic=2, gen_iterations=3))
    assert not optimum_vim.recipes.quantized_modules(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if not k.startswith("head"))


def test_cli_needs_no_data_flag(fixture_dir, tmp_path, monkeypatch, capsys):
    import optimum_vim.evaluation as evaluation
    from optimum_vim.cli import main

    def unreachable(*a, **k):
        raise AssertionError("the CLI loaded a data set for the data-free recipe")

    monkeypatch.setattr(evaluation, "load_named_dataset", unreachable)
    out = tmp_path / "q"
    rc = main(["quantize", fixture_dir, str(out), "--recipe", "ouromamba", "--weight-bits", "4", "--act-bits", "8",
               "--recipe-arg", "num_synthetic=4", "--recipe-arg", "gen_iterations=2", "--recipe-arg", "epochs=0"])
    assert rc == 0 and (out / "model.safetensors").exists()
    assert "calibrated on 4 synthetic images" in (out / "README.md").read_text()


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "delta-affine"])
def test_stand_in_computes_what_the_exported_quantizer_computes(symmetric):
    from optimum_vim.calibration.lp_init import lp_token_affine, lp_token_symmetric
    from optimum_vim.calibration.outlier_fakequant import LearnedOutlierActQuantizer
    from optimum_vim.modules import build_qmodule, load_qmodule_tensors

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 13, 24, generator=g)
    x[:, 5, 3] = 30.0
    if not symmetric:
        x = x.abs()
    if symmetric:
        step, zero = lp_token_symmetric(x, 4), None
    else:
        step, zero = lp_token_affine(x, 4)
    stand_in = LearnedOutlierActQuantizer(step, 4, zero_point=zero, refresh=4, sigma=3.0, reverse=not symmetric,
                                          outlier_bits=8)
    spec, tensors = stand_in.export(24)
    q = build_qmodule(spec)
    load_qmodule_tensors(q, tensors)
    with torch.no_grad():
        assert torch.equal(stand_in(x), q(x))
    out = stand_in(x)
    out.sum().backward()
    assert stand_in.step.grad is not None and stand_in.step.grad.abs().sum() > 0  # the inlier steps learn


def test_lp_symmetric_init_beats_min_max():
    from optimum_vim.calibration.lp_init import lp_token_symmetric

    x = torch.randn(8, 6, 64, generator=torch.Generator().manual_seed(1))
    step = lp_token_symmetric(x, 4)
    minmax = x.abs().amax(dim=(0, 2)) / 7

    def err(s):
        s3 = s.view(1, -1, 1)
        return (x - torch.round(x / s3).clamp(-7, 7) * s3).abs().pow(2.4).mean(dim=(0, 2))

    assert (err(step) <= err(minmax) + 1e-7).all() and (step < minmax).all()


def test_step_learning_loss_is_selectable():
    from optimum_vim.calibration.blockwise import cosine_block_loss, nmse_block_loss
    from optimum_vim.recipes.ouromamba.quantize import OuroMambaBlocks, OuroMambaRecipe

    target = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(0))
    out = 0.7 * target + 0.1 * torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(1))
    def run(**args):  # the engine object of a run (no linears or scans needed to read its loss)
        cfg = ViMQuantizationConfig(recipe="ouromamba", weight_bits=4, act_bits=4, recipe_args=args)
        return OuroMambaBlocks(OuroMambaRecipe.from_config(cfg).args, {}, {}, {})

    default, nmse = run(), run(loss="nmse")
    assert default.args.loss == "cosine"
    assert torch.equal(default.block_loss(None, out, target), cosine_block_loss(out, target))
    assert torch.equal(nmse.block_loss(None, out, target), nmse_block_loss(out, target))
    assert nmse_block_loss(out, target) > cosine_block_loss(out, target)  # the 30 % norm deficit is seen


# ------------------------------------------------------------------------------------------ official-code switches
def test_paper_preset_expands_and_refuses_what_contradicts_it():
    cls = optimum_vim.recipes.get_recipe_class("ouromamba")
    args = cls.build_args({"preset": "paper", "gen_iterations": 40})  # options the preset leaves alone combine
    for key, value in cls.Args.PRESETS["paper"].items():
        assert getattr(args, key) == value, key
    assert args.gen_iterations == 40 and args.patch_size == 5
    assert cls.build_args({"preset": "paper", "delta_outliers": "range"}).delta_outliers == "range"  # agreeing
    with pytest.raises(ValueError, match=r"preset 'paper' sets train_scan_steps=False.*train_scan_steps=True"):
        ViMQuantizationConfig(recipe="ouromamba", weight_bits=4, act_bits=4,
                              recipe_args={"preset": "paper", "train_scan_steps": True})
    with pytest.raises(ValueError, match=r"no preset 'faithful'.*\['paper'\]"):
        cls.build_args({"preset": "faithful"})
    assert cls.parse_recipe_args({"preset": "paper"}) == {"preset": "paper"}  # the CLI spelling


@pytest.fixture(scope="module")
def tiny_float(tiny_vim_dir):
    return AutoModelForImageClassification.from_pretrained(tiny_vim_dir).eval()


def _tiny_plan(model, act_bits=4, **recipe_args):
    cls = optimum_vim.recipes.get_recipe_class("ouromamba")
    cfg = ViMQuantizationConfig(recipe="ouromamba", weight_bits=4, act_bits=act_bits,
                                recipe_args={"num_synthetic": 6, "gen_iterations": 2, "epochs": 2, **recipe_args})
    return cls.from_config(cfg).calibrate(model, None)


def test_official_quantization_points_for_delta_and_u(tiny_vim_dir, tmp_path):
    """delta_before_softplus moves Δ's quantizer onto softplus's input (dt_proj's output, bias included), with the
    official Q_Act_d rules; quantize_scan_u=False leaves the scan's u in float (x_proj's copy stays quantized)."""
    cfg = ViMQuantizationConfig(recipe="ouromamba", weight_bits=4, act_bits=4,
                                recipe_args={"num_synthetic": 6, "gen_iterations": 2, "epochs": 1, "preset": "paper"})
    model = AutoModelForImageClassification.from_pretrained(tiny_vim_dir, quantization_config=cfg).eval()
    mixer = model.vim.layers[1].mixer
    for suffix, reverse in (("", False), ("_b", True)):
        scan, softplus = getattr(mixer, "ssm" + suffix), getattr(mixer, "softplus" + suffix)
        assert scan.spec.delta is None and scan.spec.u is None and scan.spec.B and scan.spec.C
        iq = softplus.spec.input
        assert softplus.spec.output is None and softplus.spec.inner == "softplus"
        assert iq.granularity == "dynamic_outlier" and not iq.symmetric and iq.reverse is reverse
        assert iq.outlier_trigger == "range" and iq.outlier_affine and iq.outlier_sigma == 4.0
        assert getattr(mixer, "x_proj" + suffix).spec.input.granularity == "dynamic_outlier"
    captured = {}
    handle = mixer.softplus.register_forward_pre_hook(lambda m, a: captured.update(x=a[0]))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        logits = model(pixel_values=x).logits
    handle.remove()
    assert captured["x"].min() < 0  # pre-softplus values: the affine grid covers negative Δ logits
    model.save_pretrained(tmp_path)
    again = AutoModelForImageClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(pixel_values=x).logits, logits)
    default = _tiny_plan(AutoModelForImageClassification.from_pretrained(tiny_vim_dir).eval(), epochs=0)
    assert "vim.layers.1.mixer.softplus" not in default.layers
    assert default.layers["vim.layers.1.mixer.ssm"].spec.delta.symmetric is False
    assert "outlier_trigger" not in default.layers["vim.layers.1.mixer.ssm"].spec.delta.to_dict()  # default unchanged


def test_official_step_training_trains_only_in_proj_and_out_proj(tiny_float):
    init = _tiny_plan(tiny_float, epochs=0, step_training="official")
    official = _tiny_plan(tiny_float, step_training="official")
    ours = _tiny_plan(tiny_float)
    for block in ("vim.layers.0", "vim.layers.1"):
        for leaf in ("x_proj", "x_proj_b", "dt_proj", "dt_proj_b"):
            name = f"{block}.mixer.{leaf}"
            for t in ("weight_scale", "input_quantizer.scale"):
                assert torch.equal(official.layers[name].tensors[t], init.layers[name].tensors[t]), (name, t)
            assert not torch.equal(ours.layers[name].tensors["weight_scale"], init.layers[name].tensors["weight_scale"])
        for scan in ("ssm", "ssm_b"):
            name = f"{block}.mixer.{scan}"
            for t in ("u", "delta", "B", "C"):
                key = f"{t}_quantizer.scale"
                assert torch.equal(official.layers[name].tensors[key], init.layers[name].tensors[key]), (name, t)
    out = "vim.layers.0.mixer.out_proj"  # block 0: same stream for both runs, so only the training differs
    assert not torch.equal(official.layers[out].tensors["weight_scale"], init.layers[out].tensors["weight_scale"])
    assert not torch.equal(official.layers[out].tensors["input_quantizer.scale"],
                           init.layers[out].tensors["input_quantizer.scale"])
    with pytest.raises(ValueError, match="step_training='official'.*train_scan_steps=True"):
        ViMQuantizationConfig(recipe="ouromamba", weight_bits=4, act_bits=4,
                              recipe_args={"step_training": "official", "train_scan_steps": True})


def test_without_ste_the_input_gets_no_gradient_but_the_step_does():
    from optimum_vim.calibration.outlier_fakequant import LearnedOutlierActQuantizer
    from optimum_vim.primitives.outliers import extract_outliers

    x = (torch.randn(2, 5, 32) * 0.5).requires_grad_(True)
    step = torch.full((5,), 0.1)
    outliers = extract_outliers(x.detach(), step, None, -7, 7, refresh=5, sigma=3.0).outlier_mask
    assert outliers.any() and not outliers.all()
    for ste in (True, False):
        q = LearnedOutlierActQuantizer(step, 4, refresh=5, sigma=3.0, reverse=False, outlier_bits=16, ste=ste)
        x.grad = None
        q(x).pow(2).sum().backward()
        assert q.step.grad is not None and q.step.grad.abs().sum() > 0
        inlier_grad = x.grad.masked_fill(outliers, 0.0)
        # straight-through: every input gets a gradient; official plain round(): only the (fp16) outliers do
        assert bool(inlier_grad.abs().sum() > 0) is ste and x.grad[outliers].abs().sum() > 0


def test_raw_calibration_threshold_is_the_official_initialisation():
    from optimum_vim.calibration.outlier_fakequant import calibration_outlier_masks

    x = torch.ones(1, 2, 10)
    x[0, :, 0] = 100.0  # an outlier at both tokens of the window
    x[0, 1, 1] = 10.0  # large, but only next to the outlier at token 1
    raw = calibration_outlier_masks(x, 2, 1.0, False, "raw")
    inliers = calibration_outlier_masks(x, 2, 1.0, False, "inliers")
    assert raw[0, :, 0].all() and inliers[0, :, 0].all()
    assert not raw[0, 1, 1] and inliers[0, 1, 1]  # raw |x|: the 100 inflates θ; inliers: θ without it
    rev = calibration_outlier_masks(x.flip(1), 2, 1.0, True, "raw")
    assert torch.equal(rev, raw.flip(1))
    want = torch.zeros_like(raw)
    for t in range(2):  # θ per token on raw |x|, flags OR-accumulated inside the window
        a = x[0, t].abs()
        want[0, t] = (a > a.mean() + a.std()) | (want[0, t - 1] if t else False)
    assert torch.equal(raw, want)


@pytest.mark.parametrize(
    "recipe_args,match",
    [({"delta_outliers": "span"}, "delta_outliers"), ({"calibration_threshold": "all"}, "calibration_threshold"),
     ({"widen_to_zero": "never"}, "widen_to_zero"), ({"gen_patching": "tokens"}, "gen_patching"),
     ({"step_training": "lsq"}, "step_training"), ({"delta_before_softplus": "yes"}, "delta_before_softplus")],
    ids=["delta-outliers", "threshold", "widen", "patching", "training", "delta-point"],
)
def test_official_switches_are_validated(recipe_args, match):
    with pytest.raises(ValueError, match=match):
        ViMQuantizationConfig(recipe="ouromamba", weight_bits=4, act_bits=4, recipe_args=recipe_args)
