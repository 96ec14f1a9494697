"""Accuracy / size / calibration-time table of the quantization recipes on the bundled Fashion-MNIST Vim.

Every row quantizes the float fixture inside ``from_pretrained`` (calibration: 128 seeded images from the training
split), saves it (packed safetensors) and evaluates top-1 on the test split; all rows are measured in one run.

    python benchmarks/accuracy.py                          # the README table (full 10k test split)
    python benchmarks/accuracy.py --limit 2000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

import optimum_vim  # noqa: F401
from optimum_vim import ViMQuantizationConfig
from optimum_vim.evaluation import evaluate, load_named_dataset
from optimum_vim.size import checkpoint_bytes, quantized_layer_bytes

FIXTURE = Path(__file__).resolve().parents[1] / "checkpoints" / "vim-fashion-mnist"

# (label, recipe, weight_bits, act_bits, group_size, recipe_args)
SETTINGS = [
    ("RTN W8A8", "rtn", 8, 8, None, {}),
    ("RTN W6A6", "rtn", 6, 6, None, {}),
    ("RTN W4A8", "rtn", 4, 8, None, {}),
    ("RTN W4A4", "rtn", 4, 4, None, {}),
    ("RTN W4A4 pct99.9", "rtn", 4, 4, None, {"observer": "percentile", "percentile": 99.9}),
    ("RTN W4A4 per-token", "rtn", 4, 4, None, {"act_granularity": "token"}),
    ("RTN W8 (weight-only)", "rtn", 8, None, None, {}),
    ("RTN W4 (weight-only)", "rtn", 4, None, None, {}),
    ("RTN W4 g32", "rtn", 4, None, 32, {}),
    ("RTN W3 (weight-only)", "rtn", 3, None, None, {}),
    ("RTN W2 (weight-only)", "rtn", 2, None, None, {}),
    ("RTN W2 g32", "rtn", 2, None, 32, {}),
    ("RTN W1 g32 (binary)", "rtn", 1, None, 32, {}),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(FIXTURE))
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="comma-separated substrings selecting rows")
    p.add_argument("--json", default=None, help="also write the rows as JSON (for model-card plots)")
    args = p.parse_args(argv)

    processor = AutoImageProcessor.from_pretrained(args.model)
    test = load_named_dataset("fashion-mnist", "test", args.limit)
    calib = load_named_dataset("fashion-mnist", "train")
    fp_model = AutoModelForImageClassification.from_pretrained(args.model)
    fp = evaluate(fp_model, test, processor, batch_size=500, progress=False)
    fp_bytes = checkpoint_bytes(args.model)
    rows = [{"label": "float32", "recipe": "fp", "weight_bits": 32, "act_bits": None, "top1": fp.top1,
             "ratio_to_fp": 1.0, "checkpoint_bytes": fp_bytes, "layer_ratio_vs_fp16": None, "calib_seconds": 0.0}]
    settings = SETTINGS
    if args.only:
        keys = [k.strip().lower() for k in args.only.split(",")]
        settings = [s for s in SETTINGS if any(k in s[0].lower() for k in keys)]
    for label, recipe, wb, ab, group, rargs in settings:
        cfg = ViMQuantizationConfig(
            recipe=recipe, weight_bits=wb, act_bits=ab, weight_group_size=group, recipe_args=rargs,
            calibration_dataset=calib, image_processor=processor, num_calibration_samples=args.num_samples,
            seed=args.seed,
        )
        start = time.perf_counter()
        model = AutoModelForImageClassification.from_pretrained(args.model, quantization_config=cfg)
        calib_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, model_card=False)
            size = checkpoint_bytes(tmp)
        result = evaluate(model, test, processor, batch_size=500, progress=False)
        rows.append({
            "label": label, "recipe": recipe, "weight_bits": wb, "act_bits": ab, "top1": result.top1,
            "ratio_to_fp": result.top1 / fp.top1, "checkpoint_bytes": size,
            "layer_ratio_vs_fp16": quantized_layer_bytes(model)["ratio"], "calib_seconds": calib_s,
        })
        print(f"{label}: {100 * result.top1:.2f}%", flush=True)

    print(f"\nFashion-MNIST test ({fp.total} images), fixture {args.model}, {args.num_samples} calibration images, "
          f"seed {args.seed}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| setting | top-1 | ratio to FP | checkpoint bytes | quantized layers vs fp16 | quantize + calibrate (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        layer = "-" if r["layer_ratio_vs_fp16"] is None else f"{r['layer_ratio_vs_fp16']:.3f}x"
        print(f"| {r['label']} | {100 * r['top1']:.2f}% | {r['ratio_to_fp']:.4f} | {r['checkpoint_bytes']:,} | "
              f"{layer} | {r['calib_seconds']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
