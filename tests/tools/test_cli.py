"""The optimum-vim command line and its optimum-cli plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from transformers import AutoModelForImageClassification

from optimum_vim.cli import main
from optimum_vim.modules import QLinear
from tests.support.reference_vim import official_state_dict


def test_quantize_evaluate_and_card(tiny_vim_dir, tmp_path, capsys):
    out = tmp_path / "w4a8"
    code = main(["quantize", tiny_vim_dir, str(out), "--weight-bits", "4", "--act-bits", "8", "--num-samples", "32",
                 "--override", "*.dt_proj*=weight_bits:8", "--recipe-arg", "act_granularity=\"token\"",
                 "--evaluate", "--eval-limit", "60", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["quantized_modules"] == 12 and summary["eval_images"] == 60
    assert 0 <= summary["quantized_top1"] <= 1 and 0 <= summary["fp_top1"] <= 1
    assert summary["checkpoint_bytes"] < summary["float_checkpoint_bytes"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                    "optimum_vim_loader.py", "preprocessor_config.json"]
    model = AutoModelForImageClassification.from_pretrained(out)
    mixer = model.vim.layers[0].mixer
    assert isinstance(mixer.in_proj, QLinear) and mixer.in_proj.bits == 4 and mixer.dt_proj.bits == 8
    assert mixer.in_proj.input_quantizer.granularity == "token"
    card = (out / "README.md").read_text()
    assert "| calibration data | Dataset(" in card and "top-1" in card
    assert main(["evaluate", str(out), "--limit", "60", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["top1"] == summary["quantized_top1"]


def test_quantize_failure_writes_nothing(tiny_vim_dir, tmp_path, capsys):
    import datasets

    out = tmp_path / "never"
    code = main(["quantize", tiny_vim_dir, str(out), "--act-bits", "8", "--calibration-dataset", str(tmp_path / "nope")])
    assert code == 2 and "unknown data set" in capsys.readouterr().err
    assert not out.exists()
    # a failure inside calibration (after the model loaded) leaves nothing either
    bad = datasets.Dataset.from_dict({"pixel_values": [[[[float("nan")] * 28] * 28]] * 4, "label": [0] * 4})
    bad.save_to_disk(str(tmp_path / "nan_data"))
    code = main(["quantize", tiny_vim_dir, str(out), "--act-bits", "8", "--calibration-dataset", str(tmp_path / "nan_data")])
    assert code == 2 and "NaN" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
    assert main(["quantize", tiny_vim_dir, str(out), "--weight-bits", "7"]) == 2
    assert "weight_bits" in capsys.readouterr().err and not out.exists()


def test_convert_command(tmp_path, capsys):
    sd = official_state_dict(hidden=192, depth=1, generator=torch.Generator().manual_seed(0))
    torch.save({"model": sd}, tmp_path / "ckpt.pth")
    assert main(["convert", str(tmp_path / "ckpt.pth"), str(tmp_path / "hf"), "--stride", "16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "ckpt.pth"), str(tmp_path / "hf8"), "--stride", "8"]) == 2
    assert "stride=16 but stride=8" in capsys.readouterr().err and not (tmp_path / "hf8").exists()


def test_optimum_cli_plugin(tiny_vim_dir):
    env = {**os.environ}
    help_out = subprocess.run(["optimum-cli", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert help_out.returncode == 0 and "vim" in help_out.stdout
    proc = subprocess.run(["optimum-cli", "vim", "evaluate", tiny_vim_dir, "--limit", "20", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["total"] == 20


def test_module_entry_point():
    for module in ("optimum_vim.cli", "optimum_vim"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and all(c in proc.stdout for c in ("quantize", "evaluate", "convert", "push"))
    proc = subprocess.run([sys.executable, "-m", "optimum_vim", "quantize", "x", "y", "--recipe", "gptq"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown recipe" in proc.stderr and "Traceback" not in proc.stderr
