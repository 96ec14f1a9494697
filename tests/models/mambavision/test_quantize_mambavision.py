"""Every recipe quantizes the bundled MambaVision fixture through ``from_pretrained(..., quantization_config=...)``
and its family adapter alone: save -> reload bit-identically, ``dequantize()``, the official double delta bias kept,
kernels through the same dispatch, push with a card, the CLI. Calibration is cut to a few images and steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification

import optimum_vim  # noqa: F401 - registers the model types and the quantizer
from optimum_vim import ViMQuantizationConfig
from optimum_vim.cli import main
from optimum_vim.evaluation import iter_batches, load_named_dataset
from optimum_vim.models.family import family_of
from optimum_vim.models.mambavision import MambaVisionForImageClassification
from optimum_vim.modules import QConv1d, QLinear, QOutput, QSelectiveScan
from optimum_vim.modules.float import SelectiveScan, TokenConv1d
from optimum_vim.ops.dispatch import KernelBackend, use_kernels
from tests.support.helpers import forbid_real_data
from tests.support.hub_server import LoopbackHub

FIXTURE = Path(__file__).resolve().parents[3] / "checkpoints" / "mambavision-fashion-mnist"
MIXER_LINEARS = ("in_proj", "x_proj", "dt_proj", "out_proj")
TOKEN_LINEARS = MIXER_LINEARS + ("qkv", "proj", "fc1", "fc2")

# recipe -> (config keywords, quantized module types that must appear); few images / steps each
RECIPES = {
    "rtn": (dict(weight_bits=4, act_bits=8, recipe_args={"scan_act_bits": 8}), {QLinear, QSelectiveScan}),
    "ptq4vm": (dict(weight_bits=4, act_bits=8, recipe_args={"steps": 3, "candidates": 10}), {QLinear}),
    "kscale": (dict(weight_bits=8, act_bits=8, recipe_args={"search_candidates": 5, "search_images": 8}),
               {QLinear, QConv1d, QOutput, QSelectiveScan}),
    "ouromamba": (dict(weight_bits=4, act_bits=4, recipe_args={"epochs": 1}), {QLinear, QSelectiveScan}),
    "vimvq": (dict(weight_bits=2, recipe_args={"iterations": 4, "kmeans_iterations": 4}), {QLinear}),
}


@pytest.fixture(scope="module")
def images():
    """(calibration, evaluation) pixel tensors: 24 training and 200 test images of Fashion-MNIST."""
    processor = AutoImageProcessor.from_pretrained(FIXTURE)
    calib = torch.cat([b[0] for b in iter_batches(load_named_dataset("fashion-mnist", "train", 24), processor, 24)])
    test = torch.cat([b[0] for b in iter_batches(load_named_dataset("fashion-mnist", "test", 200), processor, 200)])
    return calib, test


@pytest.fixture(scope="module")
def float_model():
    return AutoModelForImageClassification.from_pretrained(FIXTURE).eval()


@pytest.fixture(scope="module")
def float_logits(float_model, images):
    with torch.no_grad():
        return float_model(images[1]).logits


def _quantize(recipe: str, calib: torch.Tensor, **extra):
    kwargs, _ = RECIPES[recipe]
    config = ViMQuantizationConfig(recipe=recipe, calibration_dataset=calib, num_calibration_samples=len(calib),
                                   **{**kwargs, **extra})
    return AutoModelForImageClassification.from_pretrained(FIXTURE, quantization_config=config).eval()


def test_adapter_names_the_stream_units_and_reproduces_the_stages():
    """The adapter's block chain is the model's own forward (bit for bit), also when a stage pads its map to whole
    windows (40 x 40 inputs: stage 3's 3 x 3 map in 2 x 2 windows)."""
    model = AutoModelForImageClassification.from_pretrained(FIXTURE).eval()
    family = family_of(model)
    names = [n for n, _ in family.blocks(model)]
    assert names == ["model.levels.0.blocks.0", "model.levels.0.downsample", "model.levels.1.blocks.0",
                     "model.levels.1.downsample", "model.levels.2.blocks.0", "model.levels.2.blocks.1",
                     "model.levels.2.downsample", "model.levels.3.blocks.0", "model.levels.3.blocks.1"]
    assert [m.name for m in family.mixers(model)] == ["model.levels.2.blocks.0.mixer", "model.levels.3.blocks.0.mixer"]
    scans = family.scans(model)
    assert [(s.name, s.reverse, s.block_index) for s in scans] == [
        ("model.levels.2.blocks.0.mixer.ssm", False, 4), ("model.levels.3.blocks.0.mixer.ssm", False, 7)]
    roles = {ref.role for ref in family.linears(model)}
    assert roles == set(TOKEN_LINEARS) | {"head"} and family.token_layout(model).class_token is None
    assert set(family.default_linear_roles) == set(TOKEN_LINEARS)
    for size in (28, 40):
        x = torch.randn(3, 1, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            state = family.embed(model, x)
            for _, block in family.blocks(model):
                state = family.run_block(block, state)
            _, last = model.model.stage_features(x)
        assert torch.equal(state[0], last), size
        assert family.block_output(state).shape == (3, last.shape[2] * last.shape[3], last.shape[1])


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_recipe_quantizes_saves_reloads_and_dequantizes(recipe, images, float_logits, tmp_path):
    calib, test = images
    model = _quantize(recipe, calib)
    kinds = {type(m) for m in model.modules()}
    assert RECIPES[recipe][1] <= kinds, kinds
    quantized = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, QLinear)}
    # the token blocks' linears by default (kscale: the mixers only); never the head, the convs or the stem
    assert quantized == (set(MIXER_LINEARS) if recipe == "kscale" else set(TOKEN_LINEARS)), quantized
    assert not any(isinstance(m, (QLinear, QConv1d)) for n, m in model.named_modules()
                   if n.startswith(("head", "model.patch_embed", "model.levels.0", "model.levels.1")))
    with torch.no_grad():
        logits = model(test).logits
    agreement = (logits.argmax(-1) == float_logits.argmax(-1)).float().mean().item()
    assert agreement >= 0.8, agreement  # 200 test images; few calibration images and steps
    # save -> reload: the same tensors and the same logits, bit for bit
    model.save_pretrained(tmp_path)
    again = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(again, MambaVisionForImageClassification)
    before, after = model.state_dict(), again.state_dict()
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert "model.head.weight" in load_file(tmp_path / "model.safetensors")  # the Hub repos' key layout
    with torch.no_grad():
        assert torch.equal(again(test).logits, logits)
    config = json.loads((tmp_path / "config.json").read_text())
    layers = config["quantization_config"]["layers"]
    convs = [v for v in layers.values() if v.get("type") == "conv1d"]
    assert all(c["padding"] == "same" and c["bias"] is False for c in convs)  # MambaVision's convs, stored as such
    assert "- mambavision" in (tmp_path / "README.md").read_text()  # the card's family tag
    # dequantize(): the float model, built from the modules the model was made of
    floated = again.dequantize()
    assert not any(isinstance(m, (QLinear, QConv1d, QOutput, QSelectiveScan)) for m in floated.modules())
    mixer = floated.model.levels[2].blocks[0].mixer
    assert isinstance(mixer.conv1d_x, TokenConv1d) and mixer.conv1d_x.token_padding == "same"
    assert mixer.conv1d_x.bias is None and isinstance(mixer.ssm, SelectiveScan)
    with torch.no_grad():
        back = floated(test).logits
    if recipe == "vimvq":  # weight-only: the float model computes what the quantized one did
        torch.testing.assert_close(back, logits, atol=1e-4, rtol=1e-4)
    else:
        assert (back.argmax(-1) == float_logits.argmax(-1)).float().mean() >= 0.8


@pytest.mark.parametrize("recipe", ["rtn", "kscale", "vimvq"])
def test_the_double_delta_bias_survives_quantization(recipe, images):
    """The official forward adds dt_proj's bias again before softplus; quantized (and ViM-VQ's trained) dt_proj
    biases enter twice too."""
    model = _quantize(recipe, images[0][:8])
    mixer = model.model.levels[2].blocks[0].mixer
    assert isinstance(mixer.dt_proj, QLinear) and mixer.dt_proj.bias is not None
    seen = {}
    mixer.dt_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("dt", out))
    mixer.softplus.register_forward_pre_hook(lambda m, a: seen.__setitem__("pre", a[0]))
    with torch.no_grad():
        model(images[1][:4])
    torch.testing.assert_close(seen["pre"], seen["dt"] + mixer.dt_proj.bias, atol=0, rtol=0)


def test_quantized_kernels_match_the_reference(images):
    """The quantized model runs the fused CPU kernels (int8 scan, packed int4 GEMM, conv) through the same dispatch
    as Vim; the PyTorch reference gives the same logits."""
    model = _quantize("kscale", images[0][:8])
    rtn = _quantize("rtn", images[0][:8])
    x = images[1][:16]
    for m in (model, rtn):
        with torch.no_grad():
            fused = m(x).logits
            with use_kernels(KernelBackend.REFERENCE):
                reference = m(x).logits
        torch.testing.assert_close(fused, reference, atol=2e-4, rtol=1e-4)


@pytest.mark.slow  # subprocesses: the push and a fresh client
def test_cli_quantize_and_push_with_card(tmp_path, capsys):
    out = tmp_path / "mv-w4a8"
    code = main(["quantize", str(FIXTURE), str(out), "--weight-bits", "4", "--act-bits", "8", "--num-samples", "16",
                 "--evaluate", "--eval-limit", "100", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["quantized_modules"] == 2 * (4 + 2) + 2 * 4  # 2 mixer blocks (4 linears + MLP), 2 attention blocks
    assert summary["quantized_top1"] >= 0.8 and summary["checkpoint_bytes"] < summary["float_checkpoint_bytes"]
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = AutoModelForImageClassification.from_pretrained(out)(x).logits
    torch.save(x, tmp_path / "x.pt")
    client = textwrap.dedent(f"""
        import json, torch
        import optimum_vim
        from transformers import AutoModelForImageClassification
        again = AutoModelForImageClassification.from_pretrained("org/mambavision-w4a8")
        with torch.no_grad():
            torch.save(again(torch.load({str(tmp_path / "x.pt")!r})).logits, {str(tmp_path / "hub.pt")!r})
        print(json.dumps({{"type": type(again.model.levels[2].blocks[0].mixer.in_proj).__name__}}))
    """)
    with LoopbackHub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_loopback", "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
        push = subprocess.run([sys.executable, "-m", "optimum_vim.cli", "push", str(out), "org/mambavision-w4a8",
                               "--base-model", "optimum-vim/mambavision-fashion-mnist"], env=env, capture_output=True, text=True, timeout=300)
        assert push.returncode == 0, push.stderr[-3000:]
        load = subprocess.run([sys.executable, "-c", client], env=env, capture_output=True, text=True, timeout=300)
        assert load.returncode == 0, load.stderr[-3000:]
        repo = hub.state.repos["org/mambavision-w4a8"]
        card = repo.files["README.md"].decode()
        assert "base_model_relation: quantized" in card and "- mambavision" in card
        assert json.loads(repo.files["config.json"])["model_type"] == "mambavision"
    assert json.loads(load.stdout.strip().splitlines()[-1])["type"] == "QLinear"
    assert torch.equal(torch.load(tmp_path / "hub.pt"), expected)


def test_targets_are_checked_against_the_model_family():
    """``targets`` may name the roles of any registered family in the config; the run refuses roles the model's own
    family does not have, before anything is applied."""
    vim = Path(__file__).resolve().parents[3] / "checkpoints" / "vim-fashion-mnist"
    with pytest.raises(ValueError, match=r"targets \['qkv'\] name no linear of this vim model; its linear roles: in_proj"):
        AutoModelForImageClassification.from_pretrained(
            vim, quantization_config=ViMQuantizationConfig(weight_bits=4, recipe_args={"targets": ["qkv", "in_proj"]}))
    with pytest.raises(ValueError, match=r"targets \['x_proj_b'\] name no linear of this mambavision model"):
        AutoModelForImageClassification.from_pretrained(
            FIXTURE, quantization_config=ViMQuantizationConfig(weight_bits=4, recipe_args={"targets": ["x_proj_b"]}))
    model = AutoModelForImageClassification.from_pretrained(
        FIXTURE, quantization_config=ViMQuantizationConfig(weight_bits=4, recipe_args={"targets": ["fc1", "fc2"]}))
    assert {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, QLinear)} == {"fc1", "fc2"}


def test_ouromamba_is_data_free_on_mambavision(images, float_logits, monkeypatch):
    """OuroMamba without a calibration dataset generates its images on MambaVision (the pooled output's implicit
    attention: no class token), touches no real data, and the same seed gives the same quantized model."""
    forbid_real_data(monkeypatch)
    config = ViMQuantizationConfig(recipe="ouromamba", weight_bits=4, act_bits=4, seed=5,
                                   recipe_args={"num_synthetic": 8, "gen_iterations": 6, "epochs": 1})
    model = AutoModelForImageClassification.from_pretrained(FIXTURE, quantization_config=config).eval()
    assert model.config.quantization_config.calibration_source.startswith("calibrated on 8 synthetic images")
    assert sum(isinstance(m, QSelectiveScan) for m in model.modules()) == 2
    again = AutoModelForImageClassification.from_pretrained(FIXTURE, quantization_config=config).eval()
    before, after = model.state_dict(), again.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        logits = model(images[1]).logits
    assert (logits.argmax(-1) == float_logits.argmax(-1)).float().mean() >= 0.8
