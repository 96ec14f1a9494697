"""Vision conventions: VimBackbone (AutoBackbone, out_indices, per-layer features), interpolate_pos_encoding with the
middle class token, and the torchvision image processor where torchvision imports."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoBackbone, AutoModelForImageClassification

from optimum_vim import VimBackbone, VimConfig, ViMQuantizationConfig


@pytest.fixture(scope="module")
def classifier(tiny_vim_dir):
    return AutoModelForImageClassification.from_pretrained(tiny_vim_dir).eval()


def test_backbone_is_registered_and_returns_per_layer_maps(tiny_vim_dir, classifier):
    config = VimConfig.from_pretrained(tiny_vim_dir, out_indices=[0, 1, 2])
    assert type(AutoBackbone.from_config(config)).__name__ == "VimBackbone"
    backbone = VimBackbone.from_pretrained(tiny_vim_dir, out_indices=[0, 1, 2]).eval()
    assert backbone.out_features == ["stem", "stage1", "stage2"] and backbone.channels == [32, 32, 32]
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        out = backbone(x, output_hidden_states=True)
        ref = classifier.vim(x, output_hidden_states=True)
    assert [tuple(f.shape) for f in out.feature_maps] == [(3, 32, 7, 7)] * 3
    # the backbone's stream equals the model's hidden states (the last one is the model's normed output)
    for mine, theirs in zip(out.hidden_states[:-1], ref.hidden_states[:-1]):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    norm_f = classifier.vim.norm_f
    last = norm_f(out.hidden_states[-1])
    torch.testing.assert_close(last, ref.last_hidden_state, rtol=1e-6, atol=1e-6)
    mid = (last.shape[1] - 1) // 2  # the middle class token is not a patch: removed before the (7, 7) reshape
    patches = torch.cat([last[:, :mid], last[:, mid + 1 :]], 1).reshape(3, 7, 7, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.feature_maps[-1], patches)
    with pytest.raises(ValueError, match="out_indices"):
        VimConfig.from_pretrained(tiny_vim_dir, out_indices=[5])


def test_backbone_of_a_quantized_checkpoint(tiny_vim_dir, tmp_path):
    cfg = ViMQuantizationConfig(weight_bits=4, act_bits=8, calibration_dataset=torch.randn(16, 1, 28, 28))
    q = AutoModelForImageClassification.from_pretrained(tiny_vim_dir, quantization_config=cfg)
    q.save_pretrained(tmp_path)
    backbone = VimBackbone.from_pretrained(tmp_path, out_indices=[2]).eval()
    assert type(backbone.vim.layers[0].mixer.in_proj).__name__ == "QLinear"
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        feature = backbone(x).feature_maps[0]
        torch.testing.assert_close(feature.flatten(2).transpose(1, 2)[:, 24], q.vim(x).last_hidden_state[:, 25])  # patch 24 follows the class token at 24


def test_interpolate_pos_encoding(classifier):
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(classifier(x, interpolate_pos_encoding=True).logits, classifier(x).logits)
        bigger = classifier(torch.randn(2, 1, 40, 32), interpolate_pos_encoding=True)
    assert bigger.logits.shape == (2, 10) and torch.isfinite(bigger.logits).all()
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        classifier(torch.randn(2, 1, 40, 32))
    vim = classifier.vim
    pe = vim.interpolate_pos_embed(7, 7)  # the trained grid: the identity, class token included
    torch.testing.assert_close(pe, vim.pos_embed, rtol=1e-5, atol=1e-6)
    wide = vim.interpolate_pos_embed(9, 8)
    assert wide.shape == (1, 73, 32)
    torch.testing.assert_close(wide[:, 72 // 2], vim.pos_embed[:, vim.config.token_position])  # middle token kept


def test_fast_image_processor_needs_torchvision():
    from optimum_vim.models.vim.image_processing_vim import fast_image_processor_class

    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):
        assert fast_image_processor_class() is None  # registered only when torchvision imports
        pytest.skip("torchvision does not import here (PyPI torchvision beside the local torch build); the PIL "
                    "processor serves alone")
    import numpy as np
    from PIL import Image

    from optimum_vim import VimImageProcessor

    fast_cls = fast_image_processor_class()
    kw = dict(size={"height": 28, "width": 28}, do_center_crop=False, image_mean=[0.3], image_std=[0.35], color_mode="L")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8))
    slow = VimImageProcessor(**kw)([image], return_tensors="pt").pixel_values
    fast = fast_cls(**kw)([image], return_tensors="pt").pixel_values
    assert fast.shape == slow.shape == (1, 1, 28, 28)
    torch.testing.assert_close(fast, slow, rtol=0, atol=0.02)
