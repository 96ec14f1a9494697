"""Writes the golden checkpoints: one tiny quantized Vim per recipe and weight format, and tiny quantized MambaVisions
(cases ``mambavision-*``: its "same" convs without bias, one scan direction, attention / MLP linears), saved as users
save them.

    python tests/golden/make_golden.py            # (re)writes tests/golden/<case>/ for every case below
    python tests/golden/make_golden.py CASE ...   # (re)writes only the named cases (a new case: a new folder only)

Each folder holds what ``save_pretrained`` wrote (config.json with the quantization config, packed
model.safetensors) plus ``expected.safetensors``: a fixed input batch and the logits the saved model gave for it
under ``OPTIMUM_VIM_KERNELS=reference``. ``tests/golden/test_golden.py`` reloads every folder with a plain
``from_pretrained`` and checks that nothing about the stored format drifted: the reloaded state dict equals the file
bit for bit, a re-save writes the same tensors, and the logits match (to fp32 summation-order tolerance: the float
parts of the model may sum in another order on another CPU). Re-run this script only for a deliberate format change,
and say so in the commit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

import optimum_vim  # noqa: F401
from optimum_vim import VimConfig, VimForImageClassification, VimImageProcessor, ViMQuantizationConfig
from optimum_vim.models.mambavision import (
    MambaVisionConfig,
    MambaVisionForImageClassification,
    MambaVisionImageProcessor,
)
from optimum_vim.ops.dispatch import use_kernels

HERE = Path(__file__).resolve().parent

# every recipe, and every stored weight format (int 8 / 4 / 3 bits, grouped, weight-only, codebooks), with the
# quantizer kinds they bring (static per-tensor / per-token, dynamic outliers, k-scaled clusters, 8-bit state)
CASES = {
    "rtn-w8a8": dict(recipe="rtn", weight_bits=8, act_bits=8),
    "rtn-w4a8-token-scan8": dict(recipe="rtn", weight_bits=4, act_bits=8,
                                 recipe_args={"act_granularity": "token", "scan_act_bits": 8}),
    "rtn-w4g16": dict(recipe="rtn", weight_bits=4, weight_group_size=16),
    "rtn-w3": dict(recipe="rtn", weight_bits=3),
    "ptq4vm-w4a4": dict(recipe="ptq4vm", weight_bits=4, act_bits=4, recipe_args={"steps": 2, "batch_size": 8}),
    "kscale-w8a8": dict(recipe="kscale", weight_bits=8, act_bits=8,
                        recipe_args={"search_candidates": 5, "search_rounds": 1}),
    "ouromamba-w4a4o8": dict(recipe="ouromamba", weight_bits=4, act_bits=4, recipe_args={"epochs": 1}),
    "vimvq-w2": dict(recipe="vimvq", weight_bits=2,
                     recipe_args={"iterations": 4, "kmeans_iterations": 5, "replace_every": 2}),
    "vimvq-w1-kmeans": dict(recipe="vimvq", weight_bits=1,
                            recipe_args={"kmeans_iterations": 5, "convex": False, "incremental": False}),
}

# the same recipes on a tiny MambaVision (folders named "mambavision-<case>")
MAMBAVISION_CASES = {
    "mambavision-rtn-w4a8-scan8": dict(recipe="rtn", weight_bits=4, act_bits=8, recipe_args={"scan_act_bits": 8}),
    "mambavision-kscale-w8a8": dict(recipe="kscale", weight_bits=8, act_bits=8,
                                    recipe_args={"search_candidates": 5, "search_rounds": 1}),
    "mambavision-ptq4vm-w4a4": dict(recipe="ptq4vm", weight_bits=4, act_bits=4,
                                    recipe_args={"steps": 2, "batch_size": 8}),
    # data-free: OuroMamba-Gen without a class token (the pooled output's attention on stage 3's 2x2 map)
    "mambavision-ouromamba-w4a4o8-datafree": dict(recipe="ouromamba", weight_bits=4, act_bits=4,
                                                  calibration_dataset=None,
                                                  recipe_args={"epochs": 1, "num_synthetic": 4, "gen_iterations": 3}),
}
ALL_CASES = {**CASES, **MAMBAVISION_CASES}


def family(case: str) -> str:
    """The model family a case quantizes."""
    return "mambavision" if case in MAMBAVISION_CASES else "vim"


def tiny_float() -> VimForImageClassification:
    torch.manual_seed(1234)
    config = VimConfig(hidden_size=32, num_hidden_layers=2, d_state=4, expand=2, patch_size=4, stride=4,
                       image_size=28, num_channels=1, num_labels=10)
    return VimForImageClassification(config).eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration images, test batch), seeded."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(16, 1, 28, 28, generator=g), torch.randn(4, 1, 28, 28, generator=g)


def tiny_mambavision() -> MambaVisionForImageClassification:
    torch.manual_seed(1234)
    config = MambaVisionConfig(dim=4, in_dim=4, depths=[1, 1, 2, 2], num_heads=[1, 1, 2, 2], window_size=[8, 8, 2, 1],
                               d_state=4, mlp_ratio=2.0, image_size=28, num_channels=1, num_labels=10)
    return MambaVisionForImageClassification(config).eval()


def config(case: str, calib: torch.Tensor) -> ViMQuantizationConfig:
    """The seeded quantization config of a case (16 calibration images unless the case is data-free)."""
    return ViMQuantizationConfig(**{"calibration_dataset": calib, "num_calibration_samples": 16, "seed": 0,
                                    **ALL_CASES[case]})


def write_float(folder: Path, model_family: str = "vim") -> Path:
    """Saves the tiny float model of ``model_family`` and its image processor to ``folder`` (the checkpoint the
    family's cases quantize)."""
    model, processor = ((tiny_float(), VimImageProcessor) if model_family == "vim"
                        else (tiny_mambavision(), MambaVisionImageProcessor))
    model.save_pretrained(folder)
    processor(size={"height": 28, "width": 28}, do_center_crop=False, image_mean=[0.286], image_std=[0.353],
              color_mode="L").save_pretrained(folder)
    return folder


def isa_tag() -> str:
    """The CPU kind the goldens were written on (``tests/golden/ISA``): recalibration is bit-identical on it."""
    from optimum_vim_kernels.cpu_features import cpu_features

    f = cpu_features()
    return f"{f.model} | {f.isa} | {f.torch_capability}"


def main(names: list[str] | None = None) -> None:
    from transformers import AutoModelForImageClassification

    names = names or list(ALL_CASES)
    unknown = [n for n in names if n not in ALL_CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; cases: {list(ALL_CASES)}")
    calib, x = inputs()
    float_dirs = {f: write_float(HERE / f"_float_tmp_{f}", f) for f in dict.fromkeys(family(n) for n in names)}
    if (HERE / "ISA").is_file() and (HERE / "ISA").read_text().strip() != isa_tag() and len(names) < len(ALL_CASES):
        raise SystemExit(f"tests/golden/ISA names another CPU kind ({(HERE / 'ISA').read_text().strip()}); rewrite "
                         "every case (no arguments) so that they all come from one CPU kind")
    (HERE / "ISA").write_text(isa_tag() + "\n")
    try:
        for name in names:
            model = AutoModelForImageClassification.from_pretrained(float_dirs[family(name)],
                                                                    quantization_config=config(name, calib))
            out = HERE / name
            shutil.rmtree(out, ignore_errors=True)
            model.save_pretrained(out)
            for extra in [*out.glob("README.md"), *out.glob("preprocessor_config.json")]:  # not the format
                extra.unlink()
            reloaded = AutoModelForImageClassification.from_pretrained(out)
            with torch.no_grad(), use_kernels("reference"):
                logits = reloaded(x).logits
            save_file({"pixel_values": x.contiguous(), "logits": logits.contiguous()}, out / "expected.safetensors")
            size = sum(f.stat().st_size for f in out.iterdir())
            print(f"{name}: {size:,} bytes")
    finally:
        for folder in float_dirs.values():
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
