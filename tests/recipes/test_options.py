"""Typed, validated recipe options: every value is checked against its declared type (Python values and command-line
strings), for every registered recipe."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from transformers import AutoModelForImageClassification

import optimum_vim  # noqa: F401
from optimum_vim.modules import QLinear
from optimum_vim.quantization_config import ViMQuantizationConfig


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
