"""The bundled fixture is a genuinely trained classifier, and RTN keeps it one (numbers are measured here, not read
from the model card)."""

from __future__ import annotations

import json
import os

import pytest
from transformers import AutoImageProcessor, AutoModelForImageClassification

import optimum_vim  # noqa: F401
from optimum_vim import ViMQuantizationConfig
from optimum_vim.evaluation import evaluate, load_named_dataset

pytestmark = pytest.mark.slow  # the full 10,000-image test split


@pytest.fixture(scope="module")
def processor(fixture_dir):
    return AutoImageProcessor.from_pretrained(fixture_dir)


@pytest.fixture(scope="module")
def subset():
    return load_named_dataset("fashion-mnist", "test", limit=2000)


@pytest.fixture(scope="module")
def float_subset_top1(fixture_dir, processor, subset):
    model = AutoModelForImageClassification.from_pretrained(fixture_dir)
    return evaluate(model, subset, processor, batch_size=500, progress=False).top1


def test_fixture_is_the_real_architecture(fixture_dir):
    cfg = json.load(open(os.path.join(fixture_dir, "config.json")))
    assert cfg["model_type"] == "vim" and cfg["d_state"] >= 4
    n_patches = ((cfg["image_size"] - cfg["patch_size"]) // cfg["stride"] + 1) ** 2
    assert n_patches >= 16
    record = json.load(open(os.path.join(fixture_dir, "training_record.json")))
    card = open(os.path.join(fixture_dir, "README.md")).read()
    assert record["command"] in card and str(record["seed"]) in card


def test_fixture_reaches_88_percent_on_the_full_test_split(fixture_dir, processor):
    model = AutoModelForImageClassification.from_pretrained(fixture_dir)
    test = load_named_dataset("fashion-mnist", "test")
    result = evaluate(model, test, processor, batch_size=500, progress=False)
    assert result.total == 10_000
    assert result.top1 >= 0.88, result
    record = json.load(open(os.path.join(fixture_dir, "training_record.json")))
    assert abs(result.top1 - record["test_accuracy"]) < 1e-3  # the card's number is reproducible


@pytest.mark.parametrize(
    "weight_bits,act_bits,tolerance",
    [(8, 8, 0.005), (4, 8, 0.01), (4, None, 0.01)],
    ids=["w8a8", "w4a8", "w4-weight-only"],
)
def test_rtn_keeps_the_fixture_accurate(fixture_dir, processor, subset, float_subset_top1, weight_bits, act_bits,
                                        tolerance):
    calib = load_named_dataset("fashion-mnist", "train")
    config = ViMQuantizationConfig(recipe="rtn", weight_bits=weight_bits, act_bits=act_bits, calibration_dataset=calib,
                                   num_calibration_samples=64, seed=0)
    model = AutoModelForImageClassification.from_pretrained(fixture_dir, quantization_config=config)
    top1 = evaluate(model, subset, processor, batch_size=500, progress=False).top1
    assert top1 >= float_subset_top1 - tolerance, (top1, float_subset_top1)
