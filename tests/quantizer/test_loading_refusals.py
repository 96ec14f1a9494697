"""A quantized folder never loads as garbage: a lost or edited quantization config, an unstamped shard, a
recipe stamp that contradicts the config are refused; a float checkpoint still loads."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageClassification

import optimum_vim  # noqa: F401
from optimum_vim.modules import QLinear
from optimum_vim.serialization import CheckpointFormatError


def _edit_config(folder, fn):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


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
