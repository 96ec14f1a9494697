"""First contact from the Hub: the card says what to install and how to load, accuracy lands in model-index, a push
merges with the card already on the Hub, and a process without `import optimum_vim` gets an actionable path."""

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
from optimum_vim.hub import merge_card, render_model_card
from tests.support.helpers import card_metadata
from tests.support.hub_server import LoopbackHub

ACC = {"dataset": "fashion-mnist test (10000 images)", "top1": 0.8893, "fp_top1": 0.8895, "command": "optimum-vim evaluate"}


@pytest.fixture(scope="module")
def quantized(tiny_vim_dir):
    cfg = ViMQuantizationConfig(weight_bits=4, act_bits=8, calibration_dataset=torch.randn(16, 1, 28, 28))
    return AutoModelForImageClassification.from_pretrained(tiny_vim_dir, quantization_config=cfg)


def test_card_names_the_library_and_reports_accuracy_in_model_index(quantized, tiny_vim_dir):
    card = str(render_model_card(quantized, repo_id="org/vim-w4a8", accuracy=ACC))
    meta = card_metadata(card)
    assert meta["library_name"] == "optimum-vim" and "transformers" in meta["tags"]
    assert "pip install optimum-vim" in card and "import optimum_vim" in card
    (entry,) = meta["model-index"]
    result = entry["results"][0]
    assert result["dataset"]["type"] == "zalando-datasets/fashion_mnist"
    assert result["metrics"][0]["type"] == "accuracy" and result["metrics"][0]["value"] == pytest.approx(0.8893)
    assert "model-index" not in card_metadata(str(render_model_card(quantized, repo_id="org/vim-w4a8")))
    fp = AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    fp_card = str(render_model_card(fp, repo_id="org/vim"))
    assert card_metadata(fp_card)["library_name"] == "optimum-vim" and "pip install optimum-vim" in fp_card


def test_merge_keeps_user_edits_and_sections(quantized):
    first = str(render_model_card(quantized, repo_id="org/m", accuracy=ACC))
    edited = first.replace("## Quantization\n", "## Quantization\n\nCalibrated on our own photos.\n")
    edited = edited.replace("tags:\n", "license: mit\ntags:\n- my-tag\n") + "\n## Intended use\n\nShoes only.\n"
    second = str(render_model_card(quantized, repo_id="org/m", accuracy={**ACC, "top1": 0.9}))
    merged = merge_card(edited, second)
    meta = card_metadata(merged)
    assert meta["license"] == "mit" and "my-tag" in meta["tags"] and "quantized" in meta["tags"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == pytest.approx(0.9)  # regenerated
    assert "Calibrated on our own photos." in merged  # the user's edit of a generated section stays
    assert "## Intended use\n\nShoes only." in merged  # the user's own section stays
    assert "| this model | fashion-mnist test (10000 images) | 90.00% |" in merged  # untouched section updated
    assert "89.01%" not in merged and merged.count("## Usage") == 1
    assert merge_card(merged, second) == merged  # merging again changes nothing


def test_push_merges_with_the_card_on_the_hub(quantized, tmp_path):
    quantized.save_pretrained(tmp_path / "local")
    client = textwrap.dedent(f"""
        import optimum_vim
        from huggingface_hub import HfApi
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained({str(tmp_path / "local")!r})
        model.push_to_hub("org/merge")
        api = HfApi()
        card = open(api.hf_hub_download("org/merge", "README.md")).read()
        card = card.replace("## Usage", "## Notes from the team\\n\\nRetrained monthly.\\n\\n## Usage")
        api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id="org/merge")
        optimum_vim.hub.set_card_info(model, accuracy={ACC!r})
        model.push_to_hub("org/merge")
    """)
    with LoopbackHub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_loopback", "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
        proc = subprocess.run([sys.executable, "-c", client], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        repo = hub.state.repos["org/merge"]
        card = repo.files["README.md"].decode()
    assert len(repo.commits) == 3
    assert "## Notes from the team\n\nRetrained monthly." in card  # kept by the second push
    assert card_metadata(card)["model-index"][0]["results"][0]["metrics"][0]["value"] == pytest.approx(0.8893)


_BLOCK_OPTIMUM_VIM = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "optimum_vim" or name.startswith("optimum_vim."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Block())
"""


def test_loading_without_the_import(quantized, tmp_path):
    folder = tmp_path / "q"
    quantized.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == "optimum_vim_loader.VimForImageClassification"
    load = f"from transformers import AutoModelForImageClassification as A\nm = A.from_pretrained({str(folder)!r}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(code):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)

    plain = run(load + ")")  # no import: transformers asks for trust_remote_code (was: "upgrade transformers")
    assert plain.returncode != 0 and "trust_remote_code=True" in plain.stderr
    trusted = run(load + ", trust_remote_code=True)\nprint(type(m.vim.layers[0].mixer.in_proj).__name__)")
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert trusted.stdout.strip().endswith("QLinear")
    missing = run(_BLOCK_OPTIMUM_VIM + load + ", trust_remote_code=True)")  # optimum-vim not installed
    assert missing.returncode != 0 and "optimum_vim" in missing.stderr and "pip install" in missing.stderr
