"""Loading options and saved files: dequantize on load, backbone / classifier checkpoints reloading as each other,
dtype casts, byte-identical re-saves, parameter counts like transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForImageClassification

import optimum_vim  # noqa: F401
from optimum_vim.modules import QLinear
from optimum_vim.quantization_config import ViMQuantizationConfig
from tests.support.helpers import eval_logits, random_images


def test_dequantize_passed_to_from_pretrained_is_honoured(saved_w4a8):
    q = AutoModelForImageClassification.from_pretrained(saved_w4a8)
    model = AutoModelForImageClassification.from_pretrained(
        saved_w4a8, quantization_config=ViMQuantizationConfig(dequantize=True))
    assert not any(isinstance(m, QLinear) for m in model.modules())
    x = random_images(2, 9)
    assert torch.equal(eval_logits(model, x), eval_logits(q.dequantize(), x))


def test_backbone_and_classifier_checkpoints_reload_as_each_other(saved_w4a8, tmp_path):
    q = AutoModelForImageClassification.from_pretrained(saved_w4a8)
    x = random_images(2, 4)
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
    x = random_images(2, 5).to(dtype)
    out = eval_logits(q, x)
    assert out.dtype == dtype and torch.equal(out, eval_logits(loaded, x))


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
    assert torch.equal(eval_logits(reloaded, random_images(2)), eval_logits(model, random_images(2)))


def test_num_parameters_counts_quantized_layers_like_transformers(tiny_vim_dir, saved_w4a8):
    fp = AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    q = AutoModelForImageClassification.from_pretrained(saved_w4a8)
    assert q.num_parameters() == fp.num_parameters()  # each quantized layer counts the weights it stands for
    quantized = sum(m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
                    for m in q.modules() if isinstance(m, QLinear))
    assert quantized > 0 and q.num_parameters(only_trainable=True) == fp.num_parameters() - quantized  # frozen
