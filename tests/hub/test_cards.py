"""Model cards and Hub arguments: base_model independent of the working directory and kept through reloads,
transformers' push_to_hub signature, push arguments reaching the Hub, the model file free of the hub package."""

from __future__ import annotations

import pytest
from transformers import AutoModelForImageClassification

import optimum_vim  # noqa: F401
from tests.support.helpers import card_metadata, quantize


def test_card_base_model_does_not_depend_on_cwd(tiny_vim_dir, tmp_path, monkeypatch):
    import os

    from optimum_vim.hub import render_model_card

    root = os.path.dirname(os.path.dirname(tiny_vim_dir))
    relative = os.path.relpath(tiny_vim_dir, root)  # "pytest-N/tiny_vimM": shaped like a Hub id
    monkeypatch.chdir(root)
    q = quantize(relative, weight_bits=4)
    here = str(render_model_card(q, repo_id="org/q"))
    monkeypatch.chdir(tmp_path)
    elsewhere = str(render_model_card(q, repo_id="org/q"))
    assert here == elsewhere
    assert "base_model" not in card_metadata(here) and "](#)" not in here and "huggingface.co/pytest" not in here


def test_base_model_through_the_config_survives_reload(tiny_vim_dir, tmp_path):
    q = quantize(tiny_vim_dir, weight_bits=4, base_model="org/vim-float")
    q.save_pretrained(tmp_path / "q")
    text = (tmp_path / "q" / "README.md").read_text()
    meta = card_metadata(text)
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

    from tests.support.hub_server import LoopbackHub

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
