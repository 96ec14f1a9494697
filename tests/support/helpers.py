"""Helpers the tests share (one home instead of a copy per file)."""

from __future__ import annotations

import math

import torch
import yaml
from transformers import AutoModelForImageClassification

from optimum_vim.quantization_config import ViMQuantizationConfig


def random_images(n: int, seed: int = 0, size: int = 28, channels: int = 1) -> torch.Tensor:
    """``n`` seeded N(0, 1) images (n, channels, size, size): calibration data for the tiny test models."""
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def quantize(path, images: int = 16, **config):
    """``from_pretrained(path)`` quantized with ``ViMQuantizationConfig(**config)``; calibrated on ``images`` seeded
    random images unless ``calibration_dataset`` is given."""
    config.setdefault("calibration_dataset", random_images(images))
    return AutoModelForImageClassification.from_pretrained(path, quantization_config=ViMQuantizationConfig(**config))


def eval_logits(model, x: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``x`` without autograd."""
    with torch.no_grad():
        return model(x).logits


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref`` in dB."""
    return 10 * math.log10(ref.pow(2).sum().item() / max((ref - out).pow(2).sum().item(), 1e-30))


def card_metadata(text: str) -> dict:
    """The YAML front matter of a model card."""
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def forbid_real_data(monkeypatch) -> None:
    """Makes every real-data source of the package raise (a data-free run must touch none of them)."""
    import optimum_vim.calibration as calibration
    import optimum_vim.data.loaders as loaders
    import optimum_vim.evaluation as evaluation
    import optimum_vim.quantizer as quantizer

    def unreachable(*a, **k):
        raise AssertionError("a real data source was touched by the data-free recipe")

    for mod, name in ((quantizer, "prepare_calibration_batches"), (calibration, "prepare_calibration_batches"),
                      (evaluation, "load_named_dataset")):
        monkeypatch.setattr(mod, name, unreachable)
    for name in dir(loaders):
        if name.startswith("load_"):
            monkeypatch.setattr(loaders, name, unreachable)
