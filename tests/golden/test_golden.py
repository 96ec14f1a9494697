"""Golden checkpoints: one tiny quantized Vim per recipe and weight format (and a few tiny quantized MambaVisions),
committed under ``tests/golden/``
(written by ``tests/golden/make_golden.py``). Every change must keep reloading them as they were saved: a plain
``from_pretrained`` (no quantization config: the quantizer rebuilds the modules from config.json), the same tensors
bit for bit, a re-save that writes the same tensors, and the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

import optimum_vim  # noqa: F401
from optimum_vim.modules import QModule
from optimum_vim.ops.dispatch import use_kernels

GOLDEN = Path(__file__).resolve().parent
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "config.json").is_file())


def test_every_recipe_has_a_golden_checkpoint():
    recipes = {json.loads((GOLDEN / c / "config.json").read_text())["quantization_config"]["recipe"] for c in CASES}
    assert recipes == {"rtn", "ptq4vm", "kscale", "ouromamba", "vimvq"}
    assert len(CASES) >= 9


@pytest.mark.parametrize("case", CASES)
def test_golden_checkpoint_reloads_bit_identically(case, tmp_path):
    folder = GOLDEN / case
    stored = load_file(folder / "model.safetensors")
    model = AutoModelForImageClassification.from_pretrained(folder)
    assert any(isinstance(m, QModule) for m in model.modules())
    state = model.state_dict()
    # MambaVision files keep the classifier where the Hub repos do (model.head); the model holds it at head
    state.update({f"model.{k}": v for k, v in state.items() if k.startswith("head.") and case.startswith("mambavision")})
    for name, tensor in stored.items():
        assert name in state, f"{case}: stored tensor {name} is no longer part of the model"
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), f"{case}: {name} changed"

    model.save_pretrained(tmp_path)
    again = load_file(tmp_path / "model.safetensors")
    assert again.keys() == stored.keys()
    assert all(torch.equal(again[k], stored[k]) and again[k].dtype == stored[k].dtype for k in stored)

    expected = load_file(folder / "expected.safetensors")
    with torch.no_grad():
        with use_kernels("reference"):
            reference = model(expected["pixel_values"]).logits
        default = model(expected["pixel_values"]).logits
    # the float parts (norms, scans, fp32 GEMMs) may sum in another order on another CPU, and an activation code
    # that lies on a rounding boundary may then flip (seen with PyTorch / MKL / oneDNN capped at SSE4: 6e-5 of the
    # largest logit); a changed stored format moves the logits by orders of magnitude more
    scale = float(expected["logits"].abs().max())
    torch.testing.assert_close(reference, expected["logits"], rtol=0, atol=1e-3 * scale)
    torch.testing.assert_close(default, expected["logits"], rtol=0, atol=1e-3 * scale)


@pytest.mark.parametrize("case", CASES)
def test_recipes_recalibrate_to_the_golden_checkpoints(case, tmp_path):
    """The same seeded recipe run gives the plan that was saved: bit for bit on the CPU kind that wrote the goldens
    (``tests/golden/ISA``); elsewhere fp32 sums may take another order, so codes may flip at rounding boundaries and
    scales move by float rounding, never more."""
    import sys

    sys.path.insert(0, str(GOLDEN))
    try:
        import make_golden
    finally:
        sys.path.remove(str(GOLDEN))
    float_dir = make_golden.write_float(tmp_path / "float", make_golden.family(case))
    calib, _ = make_golden.inputs()
    model = AutoModelForImageClassification.from_pretrained(float_dir,
                                                            quantization_config=make_golden.config(case, calib))
    model.save_pretrained(tmp_path / "q")
    fresh = load_file(tmp_path / "q" / "model.safetensors")
    stored = load_file(GOLDEN / case / "model.safetensors")
    assert fresh.keys() == stored.keys()
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["layers"] == \
        json.loads((GOLDEN / case / "config.json").read_text())["quantization_config"]["layers"]
    if (GOLDEN / "ISA").read_text().strip() == make_golden.isa_tag():
        changed = [k for k in stored if not torch.equal(fresh[k], stored[k])]
        assert not changed, f"{case}: recalibration changed {changed[:5]}"
        return
    for k, want in stored.items():
        got = fresh[k]
        assert got.dtype == want.dtype and got.shape == want.shape, k
        if want.is_floating_point():
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6, msg=f"{case}: {k}")
        else:
            assert (got != want).float().mean() <= 0.01, f"{case}: {k} codes differ beyond rounding-boundary flips"
