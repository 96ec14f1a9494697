"""Tuned launch configurations: the table's keys and lookup, the launchers' config override (same results), and
``benchmarks/gpu_kernels.py --tune`` writing a table the kernels accept (interpreter, toy shapes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from optimum_vim_kernels import gemm, reference, scan, tuning
from optimum_vim_kernels.format import pack_signed

REPO = Path(__file__).resolve().parents[2]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_buckets_names_and_variants():
    assert [tuning.bucket(m) for m in (1, 197, 256, 257, 197 * 64, 730 * 64)] == [1, 256, 256, 512, 16384, 65536]
    assert tuning.bucket(10**9) == tuning.MAX_BUCKET
    assert tuning.device_slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert tuning.gemm_variant(bits=4, int_activations=True, act_dtype_name="int8", group_size=None, vector_dim=None,
                               requant=False) == "i8-w4"
    assert tuning.gemm_variant(bits=4, int_activations=False, act_dtype_name="float16", group_size=128,
                               vector_dim=None, requant=False) == "float16-w4-g128"
    assert tuning.gemm_variant(bits=8, int_activations=False, act_dtype_name="float16", group_size=None,
                               vector_dim=4, requant=False) == "float16-vq8x4"
    assert tuning.scan_variant(int_inputs=True, state_quant=True) == "int8-hq"


def test_lookup_takes_the_nearest_tuned_bucket():
    table = {"quant_gemm": {"i8-w8": {"768x192": {"256": [16, 64, 64, 4, 3], "16384": [128, 128, 64, 8, 3]}}}}
    look = lambda m: tuning.lookup(table, "quant_gemm", "i8-w8", (768, 192), m)  # noqa: E731
    assert look(197) == [16, 64, 64, 4, 3] and look(197 * 64) == [128, 128, 64, 8, 3]
    assert look(730) == [16, 64, 64, 4, 3]  # bucket 1024: two steps from 256, four from 16384
    assert look(730 * 64) == [128, 128, 64, 8, 3]
    assert tuning.lookup(table, "quant_gemm", "i8-w4", (768, 192), 197) is None
    assert tuning.lookup(table, "quant_gemm", "i8-w8", (192, 384), 197) is None


def test_table_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"quant_gemm": {"x": {}}}))
    monkeypatch.setenv(tuning.ENV_VAR, str(path))
    assert tuning.table_for("any GPU") == {"quant_gemm": {"x": {}}}
    monkeypatch.setenv(tuning.ENV_VAR, str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match=tuning.ENV_VAR):
        tuning.table_for("any GPU")
    monkeypatch.delenv(tuning.ENV_VAR)
    assert tuning.table_for("a GPU nobody tuned") == {}
    assert tuning.cuda_table(torch.device("cpu")) == {}
    assert tuning.cuda_lookup(torch.device("cpu"), "quant_gemm", "i8-w8", (768, 192), 197) is None


def test_launch_configs_are_checked():
    assert gemm.check_launch_config([64, 128, 64, 4, None], group=None, int_a=True) == (64, 128, 64, 4, None)
    assert gemm.check_launch_config((64, 64, 128, 8, 3), group=128, int_a=False) == (64, 64, 128, 8, 3)
    for bad, group, int_a in [((48, 64, 64, 4, 3), None, False), ((64, 64, 64, 4, 3), 128, False),
                              ((64, 64, 16, 4, 3), None, True), ((8, 64, 64, 4, 3), None, False),
                              ((64, 64, 64, 4, 9), None, False)]:
        with pytest.raises(ValueError, match="launch config"):
            gemm.check_launch_config(bad, group=group, int_a=int_a)
    assert scan.check_scan_config([32, 2]) == (32, 2)
    for bad in ((24, 2), (512, 4), (32, 3)):
        with pytest.raises(ValueError, match="launch config"):
            scan.check_scan_config(bad)


@pytest.mark.parametrize("bits", [8, 4])
def test_any_valid_gemm_config_gives_the_same_integer_result(bits):
    m, n, k = 37, 45, 100
    g = torch.Generator().manual_seed(0)
    hi = (1 << (bits - 1)) - 1
    codes = torch.randint(-hi, hi + 1, (n, k), generator=g)
    qw = codes.to(torch.int8) if bits == 8 else pack_signed(codes, bits)
    ws, a = torch.rand(n, 1, generator=g) + 0.05, torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    kw = dict(bits=bits, in_features=k, a_scale=torch.rand(m, generator=g) + 0.01)
    ref = reference.quant_gemm_ref(a, qw, ws, **kw)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    outs = [gemm.quant_gemm(dev(a), dev(qw), dev(ws), **{**kw, "a_scale": dev(kw["a_scale"])}, config=c).cpu()
            for c in [(16, 16, 32, 4, 2), (64, 32, 64, 8, None), (32, 64, 128, 4, 3)]]
    for out in outs:  # integer accumulation is exact whatever the tiling
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


def test_scan_config_override_keeps_the_result():
    g = torch.Generator().manual_seed(0)
    b, length, e, n = 2, 9, 32, 4
    u, z = torch.randn(b, length, e, generator=g), torch.randn(b, length, e, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(b, length, e, generator=g))
    A, D = -(torch.rand(e, n, generator=g) + 0.1), torch.randn(e, generator=g)
    B, C = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g)
    args = [t.to(DEVICE) for t in (u, delta, A, B, C, D, z)]
    ref = reference.selective_scan_q_ref(u, delta, A, B, C, D, z)
    for config in [(8, 1), (32, 4)]:  # channels split over 4 programs or 1: each channel's recurrence is the same
        out = scan.selective_scan_q(*args, config=config).cpu()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_tune_smoke_writes_a_table_the_kernels_accept(tmp_path):
    out = tmp_path / "tuned.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_kernels.py"), "--smoke", "--tune",
                          "--formats", "w8a8", "w4a16", "--tune-out", str(out)],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    table = json.loads(out.read_text())
    assert table["complete"] and table["file"].startswith("kernels/optimum_vim_kernels/tuned/")
    assert set(table["quant_gemm"]) == {"i8-w8", "float32-w4-g32", "float32-w4"}  # dt_proj's K=2 < one group
    for variant, shapes in table["quant_gemm"].items():
        group = 32 if variant.endswith("-g32") else None
        for entries in shapes.values():
            for m_bucket, config in entries.items():
                assert int(m_bucket) == tuning.bucket(int(m_bucket))
                gemm.check_launch_config(config, group=group, int_a=variant.startswith("i8"))
    assert set(table["selective_scan_q"]) == {"float", "int8"}
    for shapes in table["selective_scan_q"].values():
        for entries in shapes.values():
            for config in entries.values():
                scan.check_scan_config(config)
    assert all(r["best_ms"] <= r["default_ms"] for r in table["measured"])  # the built-in choice is a candidate
