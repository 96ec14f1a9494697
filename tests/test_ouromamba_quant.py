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
    import optimum_vim.calibration as calibration
    import optimum_vim.data.loaders as loaders
    import optimum_vim.evaluation as evaluation
    import optimum_vim.quantizer as quantizer

    def unreachable(*a, **k):
        raise AssertionError("a real data source was touched by the data-free recipe")

    for mod, name in ((quantizer, "prepare_calibration_batches"), (calibration, "prepare_calibration_batches"),
                      (evaluation, "load_named_dataset")):
        monkeypatch.setattr(mod, name, unreachable)
    for name in dir(loaders):
        if name.startswith("load_"):
            monkeypatch.setattr(loaders, name, unreachable)
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
        assert layer.spec["weight"] == {"format": "int", "bits": 4, "group_size": None}
        iq = layer.spec["input"]
        assert iq["granularity"] == "dynamic_outlier" and iq["bits"] == 4 and iq["outlier_bits"] == 8
        assert iq["refresh"] == 10 and iq["outlier_sigma"] == 3.0 and iq["reverse"] == name.endswith("_b")
    fwd, bwd = mixer.ssm, mixer.ssm_b
    for scan, reverse in ((fwd, False), (bwd, True)):
        for name in ("u", "delta", "B", "C"):
            q = getattr(scan, f"{name}_quantizer")
            assert isinstance(q, QActivation) and q.spec["reverse"] is reverse
            assert q.symmetric is (name != "delta") and q.spec["outlier_sigma"] == (4.0 if name == "delta" else 3.0)
    # each direction has its own quantizers (the official code shares one set per block)
    assert fwd.u_quantizer is not bwd.u_quantizer
    assert not torch.equal(fwd.u_quantizer.scale, bwd.u_quantizer.scale)


def test_w4a4_data_free_stays_accurate(float_model, w4a4, subset, fixture_dir):
    proc = AutoImageProcessor.from_pretrained(fixture_dir)
    fp = evaluate(float_model, subset, proc, batch_size=200, progress=False).top1
    q = evaluate(w4a4, subset, proc, batch_size=200, progress=False).top1
    assert q >= 0.95 * fp, (q, fp)


def test_calibrate_leaves_the_model_alone_and_is_seeded(float_model):
    before = {k: v.clone() for k, v in float_model.state_dict().items()}
    cls = optimum_vim.recipes.get_recipe_class("ouromamba")
    cfg = _config(num_synthetic=4, gen_iterations=2, epochs=1)
    a = cls(cfg).calibrate(float_model, None)
    b = cls(cfg).calibrate(float_model, None)
    assert all(torch.equal(before[k], v) for k, v in float_model.state_dict().items())
    assert a.layers.keys() == b.layers.keys() and len(a.layers) == 6 * 8  # 6 linears + 2 scans per block
    for name in a.layers:
        for t in a.layers[name].tensors:
            assert torch.equal(a.layers[name].tensors[t], b.layers[name].tensors[t]), (name, t)


def test_scan_steps_learn_unless_turned_off(float_model):
    cls = optimum_vim.recipes.get_recipe_class("ouromamba")
    fast = dict(num_synthetic=4, gen_iterations=2)
    init = cls(_config(**fast, epochs=0)).calibrate(float_model, None)
    frozen = cls(_config(**fast, epochs=2, train_scan_steps=False)).calibrate(float_model, None)
    learned = cls(_config(**fast, epochs=2)).calibrate(float_model, None)
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
    init8 = cls(_config(8, **fast, epochs=0)).calibrate(float_model, None)
    default8 = cls(_config(8, **fast, epochs=2)).calibrate(float_model, None)
    forced8 = cls(_config(8, **fast, epochs=2, train_scan_steps=True)).calibrate(float_model, None)
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
    cls(_config(num_synthetic=2, gen_iterations=2, epochs=0, gen_jitter=1, gen_flip=True,
                gen_tv_weight=0.5)).calibrate(float_model, None)
    assert {k: seen[0][k] for k in ("jitter", "flip", "tv_weight")} == {"jitter": 1, "flip": True, "tv_weight": 0.5}


def test_real_data_ablation_uses_the_given_images(fixture_dir):
    train = load_named_dataset("fashion-mnist", "train", limit=16)
    cfg = ViMQuantizationConfig(recipe="ouromamba", weight_bits=4, act_bits=8, calibration_dataset=train,
                                num_calibration_samples=16, recipe_args={"epochs": 1})
    assert optimum_vim.recipes.get_recipe_class("ouromamba").requires_data(cfg)
    model = AutoModelForImageClassification.from_pretrained(fixture_dir, quantization_config=cfg)
    qc = model.config.quantization_config
    assert not qc.calibration_source.startswith("calibrated on")  # the real data set is named instead
    assert model.vim.layers[0].mixer.in_proj.spec["input"]["outlier_bits"] == 16  # W4A8O16


def test_static_outlier_ablation_stores_its_list(fixture_dir):
    cfg = _config(num_synthetic=4, gen_iterations=2, epochs=0, dynamic_outliers=False)
    model = AutoModelForImageClassification.from_pretrained(fixture_dir, quantization_config=cfg)
    iq = model.vim.layers[0].mixer.in_proj.input_quantizer
    assert iq.spec["static_outliers"] and iq.outlier_channels.shape == (128,)


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
        (dict(weight_bits=4, act_bits=4, recipe_args={"loss": "l1"}), "loss must be one of"),
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
    from optimum_vim.modules import build_qmodule, load_qmodule_tensors
    from optimum_vim.recipes.ouromamba.quantize import LearnedOutlierActQuantizer

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
    q = build_qmodule({"type": "activation", **spec})
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
    from optimum_vim.recipes.ouromamba.quantize import OuroMambaRecipe

    target = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(0))
    out = 0.7 * target + 0.1 * torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(1))
    default = OuroMambaRecipe(ViMQuantizationConfig(recipe="ouromamba", weight_bits=4, act_bits=4))
    nmse = OuroMambaRecipe(ViMQuantizationConfig(recipe="ouromamba", weight_bits=4, act_bits=4,
                                                 recipe_args={"loss": "nmse"}))
    assert default.args.loss == "cosine"
    assert torch.equal(default.block_loss(None, out, target), cosine_block_loss(out, target))
    assert torch.equal(nmse.block_loss(None, out, target), nmse_block_loss(out, target))
    assert nmse_block_loss(out, target) > cosine_block_loss(out, target)  # the 30 % norm deficit is seen
