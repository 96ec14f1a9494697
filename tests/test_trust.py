"""Trust at the edges (issue 7): no silent garbage on load, typed options, NaN in -> NaN out, loading options,
cards and Hub arguments, reproducible files, CLI error paths."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageClassification

import optimum_vim  # noqa: F401
from optimum_vim.modules import QLinear
from optimum_vim.quantization_config import ViMQuantizationConfig
from optimum_vim.serialization import CheckpointFormatError


def _calib(n=16, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _load_q(path, **kw):
    kw.setdefault("calibration_dataset", _calib())
    return AutoModelForImageClassification.from_pretrained(path, quantization_config=ViMQuantizationConfig(**kw))


def _edit_config(folder, fn):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


@pytest.fixture
def saved_w4a8(tiny_vim_dir, tmp_path):
    q = _load_q(tiny_vim_dir, weight_bits=4, act_bits=8)
    q.save_pretrained(tmp_path / "q")
    return tmp_path / "q"


# ------------------------------------------------------------------------------------ 1. never load as garbage
@pytest.mark.parametrize("edit,match", [
    (lambda c: c.pop("quantization_config"), "has no quantization_config"),
    (lambda c: c["quantization_config"].update(quant_method="not-a-method"), "quant_method='not-a-method'"),
], ids=["config-removed", "method-replaced"])
def test_quantized_folder_without_its_config_is_refused(saved_w4a8, edit, match):
    _edit_config(saved_w4a8, edit)
    with pytest.raises(CheckpointFormatError, match=f"quantized optimum-vim checkpoint \\(optimum-vim storage format v1, "
                                                    f"recipe rtn\\).*{match}.*restore config.json"):
        AutoModelForImageClassification.from_pretrained(saved_w4a8)
    with pytest.raises(CheckpointFormatError, match="quantized optimum-vim checkpoint"):
        AutoModel.from_pretrained(saved_w4a8)


def test_unstamped_shard_of_quantized_buffers_is_refused(saved_w4a8):
    path = saved_w4a8 / "model.safetensors"
    save_file(load_file(path), path, metadata={"format": "pt"})
    _edit_config(saved_w4a8, lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointFormatError, match="no format stamp, but .* quantized buffers"):
        AutoModelForImageClassification.from_pretrained(saved_w4a8)


def test_float_checkpoint_still_loads(tiny_vim_dir):
    model = AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    assert not any(isinstance(m, QLinear) for m in model.modules())


@pytest.mark.parametrize("edit,match", [
    (lambda q: q.update(weight_bits=2), "4-bit weights, the config says weight_bits=2"),
    (lambda q: q.update(act_bits=None), "quantizes its input to 8 bits, the config says act_bits=None"),
    (lambda q: q.update(act_bits=4), "no module quantizes activations to act_bits=4"),
], ids=["weight-bits", "act-bits-none", "act-bits-4"])
def test_edited_top_level_bits_are_refused(saved_w4a8, edit, match):
    _edit_config(saved_w4a8, lambda c: edit(c["quantization_config"]))
    with pytest.raises(ValueError, match=f"contradicts its own per-layer specs.*{match}"):
        AutoModelForImageClassification.from_pretrained(saved_w4a8)


def test_recipe_stamp_must_match_config(saved_w4a8):
    path = saved_w4a8 / "model.safetensors"
    save_file(load_file(path), path, metadata={"format": "pt", "optimum_vim_format_version": "1",
                                               "optimum_vim_recipe": "kscale"})
    with pytest.raises(CheckpointFormatError, match="quantized with recipe 'kscale' but its config.json says recipe='rtn'"):
        AutoModelForImageClassification.from_pretrained(saved_w4a8)


# ------------------------------------------------------------------------------------ 3. NaN in -> NaN out
def _nan_image(one_pixel=False):
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    if one_pixel:
        x[0, 0, 13, 6] = float("nan")  # sample 1 stays finite
    else:
        x[0] = float("nan")
    return x


@pytest.mark.parametrize("kw", [
    dict(weight_bits=4, act_bits=8),
    dict(weight_bits=4, act_bits=4),
    dict(weight_bits=8, act_bits=8, recipe_args={"scan_act_bits": 8}),
    dict(weight_bits=8, act_bits=8, recipe_args={"act_granularity": "token", "act_symmetric": True}),
    dict(weight_bits=4, act_bits=None),
], ids=["w4a8", "w4a4", "w8a8-scan8", "w8a8-token", "w4"])
@pytest.mark.parametrize("one_pixel", [False, True], ids=["all-nan", "one-pixel"])
def test_nan_image_gives_nan_logits(tiny_vim_dir, kw, one_pixel):
    fp = AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    q = _load_q(tiny_vim_dir, **kw)
    x = _nan_image(one_pixel)
    with torch.no_grad():
        ref, out = fp(x).logits, q(x).logits
    assert torch.isnan(ref[0]).all() and torch.isfinite(ref[1]).all()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), out


def _nan_at(shape, positions, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    for pos in positions:
        x[pos] = float("nan")
    return x


@pytest.mark.parametrize("act", [
    {"bits": 8, "granularity": "tensor", "symmetric": False},        # int8 codes -> integer GEMM
    {"bits": 8, "granularity": "token", "length": 6, "symmetric": True},
    {"bits": 8, "granularity": "dynamic_token"},
    {"bits": 4, "granularity": "channel", "channels": 16},           # fake-quantized float path
], ids=["tensor-affine", "token", "dynamic", "channel-fake"])
def test_qlinear_nan_rows_match_float(act):
    from optimum_vim.modules import build_qmodule

    spec = {"type": "linear", "in_features": 16, "out_features": 8, "bias": True,
            "weight": {"format": "int", "bits": 4, "group_size": None}, "input": act}
    layer = build_qmodule(spec)
    with torch.no_grad():
        layer.qweight.random_(0, 255)
        layer.weight_scale.fill_(0.1)
        layer.input_quantizer.scale.fill_(0.05) if hasattr(layer.input_quantizer, "scale") else None
    x = _nan_at((2, 6, 16), [(0, 1, 3), (1, 5, 0)])
    float_out = x @ layer.dequantized_weight().T + layer.bias
    out = layer(x)
    assert torch.equal(torch.isnan(out), torch.isnan(float_out))
    assert torch.isnan(out).sum() == 2 * 8


def test_fused_combine_propagates_nan(tiny_vim_dir):
    q = _load_q(tiny_vim_dir, weight_bits=8, act_bits=8)
    out_proj = q.vim.layers[0].mixer.out_proj
    assert out_proj.can_fuse_combine()
    yf, yb, z = (torch.randn(2, 50, out_proj.in_features) for _ in range(3))
    yf[0, 3, 1], yb[1, 7, 0], z[1, 9, 5] = float("nan"), float("nan"), float("nan")
    fused = out_proj(yf, combine=(yb, z, True))
    unfused = out_proj((yf + yb) / 2 * torch.nn.functional.silu(z))
    expected = torch.zeros(2, 50, dtype=torch.bool)
    expected[0, 3] = expected[1, 7] = expected[1, 9] = True
    assert torch.equal(torch.isnan(fused).all(-1), expected) and torch.equal(torch.isnan(fused), torch.isnan(unfused))


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("gran", ["tensor", "channel"], ids=["int8-codes", "fake-quant"])
def test_qscan_nan_positions_match_float_scan(reverse, gran):
    from optimum_vim.modules import build_qmodule
    from optimum_vim.ops import selective_scan

    b, length, e, n = 2, 7, 5, 4
    def act(sym, channels):
        return {"bits": 8, "granularity": gran, "symmetric": sym, "channels": channels}

    scan = build_qmodule({"type": "scan", "reverse": reverse, "length": length, "channels": e, "d_state": n,
                          "u": act(True, e), "delta": act(False, e), "B": act(True, n), "C": act(True, n)})
    for name in ("u", "delta", "B", "C"):
        getattr(scan, f"{name}_quantizer").scale.fill_(0.05)
    g = torch.Generator().manual_seed(1)
    u = _nan_at((b, length, e), [(0, 2, 1)], 1)
    delta = torch.rand(b, length, e, generator=g) * 0.5
    delta[1, 4, 3] = float("nan")
    B = _nan_at((b, length, n), [(1, 1, 2)], 2)
    C = _nan_at((b, length, n), [(0, 5, 0)], 3)
    A = -torch.rand(e, n, generator=g) - 0.5
    D = torch.ones(e)
    ref = selective_scan(u, delta, A, B, C, D, reverse=reverse, backend="torch")
    out = scan(u, delta, A, B, C, D)
    assert (scan.u_quantizer.static_codes(u) is None) == (gran == "channel")
    assert torch.isnan(ref).any() and not torch.isnan(ref).all()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


# ------------------------------------------------------------------------------------ 2. typed, validated options
@pytest.mark.parametrize("kwargs,match", [
    ({"recipe_args": {"act_symmetric": "no"}}, "'act_symmetric' must be a bool .*got 'no' \\(str\\)"),
    ({"recipe_args": {"targets": "in_proj"}}, "'targets' must be a tuple of strings.*got 'in_proj'"),
    ({"recipe_args": {"percentile": "99"}}, "'percentile' must be a number; got '99'"),
    ({"recipe_args": {"scan_act_bits": 8.0}}, "'scan_act_bits' must be one of \\(8,\\) or None; got 8.0"),
    ({"weight_bits": True}, "'weight_bits' must be an int; got True \\(bool\\)"),
    ({"weight_bits": 4.0}, "'weight_bits' must be an int; got 4.0"),
    ({"num_calibration_samples": True}, "'num_calibration_samples' must be an int( or None)?; got True"),
    ({"format_version": "1"}, "'format_version' must be an int; got '1'"),
    ({"dequantize": "yes"}, "'dequantize' must be a bool"),
    ({"modules_to_not_convert": "head"}, "'modules_to_not_convert' must be a list of strings"),
    ({"overrides": {"*.x_proj*": {"weight_bits": "8"}}}, "override '\\*.x_proj\\*': option 'weight_bits' must be an int"),
    ({"overrides": {"*": {"skip": 1}}}, "'skip' must be a bool"),
], ids=["bool-str", "tuple-str", "float-str", "int-float", "int-bool", "int-float-top", "samples-bool", "format-str",
        "dequantize-str", "skip-str", "override-str", "override-skip"])
def test_options_are_checked_against_their_types(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViMQuantizationConfig(**kwargs)


def test_typed_values_are_accepted_and_normalised():
    cfg = ViMQuantizationConfig(weight_bits=4, act_bits=8, recipe_args={"targets": ["in_proj"], "percentile": 99},
                                modules_to_not_convert=("head",))
    from optimum_vim.recipes import RTNRecipe

    args = RTNRecipe.build_args(cfg.recipe_args)
    assert args.targets == ("in_proj",) and args.percentile == 99.0 and isinstance(args.percentile, float)
    assert cfg.modules_to_not_convert == ["head"]


def test_command_line_strings_parse_by_declared_type():
    from optimum_vim.recipes import RTNRecipe

    parsed = RTNRecipe.parse_recipe_args({"act_symmetric": "true", "targets": "in_proj, out_proj", "percentile": "99",
                                          "scan_act_bits": "none", "observer": '"percentile"'})
    assert parsed == {"act_symmetric": True, "targets": ("in_proj", "out_proj"), "percentile": 99.0,
                      "scan_act_bits": None, "observer": "percentile"}
    assert RTNRecipe.parse_recipe_args({"act_symmetric": "no", "scan_act_bits": "8"}) == {"act_symmetric": False,
                                                                                          "scan_act_bits": 8}
    with pytest.raises(ValueError, match="'act_symmetric' must be a bool.*'maybe' \\(from the command line\\)"):
        RTNRecipe.parse_recipe_args({"act_symmetric": "maybe"})
    with pytest.raises(ValueError, match="'percentile' must be a number"):
        RTNRecipe.parse_recipe_args({"percentile": "high"})


def test_any_recipe_args_get_the_same_checks():
    """The mechanism reads the field annotations of whatever Args dataclass a recipe declares."""
    from dataclasses import dataclass

    from optimum_vim.recipes import Recipe

    @dataclass
    class Args:
        mode: Literal["fast", "exact"] = "fast"
        steps: int = 10
        lr: float = 1e-3
        clusters: int | None = None
        layers: tuple[str, ...] = ("in_proj",)
        learn: bool = True

    class Demo(Recipe):
        name = "demo"

    Demo.Args = Args
    args = Demo.build_args({"mode": "exact", "steps": "20", "lr": "0.5", "clusters": "none", "layers": "a,b",
                            "learn": "off"}, strings=True)
    assert args == Args("exact", 20, 0.5, None, ("a", "b"), False)
    for bad, match in [({"mode": "slow"}, "one of \\('fast', 'exact'\\)"), ({"steps": 2.5}, "'steps' must be an int"),
                       ({"learn": 1}, "'learn' must be a bool"), ({"clusters": "4"}, "'clusters' must be an int or None")]:
        with pytest.raises(ValueError, match=match):
            Demo.build_args(bad)


def test_every_registered_recipe_declares_checkable_types():
    from optimum_vim.options import field_types, supported
    from optimum_vim.recipes import RECIPES, get_recipe_class

    for name in RECIPES:
        cls = get_recipe_class(name)
        for field, tp in field_types(cls.Args).items():
            assert supported(tp), f"recipe {name}: option {field} has an annotation the option checker does not know: {tp}"


def test_cli_override_and_recipe_arg_errors(tiny_vim_dir, tmp_path, capsys):
    from optimum_vim.cli import main

    assert main(["quantize", tiny_vim_dir, str(tmp_path / "o"), "--override", "x=weight_bits:eight"]) == 2
    err = capsys.readouterr().err
    assert "weight_bits' must be an int; got 'eight' (from the command line)" in err and "Traceback" not in err
    assert main(["quantize", tiny_vim_dir, str(tmp_path / "o"), "--override", "x=bits:8"]) == 2
    assert "KEY one of" in capsys.readouterr().err
    assert main(["quantize", tiny_vim_dir, str(tmp_path / "o"), "--recipe-arg", "percentile=high"]) == 2
    assert "'percentile' must be a number" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_recipe_args_reach_config_typed(tiny_vim_dir, tmp_path):
    from optimum_vim.cli import main

    out = tmp_path / "o"
    assert main(["quantize", tiny_vim_dir, str(out), "--act-bits", "8", "--num-samples", "16",
                 "--recipe-arg", "act_symmetric=no", "--recipe-arg", "targets=in_proj,out_proj",
                 "--override", "*.out_proj=act_bits:none", "--base-model", "org/vim-float"]) == 0
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["recipe_args"] == {"act_symmetric": False, "targets": ["in_proj", "out_proj"]}
    assert saved["base_model"] == "org/vim-float" and "base_model: org/vim-float" in (out / "README.md").read_text()
    assert saved["overrides"] == {"*.out_proj": {"act_bits": None}}
    model = AutoModelForImageClassification.from_pretrained(out)
    assert sum(isinstance(m, QLinear) for m in model.modules()) == 4
    assert model.vim.layers[0].mixer.in_proj.input_quantizer.symmetric is False


# ------------------------------------------------------------------------------------ 4. loading options
def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_dequantize_passed_to_from_pretrained_is_honoured(saved_w4a8):
    q = AutoModelForImageClassification.from_pretrained(saved_w4a8)
    model = AutoModelForImageClassification.from_pretrained(
        saved_w4a8, quantization_config=ViMQuantizationConfig(dequantize=True))
    assert not any(isinstance(m, QLinear) for m in model.modules())
    x = _calib(2, 9)
    assert torch.equal(_logits(model, x), _logits(q.dequantize(), x))


def test_backbone_and_classifier_checkpoints_reload_as_each_other(saved_w4a8, tmp_path):
    q = AutoModelForImageClassification.from_pretrained(saved_w4a8)
    x = _calib(2, 4)
    with torch.no_grad():
        expected = q.vim(x).last_hidden_state
    backbone = AutoModel.from_pretrained(saved_w4a8)
    assert sorted(backbone.config.quantization_config.layers)[0].startswith("layers.")
    backbone.save_pretrained(tmp_path / "backbone")
    q.vim.save_pretrained(tmp_path / "sub")  # the classifier's own backbone, sharing the classifier's config
    for folder in ("backbone", "sub"):
        again = AutoModelForImageClassification.from_pretrained(tmp_path / folder)
        assert isinstance(again.vim.layers[0].mixer.in_proj, QLinear)
        with torch.no_grad():
            assert torch.equal(again.vim(x).last_hidden_state, expected)
        assert torch.equal(AutoModel.from_pretrained(tmp_path / folder)(x).last_hidden_state, expected)
    assert sorted(q.config.quantization_config.layers)[0].startswith("vim.")  # the classifier's config is untouched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_casts_keep_quantized_buffers_like_from_pretrained_dtype(saved_w4a8, dtype):
    loaded = AutoModelForImageClassification.from_pretrained(saved_w4a8, dtype=dtype)
    q = AutoModelForImageClassification.from_pretrained(saved_w4a8).to(dtype)
    in_proj = q.vim.layers[0].mixer.in_proj
    assert in_proj.weight_scale.dtype == torch.float32 and in_proj.input_quantizer.scale.dtype == torch.float32
    assert q.vim.layers[0].mixer.D.dtype == dtype  # the float parts do cast
    assert {k: v.dtype for k, v in q.state_dict().items()} == {k: v.dtype for k, v in loaded.state_dict().items()}
    x = _calib(2, 5).to(dtype)
    out = _logits(q, x)
    assert out.dtype == dtype and torch.equal(out, _logits(loaded, x))


# ------------------------------------------------------------------------------------ 5. hub and cards
def _front_matter(text):
    import yaml

    return yaml.safe_load(text.split("---\n")[1])


def test_card_base_model_does_not_depend_on_cwd(tiny_vim_dir, tmp_path, monkeypatch):
    import os

    from optimum_vim.hub import render_model_card

    root = os.path.dirname(os.path.dirname(tiny_vim_dir))
    relative = os.path.relpath(tiny_vim_dir, root)  # "pytest-N/tiny_vimM": shaped like a Hub id
    monkeypatch.chdir(root)
    q = _load_q(relative, weight_bits=4)
    here = str(render_model_card(q, repo_id="org/q"))
    monkeypatch.chdir(tmp_path)
    elsewhere = str(render_model_card(q, repo_id="org/q"))
    assert here == elsewhere
    assert "base_model" not in _front_matter(here) and "](#)" not in here and "huggingface.co/pytest" not in here


def test_base_model_through_the_config_survives_reload(tiny_vim_dir, tmp_path):
    q = _load_q(tiny_vim_dir, weight_bits=4, base_model="org/vim-float")
    q.save_pretrained(tmp_path / "q")
    text = (tmp_path / "q" / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["base_model"] == "org/vim-float" and meta["base_model_relation"] == "quantized"
    assert "[org/vim-float](https://huggingface.co/org/vim-float)" in text
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "q")
    assert again.config.quantization_config.base_model == "org/vim-float"


def test_push_to_hub_keeps_transformers_signature(saved_w4a8):
    import inspect

    from transformers import PreTrainedModel

    model = AutoModelForImageClassification.from_pretrained(saved_w4a8)
    ours = inspect.signature(type(model).push_to_hub).parameters
    theirs = inspect.signature(PreTrainedModel.push_to_hub).parameters
    assert all(name in ours and ours[name].default == p.default for name, p in theirs.items())
    with pytest.raises(TypeError):
        model.push_to_hub("org/x", commit_mesage="typo")  # never silently dropped


def test_push_arguments_reach_the_hub(saved_w4a8, tmp_path):
    import os
    import subprocess
    import sys
    import textwrap

    from tests.hub_server import LoopbackHub

    client = textwrap.dedent(f"""
        import optimum_vim
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained({str(saved_w4a8)!r})
        model.save_pretrained({str(tmp_path / "out")!r}, push_to_hub=True, repo_id="org/saved", private=True,
                              commit_message="save and push", commit_description="from save_pretrained")
        model.push_to_hub("org/pushed", commit_message="push", commit_description="from push_to_hub",
                          revision="main", tags=["my-tag"])
    """)
    with LoopbackHub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_loopback", "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
        proc = subprocess.run([sys.executable, "-c", client], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        saved, pushed = hub.state.repos["org/saved"], hub.state.repos["org/pushed"]
    assert saved.private is True
    assert saved.commits[-1]["summary"] == "save and push" and saved.commits[-1]["description"] == "from save_pretrained"
    assert pushed.commits[-1]["summary"] == "push" and pushed.commits[-1]["description"] == "from push_to_hub"
    assert pushed.commits[-1]["revision"] == "main" and "my-tag" in pushed.files["README.md"].decode()


def test_model_file_does_not_import_the_hub_package():
    import ast
    import inspect

    from optimum_vim.models.vim import modeling_vim

    tree = ast.parse(inspect.getsource(modeling_vim))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.split(".")[-1] == "hub" or m.startswith("hub")], imported
    # loading / saving / pushing live in the integration layer every family shares (optimum_vim.pretrained)
    defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert not defined & {"from_pretrained", "save_pretrained", "push_to_hub", "_load_pretrained_model"}, defined
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Global)]  # no mutable module state (card writers)


# ------------------------------------------------------------------------------------ 6. reproducible files
def test_same_model_saves_to_identical_bytes(saved_w4a8, tmp_path):
    import hashlib

    model = AutoModelForImageClassification.from_pretrained(saved_w4a8)
    digests = []
    for i in range(4):
        folder = tmp_path / str(i) / "same-name"
        model.save_pretrained(folder)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())})
    assert all(d == digests[0] for d in digests), digests
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "0" / "same-name")
    assert torch.equal(_logits(reloaded, _calib(2)), _logits(model, _calib(2)))


# ------------------------------------------------------------------------------------ 7. CLI error paths
def test_cli_nonexistent_model_is_a_clean_error(tmp_path, capsys):
    from optimum_vim.cli import main

    for argv in (["evaluate", str(tmp_path / "nope")], ["quantize", str(tmp_path / "nope"), str(tmp_path / "out")],
                 ["push", str(tmp_path / "nope"), "org/x"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"optimum-vim {argv[0]}: error:" in err and "nope" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_push_without_network_is_a_clean_error(saved_w4a8, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": "hf_x", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}
    proc = subprocess.run([sys.executable, "-m", "optimum_vim.cli", "push", str(saved_w4a8), "org/x"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "could not reach the Hub" in proc.stderr and "Traceback" not in proc.stderr


def test_card_without_matplotlib_keeps_the_table(saved_w4a8, tmp_path, monkeypatch, caplog):
    import sys

    from optimum_vim.hub import set_card_info, write_model_card

    model = AutoModelForImageClassification.from_pretrained(saved_w4a8)
    set_card_info(model, benchmark_table=[{"recipe": "rtn", "weight_bits": 4, "act_bits": 8, "top1": 0.5}])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a base install
    text = write_model_card(model, tmp_path).read_text()
    assert "| rtn | 4 | 8 | 50.00% |" in text and "accuracy_vs_bits.png" not in text
    assert not (tmp_path / "accuracy_vs_bits.png").exists()
    assert "pip install 'optimum-vim[plot]'" in caplog.text


class Gadget:  # a class outside the converter's allow-list
    pass


def test_convert_refusal_never_invites_unsafe_retry(tmp_path, capsys):
    from optimum_vim.cli import main

    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(1)}, "args": Gadget()}, tmp_path / "bad.pth")
    assert main(["convert", str(tmp_path / "bad.pth"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "weights-only checkpoint" in err and "Unsupported global" in err
    assert "weights_only=False" not in err and "likely succeed" not in err and "arbitrary code" in err


def test_optimum_cli_vim_help_lists_subcommands(capsys):
    import argparse

    from optimum.commands.optimum_cli import RootOptimumCLICommand, register_optimum_cli_subcommand

    from optimum.commands.register.vim import SUBCOMMANDS, VimCommand
    from optimum_vim.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert [name for name, _ in SUBCOMMANDS] == list(sub.choices)  # the plugin's list is the CLI's
    root = RootOptimumCLICommand("Optimum CLI tool", usage="optimum-cli")
    register_optimum_cli_subcommand(VimCommand, parent_command=root)
    with pytest.raises(SystemExit) as exit_info:
        root.parser.parse_args(["vim", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and all(f"  {name} " in out for name in sub.choices), out
    args = root.parser.parse_args(["vim", "quantize", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        args.func(args).run()
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: optimum-cli vim quantize") and "--recipe-arg" in out


# ------------------------------------------------------------------------------------ 8. num_parameters
def test_num_parameters_counts_quantized_layers_like_transformers(tiny_vim_dir, saved_w4a8):
    fp = AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    q = AutoModelForImageClassification.from_pretrained(saved_w4a8)
    assert q.num_parameters() == fp.num_parameters()  # each quantized layer counts the weights it stands for
    quantized = sum(m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
                    for m in q.modules() if isinstance(m, QLinear))
    assert quantized > 0 and q.num_parameters(only_trainable=True) == fp.num_parameters() - quantized  # frozen


# ------------------------------------------------------------------------------------ 9. cleanups
def test_dead_code_is_gone():
    from optimum_vim import primitives
    from optimum_vim.modules import QSelectiveScan
    from optimum_vim.primitives import quant

    assert not hasattr(quant, "lp_error") and not hasattr(primitives, "lp_error")
    assert not hasattr(QSelectiveScan, "_q")
    import optimum_vim.quantizer as quantizer

    assert not hasattr(quantizer, "_exists")  # one submodule test (recipes.base._has_submodule)


def test_no_source_comment_points_outside_the_repository():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = [str(p.relative_to(root)) for sub in ("optimum_vim", "kernels", "optimum") for p in (root / sub).rglob("*.py")
                 if "../shared" in p.read_text() or "/work/" in p.read_text()]
    assert not offenders


def test_calibration_and_evaluation_read_the_same_image_columns(tiny_vim_dir):
    import datasets

    from optimum_vim.calibration import data as calib_data
    from optimum_vim.evaluation import _image_and_label_columns

    ds = datasets.Dataset.from_dict({"img": [[0]], "label": [0]})
    assert _image_and_label_columns(ds)[0] == calib_data._image_column(ds.column_names) == "img"
    for name in calib_data.IMAGE_COLUMNS:
        assert _image_and_label_columns(datasets.Dataset.from_dict({name: [[0]], "label": [0]}))[0] == name
    bad = datasets.Dataset.from_dict({"picture": [[0]], "label": [0]})
    with pytest.raises(ValueError):
        _image_and_label_columns(bad)
    with pytest.raises(ValueError, match="image / img / pixel_values"):
        calib_data._image_column(bad.column_names)


def test_minmax_observers_keep_no_samples(tiny_vim_dir, monkeypatch):
    from optimum_vim.calibration import observers

    model = AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    names = ["vim.layers.0.mixer.in_proj"]
    lean = observers.collect_activation_stats(model, [_calib(8)], names, keep_samples=False)
    full = observers.collect_activation_stats(model, [_calib(8)], names)
    assert not lean[names[0]]._samples and full[names[0]]._samples
    assert torch.equal(lean[names[0]].min, full[names[0]].min) and torch.equal(lean[names[0]].token_max, full[names[0]].token_max)
    with pytest.raises(ValueError, match="keep_samples"):
        lean[names[0]].percentile_range(99.0)
    kept = []
    real = observers.ActivationStats.update

    def spy(self, x):
        real(self, x)
        kept.append(len(self._samples))

    monkeypatch.setattr(observers.ActivationStats, "update", spy)
    _load_q(tiny_vim_dir, weight_bits=8, act_bits=8)  # RTN min-max
    assert kept and max(kept) == 0
    kept.clear()
    _load_q(tiny_vim_dir, weight_bits=8, act_bits=8, recipe_args={"observer": "percentile"})
    assert max(kept) > 0


def test_cli_quantize_saves_once(tiny_vim_dir, tmp_path, monkeypatch):
    from optimum_vim import VimPreTrainedModel
    from optimum_vim.cli import main

    calls = []
    real = VimPreTrainedModel.save_pretrained

    def counting(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("save_directory"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(VimPreTrainedModel, "save_pretrained", counting)
    out = tmp_path / "q"
    assert main(["quantize", tiny_vim_dir, str(out), "--weight-bits", "4", "--json"]) == 0
    assert len(calls) == 1
    card = (out / "README.md").read_text()
    size = (out / "model.safetensors").stat().st_size
    assert f"| quantized (this) | {size:,} |" in card and "| float32 original |" in card


def test_conv_and_output_quantizers_propagate_nan():
    from optimum_vim.modules import build_qmodule

    act = {"bits": 8, "granularity": "tensor", "symmetric": True}
    conv = build_qmodule({"type": "conv1d", "channels": 4, "kernel_size": 3, "weight": {"bits": 8},
                          "input": act, "output": act})
    out_q = build_qmodule({"type": "output", "inner": "silu", "output": act})
    with torch.no_grad():
        conv.qweight.fill_(3)
        for q in (conv.input_quantizer, conv.output_quantizer, out_q.output_quantizer):
            q.scale.fill_(0.05)
        conv.weight_scale.fill_(0.1)
    x = _nan_at((1, 6, 4), [(0, 2, 1)])
    float_conv = torch.nn.functional.conv1d(torch.nn.functional.pad(x.transpose(1, 2), (2, 0)),
                                            conv.dequantized_weight(), conv.bias, groups=4).transpose(1, 2)
    assert torch.equal(torch.isnan(conv(x)), torch.isnan(float_conv)) and torch.isnan(float_conv).sum() == 3
    assert torch.equal(torch.isnan(out_q(x)), torch.isnan(x))
