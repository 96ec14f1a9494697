"""Command-line error paths: clean errors for a missing model, a push without network, an unsafe pickle; the card
without matplotlib; one save per quantize."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageClassification

import optimum_vim  # noqa: F401


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
