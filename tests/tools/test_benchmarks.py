"""The benchmark scripts the README quotes keep working (on CPU: the kernel benchmark's --smoke mode runs the real
code path through the Triton interpreter at toy sizes; the numbers themselves come from GPU runs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_kernel_benchmark_smoke_prints_every_variant(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_kernels.py"), "--smoke", "--json",
                          str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md")], env=env,
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| Vim-")]
    variants = {line.split("|")[3].strip() for line in rows}
    assert {"W8A8", "W4A8", "W4A16", "VQ2"} <= variants, variants
    result = json.loads((tmp_path / "b.json").read_text())
    assert (tmp_path / "b.md").read_text() in res.stdout  # the tables printed are the tables written
    assert {r["variant"] for r in result["rows"]} == {"fp32", "W8A8", "W4A8", "W4A16", "VQ2"}
    for row in result["rows"]:
        assert row["forward_ms"] > 0 and re.search(r"\d+\.\d+x", f"{row['speedup']:.2f}x")
        kernels = {k["kernel"]: k for k in row["kernels"]}
        # every block linear and the scan of block 0 were recorded and replayed (both directions: two launches)
        assert {"in_proj", "x_proj", "dt_proj", "out_proj", "scan (one direction)"} <= set(kernels), kernels
        assert kernels["x_proj"]["launches"] == 2 and kernels["scan (one direction)"]["launches"] == 2
        assert all(k["ms"] > 0 for k in kernels.values())
        assert ("combine" in kernels) == (row["variant"] in ("W8A8", "W4A8"))  # the fused int8 combine


def test_kernel_benchmark_without_gpu_says_so():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_kernels.py")], env=env,
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    if res.returncode == 0:  # a CUDA machine: the real table
        assert "| Vim-T |" in res.stdout
    else:
        assert "CUDA" in (res.stdout + res.stderr) and "--smoke" in (res.stdout + res.stderr)


def test_cpu_benchmark_split_and_timing_restore_the_model(tiny_vim_dir):
    import importlib.util

    import torch
    from transformers import AutoModelForImageClassification

    from optimum_vim import ViMQuantizationConfig

    spec = importlib.util.spec_from_file_location("cpu_bench", REPO / "benchmarks" / "cpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = ViMQuantizationConfig(weight_bits=8, act_bits=8, calibration_dataset=torch.randn(8, 1, 28, 28))
    models = {"float32": AutoModelForImageClassification.from_pretrained(tiny_vim_dir).eval(),
              "W8A8": AutoModelForImageClassification.from_pretrained(tiny_vim_dir, quantization_config=cfg).eval()}
    times = bench.time_models(models, batch=2, repeats=1, warmup=0)
    assert set(times) == {("float32", "float32"), ("W8A8", "reference"), ("W8A8", "auto"), ("W8A8", "int_mm"),
                          ("W8A8", "sgemm")}
    assert all(v > 0 for v in times.values())
    linears = bench.linear_times(models, batch=2, repeats=1, warmup=0)
    assert {(leaf, label) for leaf, label, _ in linears} == {(leaf, label) for leaf in ("in_proj", "x_proj", "dt_proj",
                                                             "out_proj") for label in models}
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        before = models["W8A8"](x).logits
    split = bench.op_split(models["W8A8"], batch=2, repeats=1)
    assert split["block linears (quantizers + GEMM)"] > split["  of which input quantizers"] > 0
    assert split["selective scans"] > 0 and split["total"] > split["selective scans"]
    iq = models["W8A8"].vim.layers[0].mixer.in_proj.input_quantizer
    assert "forward" not in iq.__dict__ and "row_quantize" not in iq.__dict__  # timers removed
    with torch.no_grad():
        assert torch.equal(models["W8A8"](x).logits, before)


@pytest.mark.slow
def test_memory_benchmark_smoke_runs_fresh_processes(tmp_path):
    """benchmarks/memory.py end to end at toy sizes: one fresh process per row; VQ layers keep no decode
    cache by default, and the opt-in rows show the fp32 cache in get_memory_footprint()."""
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "memory.py"), "--model", "smoke", "--formats",
                          "float32", "vq2", "--workdir", str(tmp_path)], capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {}
    for line in res.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ("float32", "vq2"):
            rows[(cells[0], cells[1])] = [float(c.rstrip("x")) for c in cells[2:]]
    assert set(rows) == {("float32", "-"), ("vq2", "packed (default)"), ("vq2", "fp32 decode cache (opt-in)")}
    packed, cached = rows[("vq2", "packed (default)")], rows[("vq2", "fp32 decode cache (opt-in)")]
    assert packed[-1] == 0 < cached[-1]  # decode caches (MB)
    assert cached[-2] >= packed[-2] + cached[-1] - 0.01  # get_memory_footprint counts the cache
    assert packed[0] < rows[("float32", "-")][0]  # smaller checkpoint than float


def test_every_accuracy_row_is_a_valid_config_and_seeds_aggregate():
    """Each row of benchmarks/accuracy.py (paper presets and official-code switches included) builds its config and
    its recipe's options; rows at <= 4-bit activations aggregate their seeds as mean ± sample std."""
    import importlib.util

    import torch

    from optimum_vim import ViMQuantizationConfig
    from optimum_vim.recipes import get_recipe_class

    spec = importlib.util.spec_from_file_location("acc_bench", REPO / "benchmarks" / "accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    labels = [r["label"] for rows in bench.SUITES.values() for r in rows]
    for rows in bench.SUITES.values():
        for r in rows:
            kwargs = {"calibration_dataset": torch.zeros(1, 1, 28, 28), **r["config"]}
            cfg = ViMQuantizationConfig(recipe=r["recipe"], weight_bits=r["weight_bits"], act_bits=r["act_bits"],
                                        **kwargs)
            get_recipe_class(r["recipe"]).from_config(cfg)
    assert sum("paper preset" in label for label in labels) >= 4  # OuroMamba (A4, A8, real data) and kscale
    assert [r["label"] for r in bench.select_rows("ptq4vm", "=PTQ4VM W4A4")] == ["PTQ4VM W4A4"]
    # ';' separates when a label holds a comma: exactly the real-data paper row and the frozen-S6 row
    picked = [r["label"] for r in bench.select_rows("ouromamba", "=OuroMamba W4A4O8 real data, paper preset;S6 steps")]
    assert picked == ["OuroMamba W4A4O8 real data, S6 steps frozen", "OuroMamba W4A4O8 real data, paper preset"]
    runs = [{"label": "x", "seed": s, "top1": t, "ratio_to_fp": t, "sqnr_db": 10.0 + s, "agreement": 0.9,
             "calib_seconds": 1.0, "calib_peak_mb": float(s)} for s, t in ((0, 0.8), (1, 0.9), (2, 1.0))]
    row = bench.aggregate(runs)
    assert row["seeds"] == [0, 1, 2] and abs(row["top1"] - 0.9) < 1e-12 and abs(row["top1_std"] - 0.1) < 1e-12
    assert bench._pm(row, "top1", 100) == "90.00 ± 10.00" and row["calib_peak_mb"] == 2.0
    assert bench._pm(bench.aggregate(runs[:1]), "top1", 100) == "80.00"
