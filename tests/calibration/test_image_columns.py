"""Calibration data handling shared with evaluation: the same image columns, observers that keep samples only when
a percentile needs them."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageClassification

import optimum_vim  # noqa: F401
from tests.support.helpers import quantize, random_images


def test_calibration_and_evaluation_read_the_same_image_columns(tiny_vim_dir):
    import datasets

    from optimum_vim.calibration import data as calib_data
    from optimum_vim.evaluation import image_and_label_columns

    ds = datasets.Dataset.from_dict({"img": [[0]], "label": [0]})
    assert image_and_label_columns(ds)[0] == calib_data.image_column(ds.column_names) == "img"
    for name in calib_data.IMAGE_COLUMNS:
        assert image_and_label_columns(datasets.Dataset.from_dict({name: [[0]], "label": [0]}))[0] == name
    bad = datasets.Dataset.from_dict({"picture": [[0]], "label": [0]})
    with pytest.raises(ValueError):
        image_and_label_columns(bad)
    with pytest.raises(ValueError, match="image / img / pixel_values"):
        calib_data.image_column(bad.column_names)


def test_minmax_observers_keep_no_samples(tiny_vim_dir, monkeypatch):
    from optimum_vim.calibration import observers

    model = AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    names = ["vim.layers.0.mixer.in_proj"]
    lean = observers.collect_activation_stats(model, [random_images(8)], names, keep_samples=False)
    full = observers.collect_activation_stats(model, [random_images(8)], names)
    assert not lean[names[0]]._samples and full[names[0]]._samples
    assert torch.equal(lean[names[0]].min, full[names[0]].min) and torch.equal(lean[names[0]].token_max, full[names[0]].token_max)
    with pytest.raises(ValueError, match="keep_samples"):
        lean[names[0]].percentile_range(99.0)
    kept = []
    real = observers.ActivationStats.update

    def spy(self, x):
        real(self, x)
        kept.append(len(self._samples))

    monkeypatch.setattr(observers.ActivationStats, "update", spy)
    quantize(tiny_vim_dir, weight_bits=8, act_bits=8)  # RTN min-max
    assert kept and max(kept) == 0
    kept.clear()
    quantize(tiny_vim_dir, weight_bits=8, act_bits=8, recipe_args={"observer": "percentile"})
    assert max(kept) > 0
