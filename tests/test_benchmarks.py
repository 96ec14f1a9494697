"""The benchmark scripts the README quotes keep working (on CPU: the kernel benchmark's --smoke mode runs the real
code path through the Triton interpreter at toy sizes; the numbers themselves come from GPU runs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
    assert set(times) == {("float32", "auto"), ("W8A8", "reference"), ("W8A8", "auto")}
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
