"""VimModel / VimForImageClassification: exactness against the official formulation, HF plumbing, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline

import optimum_vim  # noqa: F401 - registration
from optimum_vim import VimConfig, VimForImageClassification, VimImageProcessor, VimModel
from optimum_vim.models.vim.convert_vim_checkpoint import official_to_hf_state_dict
from tests.support.reference_vim import official_state_dict, reference_logits

# (image_size, patch, stride, hidden, depth, d_state, expand) -- both strides, several depths, odd sizes
CONFIGS = [
    (32, 8, 8, 32, 1, 4, 2),
    (32, 8, 4, 24, 2, 8, 2),  # overlapping patches, like the stride-8 "+" models
    (28, 7, 7, 48, 3, 16, 1),
    (20, 4, 4, 16, 2, 4, 3),
]


def _build(image_size, patch, stride, hidden, depth, d_state, expand, num_labels=7, seed=0):
    grid = (image_size - patch) // stride + 1
    g = torch.Generator().manual_seed(seed)
    sd = official_state_dict(
        hidden=hidden, depth=depth, d_state=d_state, expand=expand, num_classes=num_labels, patch=patch,
        seq=grid * grid + 1, generator=g,
    )
    config = VimConfig(
        hidden_size=hidden, num_hidden_layers=depth, d_state=d_state, expand=expand, patch_size=patch, stride=stride,
        image_size=image_size, num_labels=num_labels,
    )
    model = VimForImageClassification(config).eval()
    model.load_state_dict(official_to_hf_state_dict(sd), strict=True)
    return model, sd, config


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"img{c[0]}-p{c[1]}-s{c[2]}-d{c[3]}-L{c[4]}")
def test_forward_matches_float64_reference(cfg):
    model, sd, config = _build(*cfg)
    x = torch.randn(3, 3, cfg[0], cfg[0])
    ref = reference_logits(sd, x, patch_size=cfg[1], stride=cfg[2])
    with torch.no_grad():
        logits = model(x).logits
        logits64 = model.double()(x.double()).logits
    torch.testing.assert_close(logits64, ref, rtol=1e-9, atol=1e-9)  # same math, fp64: rounding only
    torch.testing.assert_close(logits.double(), ref, rtol=2e-4, atol=2e-4)


def test_model_outputs_and_pooling():
    model, _, config = _build(*CONFIGS[1])
    base = model.vim
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = base(x, output_hidden_states=True)
        logits = model(x).logits
    assert out.last_hidden_state.shape == (2, config.sequence_length, config.hidden_size)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, config.token_position])
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    torch.testing.assert_close(logits, model.head(out.pooler_output))
    tup = model(x, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], logits)


def test_loss_with_labels_and_backward():
    model, _, _ = _build(*CONFIGS[0])
    model.train()
    x = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3])
    out = model(x, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits, labels)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.vim.layers[0].mixer.A_b_log.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_models(dtype):
    model, sd, _ = _build(*CONFIGS[2])
    x = torch.randn(2, 3, 28, 28)
    ref = reference_logits(sd, x, patch_size=7, stride=7)
    low = model.to(dtype)
    with torch.no_grad():
        logits = low(x).logits  # fp32 pixels are cast to the model dtype
    assert logits.dtype == dtype
    err = (logits.double() - ref).abs().max() / ref.abs().max()
    assert err < (0.02 if dtype == torch.float16 else 0.08), float(err)


def test_save_reload_roundtrip(tmp_path):
    model, _, _ = _build(*CONFIGS[1])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(reloaded) is VimForImageClassification
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded.eval()(x).logits)
    assert type(AutoModel.from_pretrained(tmp_path)) is VimModel
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert cfg.model_type == "vim" and cfg.stride == 4 and cfg.embed_dim == 24 and cfg.depth == 2


def test_config_validation():
    with pytest.raises(ValueError, match="cls_token_position"):
        VimConfig(cls_token_position="head")
    with pytest.raises(ValueError, match="bimamba_type"):
        VimConfig(bimamba_type="v1")
    with pytest.raises(ValueError, match="patch_size"):
        VimConfig(image_size=8, patch_size=16)
    c = VimConfig()
    assert (c.sequence_length, c.token_position, c.time_step_rank, c.intermediate_size) == (197, 98, 12, 384)
    c8 = VimConfig(stride=8, hidden_size=384)
    assert (c8.sequence_length, c8.token_position, c8.time_step_rank) == (730, 364, 24)


def test_bad_inputs_give_clear_errors():
    model, _, _ = _build(*CONFIGS[0])
    with pytest.raises(ValueError, match="32x32"):
        model(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match="channel"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="4 dims"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8))
    with pytest.raises(ValueError, match="torch.Tensor"):
        model(np.zeros((1, 3, 32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="torch.Tensor"):
        model(None)


def test_image_processor_defaults_match_official_eval_transform():
    proc = VimImageProcessor()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    px = proc(img, return_tensors="pt").pixel_values
    assert px.shape == (1, 3, 224, 224)
    # reproduce: bicubic short side -> 256, centre crop 224, /255, ImageNet mean/std
    resized = img.resize((341, 256), Image.BICUBIC)
    left, top = (341 - 224) // 2, (256 - 224) // 2
    crop = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float64) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = torch.from_numpy(((crop - mean) / std).transpose(2, 0, 1)).float()
    assert (px[0] - expected).abs().max() < 1e-5


def test_image_processor_color_modes():
    gray = VimImageProcessor(size={"height": 28, "width": 28}, do_center_crop=False, image_mean=[0.5], image_std=[0.5], color_mode="L")
    rgb_img = Image.fromarray(np.full((28, 28, 3), 200, dtype=np.uint8))
    assert gray(rgb_img, return_tensors="pt").pixel_values.shape == (1, 1, 28, 28)
    rgb = VimImageProcessor(size={"height": 28, "width": 28}, do_center_crop=False)
    gray_img = Image.fromarray(np.full((28, 28), 10, dtype=np.uint8), mode="L")
    assert rgb(gray_img, return_tensors="pt").pixel_values.shape == (1, 3, 28, 28)
    with pytest.raises(ValueError, match="color_mode"):
        VimImageProcessor(color_mode="CMYK")


def test_pipeline_on_local_folder(tmp_path):
    model, _, config = _build(*CONFIGS[0], num_labels=3)
    model.config.id2label = {0: "cat", 1: "dog", 2: "fish"}
    model.config.label2id = {"cat": 0, "dog": 1, "fish": 2}
    model.save_pretrained(tmp_path)
    VimImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(tmp_path)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is VimImageProcessor
    clf = pipeline("image-classification", model=str(tmp_path))
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    preds = clf(img, top_k=3)
    assert {p["label"] for p in preds} == {"cat", "dog", "fish"}
    assert abs(sum(p["score"] for p in preds) - 1.0) < 1e-5
    # the pipeline's top label is the argmax of the model on the processed image
    px = AutoImageProcessor.from_pretrained(tmp_path)(img, return_tensors="pt").pixel_values
    with torch.no_grad():
        top = model.config.id2label[int(model(px).logits.argmax())]
    assert preds[0]["label"] == top
