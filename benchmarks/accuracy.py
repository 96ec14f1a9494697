"""Accuracy / fidelity / size / calibration-time table of the quantization recipes on the bundled Fashion-MNIST fixtures.

Every row quantizes the float fixture inside ``from_pretrained`` (calibration: seeded images from the training
split, or none for data-free rows), saves it (packed safetensors) and evaluates it on the test split; all rows are
measured in one run, beside the float model. Top-1 saturates on this small model at 8-bit activations, so every row
also reports how close the quantized logits stay to the float ones:

* **logit SQNR (dB)**: ``10 log10(sum(fp^2) / sum((q - fp)^2))`` over all test logits;
* **agreement**: fraction of test images whose quantized top-1 class equals the float model's.

    python benchmarks/accuracy.py                          # every suite (full 10k test split)
    python benchmarks/accuracy.py --suite rtn --limit 2000 --json out.json
    python benchmarks/accuracy.py --only "W4A4"            # rows whose label contains a substring
    python benchmarks/accuracy.py --suite ouromamba --seeds 0,1,2   # <= 4-bit activation rows: mean ± std of 3 seeds
    python benchmarks/accuracy.py --suite mambavision --seeds 0,1,2  # every recipe on the MambaVision fixture

The ``mambavision`` suite runs on the bundled MambaVision fixture (``checkpoints/mambavision-fashion-mnist``), the
others on the Vim fixture; a run takes the suites of one fixture (the default: every Vim suite).

Rows whose label says "paper preset" use ``recipe_args={"preset": "paper"}``, the configuration closest to the
official code; the other rows of a recipe are our defaults or one option changed (the label names it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

import optimum_vim  # noqa: F401
from optimum_vim import ViMQuantizationConfig
from optimum_vim.evaluation import iter_batches, load_named_dataset
from optimum_vim.size import checkpoint_bytes, quantized_layer_bytes

FIXTURE = Path(__file__).resolve().parents[1] / "checkpoints" / "vim-fashion-mnist"
MAMBAVISION_FIXTURE = Path(__file__).resolve().parents[1] / "checkpoints" / "mambavision-fashion-mnist"


def row(label: str, recipe: str, weight_bits: int, act_bits: int | None = None, **config) -> dict:
    """One table row: a label and the ``ViMQuantizationConfig`` keyword arguments (``num_calibration_samples``
    defaults to ``--num-samples``; ``calibration_dataset=None`` in ``config`` makes the row data-free)."""
    return {"label": label, "recipe": recipe, "weight_bits": weight_bits, "act_bits": act_bits, "config": config}


# suites of rows, by recipe; `--suite` selects some, `--only` filters labels
SUITES: dict[str, list[dict]] = {
    "rtn": [
        row("RTN W8A8", "rtn", 8, 8),
        row("RTN W6A6", "rtn", 6, 6),
        row("RTN W4A8", "rtn", 4, 8),
        row("RTN W4A4", "rtn", 4, 4),
        row("RTN W4A4 pct99.9", "rtn", 4, 4, recipe_args={"observer": "percentile", "percentile": 99.9}),
        row("RTN W4A4 per-token", "rtn", 4, 4, recipe_args={"act_granularity": "token"}),
        row("RTN W8 (weight-only)", "rtn", 8),
        row("RTN W4 (weight-only)", "rtn", 4),
        row("RTN W4 g32", "rtn", 4, weight_group_size=32),
        row("RTN W3 (weight-only)", "rtn", 3),
        row("RTN W3 g32", "rtn", 3, weight_group_size=32),
        row("RTN W2 (weight-only)", "rtn", 2),
        row("RTN W2 g32", "rtn", 2, weight_group_size=32),
        row("RTN W1 g32 (binary)", "rtn", 1, weight_group_size=32),
    ],
    # PTQ4VM (256 calibration images, its default) beside RTN per-token static scales at the same bits; then the
    # W4A4 ablation: PTS only -> + smoothing -> + JLSS (= "PTQ4VM W4A4"); RTN W4A4 min-max / pct / per-token: "rtn";
    # then the magnitude-aware JLSS loss
    "ptq4vm": [
        row("RTN W8A8 per-token", "rtn", 8, 8, recipe_args={"act_granularity": "token"}),
        row("PTQ4VM W8A8", "ptq4vm", 8, 8),
        row("RTN W6A6 per-token", "rtn", 6, 6, recipe_args={"act_granularity": "token"}),
        row("PTQ4VM W6A6", "ptq4vm", 6, 6),
        row("RTN W4A8 per-token", "rtn", 4, 8, recipe_args={"act_granularity": "token"}),
        row("PTQ4VM W4A8", "ptq4vm", 4, 8),
        row("PTQ4VM W4A4 PTS only", "ptq4vm", 4, 4, recipe_args={"smoothing": False, "jlss": False}),
        row("PTQ4VM W4A4 PTS + smoothing", "ptq4vm", 4, 4, recipe_args={"jlss": False}),
        # the official grid init: candidates scored unwidened, only the winner widened to include 0
        row("PTQ4VM W4A4 PTS + smoothing, zero added to the winner (official)", "ptq4vm", 4, 4,
            recipe_args={"jlss": False, "widen_to_zero": "winner"}),
        row("PTQ4VM W4A4", "ptq4vm", 4, 4),
        row("PTQ4VM W4A4, zero added to the winner (official)", "ptq4vm", 4, 4,
            recipe_args={"widen_to_zero": "winner"}),
        # not in the paper: JLSS on the normalised squared error instead of 1 - cos (recipe_args loss="nmse")
        row("PTQ4VM W4A8 nmse loss", "ptq4vm", 4, 8, recipe_args={"loss": "nmse"}),
        row("PTQ4VM W4A4 nmse loss", "ptq4vm", 4, 4, recipe_args={"loss": "nmse"}),
    ],
    # k-scaled PTQ (the recipe's default 256 calibration images, as the paper; --num-samples lowers it for a quick
    # run): the full recipe, the paper preset (closest to the official code), each of its four differences alone,
    # its MinMax baseline, each component removed in turn, and RTN W8A8 beside it
    "kscale": [
        row("kscale W8A8 + 8-bit h", "kscale", 8, 8),
        row("kscale W8A8 + 8-bit h paper preset", "kscale", 8, 8, recipe_args={"preset": "paper"}),
        row("kscale y searched on the 8-bit-state scan (official)", "kscale", 8, 8,
            recipe_args={"y_search": "quantized_state"}),
        row("kscale state search scores y / r_C (official)", "kscale", 8, 8, recipe_args={"state_score": "y_over_rc"}),
        row("kscale searches score every image (official)", "kscale", 8, 8, recipe_args={"search_images": None}),
        row("kscale power-of-two snapped after the search (official)", "kscale", 8, 8,
            recipe_args={"power_of_two": "snap_after"}),
        row("kscale MinMax baseline W8A8 + 8-bit h", "kscale", 8, 8,
            recipe_args={"num_clusters": 1, "scale_search": "minmax", "reparameterize": False}),
        row("kscale without k-scaling (k=1)", "kscale", 8, 8, recipe_args={"num_clusters": 1}),
        row("kscale without search (max-abs)", "kscale", 8, 8, recipe_args={"scale_search": "minmax"}),
        row("kscale without reparameterisation", "kscale", 8, 8, recipe_args={"reparameterize": False}),
        row("kscale W8A8, h in float", "kscale", 8, 8, recipe_args={"state_bits": None}),
        row("RTN W8A8 (kscale suite)", "rtn", 8, 8),
    ],
    # ViM-VQ beside RTN at the same bits (per channel and g32: the size budget of the codebook layers)
    "vimvq": [
        row("RTN W3 (weight-only)", "rtn", 3),
        row("RTN W3 g32", "rtn", 3, weight_group_size=32),
        row("VQ W3 k-means", "vimvq", 3, calibration_dataset=None, recipe_args={"convex": False, "incremental": False}),
        row("ViM-VQ W3", "vimvq", 3),
        row("RTN W2 (weight-only)", "rtn", 2),
        row("RTN W2 g32", "rtn", 2, weight_group_size=32),
        row("VQ W2 k-means", "vimvq", 2, calibration_dataset=None, recipe_args={"convex": False, "incremental": False}),
        row("VQ W2 + convex", "vimvq", 2, recipe_args={"incremental": False}),
        row("ViM-VQ W2 (+ convex + incremental)", "vimvq", 2),
        # VQ4DiT's one-hot regulariser mean pi (1 - pi), off by default
        row("ViM-VQ W2 + one-hot regulariser (VQ4DiT)", "vimvq", 2, recipe_args={"onehot_regularizer": True}),
        row("RTN W1 g32 (binary)", "rtn", 1, weight_group_size=32),
        row("VQ W1 k-means", "vimvq", 1, calibration_dataset=None, recipe_args={"convex": False, "incremental": False}),
        row("ViM-VQ W1", "vimvq", 1),
    ],
    # data-free rows: calibration_dataset=None, the recipe generates its own set (OuroMamba-Gen); --gen-iterations
    # shortens the generation of every such row (the paper's 1000 iterations take about an hour per row on 2 cores)
    # "paper preset" rows: recipe_args={"preset": "paper"}, the configuration closest to the official code (every
    # switch below on the official side); the "real data" rows (the recipe's default 128 seeded training images, or
    # --num-samples) isolate one quantization-stage switch each
    "ouromamba": [
        row("OuroMamba W4A8O16 (128 synthetic)", "ouromamba", 4, 8, calibration_dataset=None),
        row("OuroMamba W4A8O16 paper preset (128 synthetic)", "ouromamba", 4, 8, calibration_dataset=None,
            recipe_args={"preset": "paper"}),
        row("OuroMamba W4A4O8 (128 synthetic)", "ouromamba", 4, 4, calibration_dataset=None),
        row("OuroMamba W4A4O8 paper preset (128 synthetic)", "ouromamba", 4, 4, calibration_dataset=None,
            recipe_args={"preset": "paper"}),
        # OuroMamba-Gen patching the hidden states (official state_fusion) instead of the attention vectors
        row("OuroMamba W4A4O8 state patching (128 synthetic)", "ouromamba", 4, 4, calibration_dataset=None,
            recipe_args={"gen_patching": "state"}),
        row("OuroMamba W4A4O8 static outliers", "ouromamba", 4, 4, calibration_dataset=None,
            recipe_args={"dynamic_outliers": False}),
        row("OuroMamba W4A4O8 no InfoNCE (class loss only)", "ouromamba", 4, 4, calibration_dataset=None,
            recipe_args={"contrastive_weight": 0.0}),
        # the generation without the image priors (jitter, flip, TV) the paper does not mention: its loss alone
        row("OuroMamba W4A4O8 no image priors (paper's loss only)", "ouromamba", 4, 4, calibration_dataset=None,
            recipe_args={"gen_jitter": 0, "gen_flip": False, "gen_tv_weight": 0.0}),
        row("OuroMamba W4A4O8 real data (128 images)", "ouromamba", 4, 4),
        # the official training loop: S6 inlier steps left at their grid init (real data, so no generation)
        row("OuroMamba W4A4O8 real data, S6 steps frozen", "ouromamba", 4, 4, recipe_args={"train_scan_steps": False}),
        row("OuroMamba W4A4O8 real data, Δ quantized before softplus (official)", "ouromamba", 4, 4,
            recipe_args={"delta_before_softplus": True}),
        row("OuroMamba W4A4O8 real data, scan input u in float (official)", "ouromamba", 4, 4,
            recipe_args={"quantize_scan_u": False}),
        row("OuroMamba W4A4O8 real data, Δ range trigger + affine outliers (official)", "ouromamba", 4, 4,
            recipe_args={"delta_outliers": "range"}),
        row("OuroMamba W4A4O8 real data, init threshold on raw |x| (official)", "ouromamba", 4, 4,
            recipe_args={"calibration_threshold": "raw"}),
        row("OuroMamba W4A4O8 real data, Δ grid zero added to the winner (official)", "ouromamba", 4, 4,
            recipe_args={"widen_to_zero": "winner"}),
        row("OuroMamba W4A4O8 real data, official step training", "ouromamba", 4, 4,
            recipe_args={"step_training": "official"}),
        row("OuroMamba W4A4O8 real data, paper preset", "ouromamba", 4, 4, recipe_args={"preset": "paper"}),
    ],
}

def logit_sqnr_db(fp: torch.Tensor, q: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of the logits in dB (inf when identical, nan when q is non-finite)."""
    noise = (q.double() - fp.double()).pow(2).sum().item()
    signal = fp.double().pow(2).sum().item()
    if not math.isfinite(noise):
        return float("nan")
    return float("inf") if noise == 0 else 10 * math.log10(signal / noise)


@torch.no_grad()
def logits_on(model, pixel_values: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(pixel_values[i : i + batch_size]).logits.float()
                      for i in range(0, pixel_values.shape[0], batch_size)])


class PeakRSS:
    """Peak resident memory of this process above its level at entry, sampled every 5 ms (Linux /proc; 0 elsewhere).
    Rows run one after another in one process, so each row's figure is its own quantize + calibrate peak."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def megabytes(self) -> float:
        return (self.peak - self.start) / 2**20

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0


_METRICS = ("top1", "ratio_to_fp", "sqnr_db", "agreement")


# every recipe beside RTN on the MambaVision fixture (default linears: the mixers' four and the token blocks' attention
# and MLP linears; kscale: the mixers). OuroMamba data-free: OuroMamba-Gen reads the implicit attention of the pooled
# output (MambaVision has no class token), and beside it on 128 real images.
SUITES["mambavision"] = [
    row("RTN W8A8", "rtn", 8, 8),
    row("RTN W4A8", "rtn", 4, 8),
    row("RTN W4A8 per-token", "rtn", 4, 8, recipe_args={"act_granularity": "token"}),
    row("RTN W4A4", "rtn", 4, 4),
    row("RTN W4A4 per-token", "rtn", 4, 4, recipe_args={"act_granularity": "token"}),
    row("RTN W4 (weight-only)", "rtn", 4),
    row("RTN W3 g32", "rtn", 3, weight_group_size=32),
    row("RTN W2 g32", "rtn", 2, weight_group_size=32),
    row("PTQ4VM W4A8", "ptq4vm", 4, 8),
    row("PTQ4VM W4A4", "ptq4vm", 4, 4),
    # where the W4A4 logit error comes from: the grid init alone, and JLSS on the magnitude-aware loss
    row("PTQ4VM W4A4 PTS + smoothing (no JLSS)", "ptq4vm", 4, 4, recipe_args={"jlss": False}),
    row("PTQ4VM W4A4 loss=nmse", "ptq4vm", 4, 4, recipe_args={"loss": "nmse"}),
    row("kscale W8A8", "kscale", 8, 8),
    row("OuroMamba W4A8O16 (128 synthetic)", "ouromamba", 4, 8, calibration_dataset=None),
    row("OuroMamba W4A4O8 (128 synthetic)", "ouromamba", 4, 4, calibration_dataset=None),
    row("OuroMamba W4A4O8 paper preset (128 synthetic)", "ouromamba", 4, 4, calibration_dataset=None,
        recipe_args={"preset": "paper"}),
    row("OuroMamba W4A4O8 no InfoNCE (class loss only)", "ouromamba", 4, 4, calibration_dataset=None,
        recipe_args={"contrastive_weight": 0.0}),
    row("OuroMamba W4A8O16 real data (128 images)", "ouromamba", 4, 8),
    row("OuroMamba W4A4O8 real data (128 images)", "ouromamba", 4, 4),
    row("OuroMamba W4A4O8 real data, loss=nmse", "ouromamba", 4, 4, recipe_args={"loss": "nmse"}),
    row("VQ W2 k-means", "vimvq", 2, calibration_dataset=None, recipe_args={"convex": False, "incremental": False}),
    row("ViM-VQ W3", "vimvq", 3),
    row("ViM-VQ W2 (+ convex + incremental)", "vimvq", 2),
]
# suites that run on another fixture than the Vim one
SUITE_MODELS = {"mambavision": MAMBAVISION_FIXTURE}


def measure(setting: dict, seed: int, args, calib, processor, pixels, labels, fp_logits, fp_pred, fp_top1) -> dict:
    """Quantizes the fixture with one row's config and calibration ``seed``, saves it, evaluates it."""
    kwargs = {"calibration_dataset": calib, "image_processor": processor,
              "num_calibration_samples": args.num_samples, "seed": seed, **setting["config"]}
    if setting["recipe"] == "ouromamba":
        quick = {k: v for k, v in (("gen_iterations", args.gen_iterations), ("num_synthetic", args.num_synthetic))
                 if v is not None}
        kwargs["recipe_args"] = {**quick, **kwargs.get("recipe_args", {})}
    cfg = ViMQuantizationConfig(recipe=setting["recipe"], weight_bits=setting["weight_bits"],
                                act_bits=setting["act_bits"], **kwargs)
    start = time.perf_counter()
    with PeakRSS() as mem:
        model = AutoModelForImageClassification.from_pretrained(args.model, quantization_config=cfg)
    calib_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, model_card=False)
        size = checkpoint_bytes(tmp)
    sizes = quantized_layer_bytes(model)
    logits = logits_on(model, pixels)
    pred = logits.argmax(-1)
    top1 = (pred == labels).float().mean().item()
    return {
        "label": setting["label"], "recipe": setting["recipe"], "weight_bits": setting["weight_bits"],
        "act_bits": setting["act_bits"], "seed": seed, "top1": top1, "ratio_to_fp": top1 / fp_top1,
        "sqnr_db": logit_sqnr_db(fp_logits, logits), "agreement": (pred == fp_pred).float().mean().item(),
        "checkpoint_bytes": size, "layer_ratio_vs_fp16": sizes["ratio"], "layer_bytes": sizes["quantized"],
        "bits_per_weight": sizes["bits_per_weight"], "calib_seconds": calib_s, "calib_peak_mb": mem.megabytes,
    }


def aggregate(runs: list[dict]) -> dict:
    """One table row from the runs of a setting (one per seed): metrics are means with ``<metric>_std`` (sample std)
    and ``<metric>_runs``; sizes are the first run's (equal across seeds); time and memory are the mean / max."""
    out = dict(runs[0])
    out["seeds"] = [r["seed"] for r in runs]
    del out["seed"]
    if len(runs) > 1:
        for key in _METRICS:
            values = torch.tensor([r[key] for r in runs], dtype=torch.float64)
            out[key], out[f"{key}_std"], out[f"{key}_runs"] = values.mean().item(), values.std().item(), values.tolist()
        out["calib_seconds"] = sum(r["calib_seconds"] for r in runs) / len(runs)
        out["calib_peak_mb"] = max(r["calib_peak_mb"] for r in runs)
    return out


def _pm(r: dict, key: str, scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` of a metric over seeds, or the single value."""
    text = f"{scale * r[key]:.{digits}f}"
    return text + (f" ± {scale * r[key + '_std']:.{digits}f}" if f"{key}_std" in r else "")


def suite_names(suites: str | None) -> list[str]:
    """The suites ``--suite`` names (default: every suite of the Vim fixture)."""
    names = [n for n in SUITES if n not in SUITE_MODELS] if not suites else [s.strip() for s in suites.split(",")]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise SystemExit(f"unknown suite(s) {unknown}; suites: {sorted(SUITES)}")
    return names


def suite_model(names: list[str]) -> Path:
    """The fixture the suites run on; suites of different fixtures are refused together."""
    models = {SUITE_MODELS.get(n, FIXTURE) for n in names}
    if len(models) > 1:
        raise SystemExit(f"suites {names} run on different fixtures ({sorted(str(m) for m in models)}); run "
                         f"{sorted(SUITE_MODELS)} on its own (--suite mambavision)")
    return models.pop()


def select_rows(suites: str | None, only: str | None) -> list[dict]:
    rows = [r for n in suite_names(suites) for r in SUITES[n]]
    if only:  # substrings of labels; "=label" selects that exact label; ";" separates when a label has a comma
        keys = [k.strip().lower() for k in only.split(";" if ";" in only else ",") if k.strip()]
        rows = [r for r in rows if any(r["label"].lower() == k[1:] if k.startswith("=") else k in r["label"].lower()
                                       for k in keys)]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="float checkpoint (default: the fixture of the selected suites)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--num-samples", type=int, default=None,
                   help="calibration images of rows that set none (default: each recipe's, 128 RTN, 256 PTQ4VM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default=None,
                   help="comma-separated calibration seeds for rows with <= 4-bit activations (their metrics are "
                        "reported as mean ± sample std); other rows use the first. Default: --seed alone")
    p.add_argument("--suite", default=None, help=f"comma-separated suites (default: all of {sorted(SUITES)})")
    p.add_argument("--only", default=None,
                   help="comma-separated substrings selecting rows by label ('=LABEL': that exact label; separate with "
                        "';' instead when a label holds a comma)")
    p.add_argument("--json", default=None, help="also write the rows as JSON (for model-card plots)")
    p.add_argument("--gen-iterations", type=int, default=None,
                   help="OuroMamba-Gen iterations of the data-free rows (default: the recipe's 1000)")
    p.add_argument("--num-synthetic", type=int, default=None,
                   help="OuroMamba-Gen images of the data-free rows (default: the recipe's 128; quick runs only)")
    args = p.parse_args(argv)
    settings = select_rows(args.suite, args.only)
    args.model = args.model or str(suite_model(suite_names(args.suite)))

    processor = AutoImageProcessor.from_pretrained(args.model)
    test = load_named_dataset("fashion-mnist", "test", args.limit)
    calib = load_named_dataset("fashion-mnist", "train")
    batches = list(iter_batches(test, processor, 1000))
    pixels = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    fp_model = AutoModelForImageClassification.from_pretrained(args.model)
    fp_logits = logits_on(fp_model, pixels)
    fp_pred = fp_logits.argmax(-1)
    fp_top1 = (fp_pred == labels).float().mean().item()
    rows = [{"label": "float32", "recipe": "fp", "weight_bits": 32, "act_bits": None, "top1": fp_top1,
             "ratio_to_fp": 1.0, "sqnr_db": float("inf"), "agreement": 1.0,
             "checkpoint_bytes": checkpoint_bytes(args.model), "layer_ratio_vs_fp16": None, "layer_bytes": None,
             "bits_per_weight": 32.0, "calib_seconds": 0.0,
             "calib_peak_mb": 0.0}]
    seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else [args.seed]
    for setting in settings:
        low_bits = setting["act_bits"] is not None and setting["act_bits"] <= 4
        runs = [measure(setting, seed, args, calib, processor, pixels, labels, fp_logits, fp_pred, fp_top1)
                for seed in (seeds if low_bits else seeds[:1])]
        rows.append(aggregate(runs))
        r = rows[-1]
        print(f"{setting['label']}: {_pm(r, 'top1', 100)}%  SQNR {_pm(r, 'sqnr_db')} dB  agreement "
              f"{_pm(r, 'agreement', 100)}%  {r['calib_seconds']:.1f} s  {r['calib_peak_mb']:.0f} MB  "
              f"(seeds {r['seeds']})", flush=True)
        if args.json:  # written after every row, so that an interrupted run keeps what it measured
            Path(args.json).write_text(json.dumps(rows, indent=1, default=str) + "\n")

    from optimum_vim_kernels.cpu_features import describe_cpu

    from optimum_vim.calibration.blockwise import CALIBRATION_THREADS

    print(f"\n{describe_cpu()}")
    print(f"Fashion-MNIST test ({labels.numel()} images), fixture {args.model}, calibration images: "
          f"{args.num_samples or 'each recipe default'} unless a row says otherwise, seed(s) {seeds} (rows at <= 4-bit "
          f"activations: mean ± sample std over all seeds), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads ({CALIBRATION_THREADS} in block-wise calibration), "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| setting | top-1 | ratio to FP | logit SQNR (dB) | agreement with FP | checkpoint bytes "
          "| quantized layers vs fp16 | quantized layer bytes | bits/weight | quantize + calibrate (s) | peak memory (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        layer = "-" if r["layer_ratio_vs_fp16"] is None else f"{r['layer_ratio_vs_fp16']:.3f}x"
        layer_bytes = "-" if r["layer_bytes"] is None else f"{r['layer_bytes']:,}"
        sqnr = "-" if math.isinf(r["sqnr_db"]) else f"{r['sqnr_db']:.2f}"
        if len(r.get("seeds", [])) > 1:
            sqnr = _pm(r, "sqnr_db")
        print(f"| {r['label']} | {_pm(r, 'top1', 100)}% | {_pm(r, 'ratio_to_fp', 1, 4)} | {sqnr} | "
              f"{_pm(r, 'agreement', 100)}% | {r['checkpoint_bytes']:,} | {layer} | {layer_bytes} | "
              f"{r['bits_per_weight']:.3f} | {r['calib_seconds']:.1f} | {r['calib_peak_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
