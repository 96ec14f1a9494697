"""The bundled MambaVision fixture is a genuinely trained classifier of the real architecture (measured here, not
read from its card)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoImageProcessor, AutoModelForImageClassification

import optimum_vim  # noqa: F401 - registers the model types
from optimum_vim.evaluation import evaluate, load_named_dataset
from optimum_vim.models.mambavision import MambaVisionForImageClassification

pytestmark = pytest.mark.slow  # the full 10,000-image test split


FIXTURE = Path(__file__).resolve().parents[3] / "checkpoints" / "mambavision-fashion-mnist"


@pytest.fixture(scope="module")
def model():
    return AutoModelForImageClassification.from_pretrained(FIXTURE).eval()


def test_fixture_is_the_real_architecture(model):
    assert isinstance(model, MambaVisionForImageClassification)
    config = model.config
    # conv stages, then stages whose blocks are MambaVision mixers followed by self-attention
    kinds = [[type(b.mixer).__name__ for b in model.model.levels[s].blocks] for s in (2, 3)]
    assert all(k[0] == "MambaVisionMixer" and k[-1] == "MambaVisionAttention" for k in kinds), kinds
    assert config.d_state >= 4 and config.num_labels == 10
    record = json.loads((FIXTURE / "training_record.json").read_text())
    assert record["command"] in (FIXTURE / "README.md").read_text()


def test_fixture_reaches_88_percent_on_the_full_test_split(model):
    processor = AutoImageProcessor.from_pretrained(FIXTURE)
    test = load_named_dataset("fashion-mnist", "test")
    result = evaluate(model, test, processor, batch_size=500, progress=False)
    assert result.total == 10_000
    assert result.top1 >= 0.88, result
    record = json.loads((FIXTURE / "training_record.json").read_text())
    assert abs(result.top1 - record["test_accuracy"]) < 1e-3  # the recorded number is reproducible
