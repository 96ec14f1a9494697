"""Publishing: model cards from the templates, and push -> reload through a loopback Hub-compatible server.

huggingface_hub reads HF_ENDPOINT once at import, so the client side runs in a fresh subprocess pointed at the
server this test starts on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForImageClassification

from optimum_vim import ViMQuantizationConfig
from optimum_vim.hub import render_model_card, set_card_info, write_model_card
from tests.support.helpers import card_metadata
from tests.support.hub_server import LoopbackHub


@pytest.fixture
def quantized(tiny_vim_dir):
    return AutoModelForImageClassification.from_pretrained(
        tiny_vim_dir, quantization_config=ViMQuantizationConfig(weight_bits=4, act_bits=8, calibration_dataset=torch.randn(16, 1, 28, 28)))


def test_quantized_card_metadata_and_tables(quantized, tmp_path):
    set_card_info(quantized, base_model="optimum-vim/vim-fashion-mnist",
                  accuracy={"dataset": "fashion-mnist test", "top1": 0.8812, "fp_top1": 0.8901, "command": "optimum-vim evaluate"},
                  benchmark_table=[{"recipe": "fp", "weight_bits": 32, "act_bits": None, "top1": 0.89},
                                   {"recipe": "rtn", "weight_bits": 8, "act_bits": 8, "top1": 0.888},
                                   {"recipe": "rtn", "weight_bits": 4, "act_bits": 8, "top1": 0.87}])
    path = write_model_card(quantized, tmp_path, repo_id="org/vim-w4a8")
    text = path.read_text()
    meta = card_metadata(text)
    assert meta["base_model"] == "optimum-vim/vim-fashion-mnist" and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "optimum-vim" and meta["pipeline_tag"] == "image-classification"
    assert {"quantized", "rtn", "w4a8", "vision-mamba"} <= set(meta["tags"])
    assert "| recipe | `rtn` |" in text and "| weight bits | 4 |" in text and "| activation bits | 8 |" in text
    assert "| quantized modules | 12 (linear) |" in text
    assert "88.12%" in text and "89.01%" in text
    assert "![accuracy vs bits](accuracy_vs_bits.png)" in text
    png = (tmp_path / "accuracy_vs_bits.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_float_card_and_local_base(tiny_vim_dir):
    fp = AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    card = str(render_model_card(fp, repo_id="org/vim-float", training={"data": "Fashion-MNIST", "command": "python x.py",
                                                                          "seed": 0, "wall": "10 min", "accuracy": "90%"}))
    meta = card_metadata(card)
    assert "base_model_relation" not in meta and "quantized" not in meta["tags"]
    assert "| command | `python x.py` |" in card and "50 (class token in the middle)" in card


def test_push_and_reload_through_loopback_hub(quantized, tiny_vim_dir, tmp_path):
    quantized.save_pretrained(tmp_path / "local")
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = quantized(x).logits
    torch.save(x, tmp_path / "x.pt")
    client = textwrap.dedent(f"""
        import json, torch, numpy as np
        from PIL import Image
        import optimum_vim
        from transformers import AutoModelForImageClassification, AutoImageProcessor, pipeline
        model = AutoModelForImageClassification.from_pretrained({str(tmp_path / "local")!r})
        processor = AutoImageProcessor.from_pretrained({tiny_vim_dir!r})
        optimum_vim.hub.set_card_info(model, base_model="optimum-vim/vim-fashion-mnist")
        url = model.push_to_hub("org/vim-w4a8", processor=processor)
        again = AutoModelForImageClassification.from_pretrained("org/vim-w4a8")
        x = torch.load({str(tmp_path / "x.pt")!r})
        with torch.no_grad():
            logits = again(x).logits
        torch.save(logits, {str(tmp_path / "hub_logits.pt")!r})
        clf = pipeline("image-classification", model="org/vim-w4a8")
        preds = clf(Image.fromarray(np.full((28, 28), 128, dtype=np.uint8)), top_k=3)
        print(json.dumps({{"url": url, "labels": [p["label"] for p in preds],
                          "quantized": type(again.vim.layers[0].mixer.in_proj).__name__}}))
    """)
    with LoopbackHub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_loopback", "HF_HOME": str(tmp_path / "hf_home"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
        proc = subprocess.run([sys.executable, "-c", client], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        repo = hub.state.repos["org/vim-w4a8"]
        assert sorted(repo.files) == ["README.md", "config.json", "model.safetensors", "optimum_vim_loader.py",
                                      "preprocessor_config.json"]
        assert len(repo.commits) == 1  # weights, processor and card in one commit
        card = repo.files["README.md"].decode()
        assert "base_model_relation: quantized" in card and 'model="org/vim-w4a8"' in card
        assert json.loads(repo.files["config.json"])["quantization_config"]["layers"]
    assert out["url"].startswith(hub.endpoint) and out["quantized"] == "QLinear" and len(out["labels"]) == 3
    assert torch.equal(torch.load(tmp_path / "hub_logits.pt"), expected)


def test_cli_push(quantized, tiny_vim_dir, tmp_path):
    quantized.save_pretrained(tmp_path / "local")
    table = tmp_path / "table.json"
    table.write_text(json.dumps([{"recipe": "rtn", "weight_bits": 4, "act_bits": 8, "top1": 0.5},
                                 {"recipe": "rtn", "weight_bits": 8, "act_bits": 8, "top1": 0.6}]))
    with LoopbackHub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_loopback", "HF_HOME": str(tmp_path / "hf_home"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
        proc = subprocess.run([sys.executable, "-m", "optimum_vim.cli", "push", str(tmp_path / "local"), "org/cli-push",
                               "--base-model", "optimum-vim/vim-fashion-mnist", "--benchmark-table", str(table)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        files = hub.state.repos["org/cli-push"].files
    assert "accuracy_vs_bits.png" in files and "model.safetensors" in files
    assert "![accuracy vs bits](accuracy_vs_bits.png)" in files["README.md"].decode()
