"""The float model's scan on CUDA (mamba-ssm, else our Triton scan, else the PyTorch loop with one warning) and the
command line's --device / --dtype.

The choice is tested on CPU through :func:`optimum_vim.ops.dispatch.float_scan_backend` (which never looks at the
tensor's device: ``selective_scan`` asks it for CUDA tensors only), with the availability of mamba-ssm / Triton
switched by monkeypatching; the Triton scan that the choice routes float inputs to is run for real (interpreter on
CPU, compiled on a GPU) against the PyTorch loop. The ``gpu`` tests run in ``benchmarks/gpu_check.sh``."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open

from optimum_vim.cli import main, resolve_device, resolve_dtype
from optimum_vim.ops import dispatch
from optimum_vim.ops.dispatch import KernelUnsupportedError, float_scan_backend, use_kernels
from optimum_vim.ops.scan import selective_scan, selective_scan_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _scan_inputs(b=2, length=13, e=24, n=8, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, length, e, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(b, length, e, generator=g) - 1)
    A = -(torch.rand(e, n, generator=g) + 0.1)
    B, C = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g)
    D, z = torch.randn(e, generator=g), torch.randn(b, length, e, generator=g)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(u), cast(delta), A.to(device), cast(B), cast(C), D.to(device), cast(z)


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned_scan", set())


def _choose(u, *rest, d_state=8):
    return float_scan_backend(u, *rest, d_state=d_state)


def test_mamba_first_then_triton_then_the_loop(monkeypatch, fresh_warnings, caplog):
    u, delta, A, B, C, D, z = _scan_inputs()
    monkeypatch.setattr(dispatch, "mamba_scan_available", lambda: True)
    assert _choose(u, delta, A, B, C, D, z) == "mamba"
    with use_kernels("triton"):  # forced: our kernel, never mamba-ssm
        assert _choose(u, delta, A, B, C, D, z) == "triton"
    monkeypatch.setattr(dispatch, "mamba_scan_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="optimum_vim.ops.dispatch"):
        assert _choose(u, delta, A, B, C, D, z) == "triton"
        assert _choose(u.double(), delta.double(), A, B.double(), C.double(), D, z.double()) == "torch"  # exact loop
        with use_kernels("reference"):
            assert _choose(u, delta, A, B, C, D, z) == "torch"
    assert not caplog.records  # each of these was chosen, nothing to warn about


def test_the_loop_is_announced_once_per_reason(monkeypatch, fresh_warnings, caplog):
    u, delta, A, B, C, D, z = _scan_inputs()
    monkeypatch.setattr(dispatch, "mamba_scan_available", lambda: False)
    w = u.clone().requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="optimum_vim.ops.dispatch"):
        for _ in range(3):
            assert _choose(w, delta, A, B, C, D, z) == "torch"  # the Triton scan has no backward
        with torch.no_grad():
            assert _choose(w, delta, A, B, C, D, z) == "triton"
        assert _choose(u, delta, A[:, :5], B[..., :5], C[..., :5], D, z, d_state=5) == "torch"  # not a power of 2
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all(r.levelno == logging.WARNING for r in caplog.records)
    assert "backward" in messages[0] and "power of two" in messages[1]
    assert all("pip install 'optimum-vim[cuda]'" in m and "PyTorch loop" in m for m in messages)


def test_without_triton_the_loop_says_so(monkeypatch, fresh_warnings, caplog):
    u, delta, A, B, C, D, z = _scan_inputs()
    monkeypatch.setattr(dispatch, "mamba_scan_available", lambda: False)
    monkeypatch.setattr(dispatch, "_load", lambda module: ImportError("No module named 'triton'"))
    with caplog.at_level(logging.WARNING, logger="optimum_vim.ops.dispatch"):
        assert _choose(u, delta, A, B, C, D, z) == "torch"
    assert len(caplog.records) == 1 and "Triton is unavailable" in caplog.records[0].getMessage()


def test_forced_triton_refuses_an_unsupported_scan(monkeypatch, fresh_warnings):
    u, delta, A, B, C, D, z = _scan_inputs(n=5)
    with use_kernels("triton"), pytest.raises(KernelUnsupportedError, match="power of two"):
        _choose(u, delta, A, B, C, D, z, d_state=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("gated", [True, False], ids=["D+z", "plain"])
def test_triton_float_scan_equals_the_loop(dtype, reverse, gated):
    u, delta, A, B, C, D, z = _scan_inputs(dtype=dtype, device=DEVICE)
    if not gated:
        D = z = None
    out = selective_scan(u, delta, A, B, C, D, z, reverse=reverse, backend="triton")
    ref = selective_scan_torch(u, delta, A, B, C, D, z, reverse=reverse)
    assert out.dtype == dtype and out.shape == u.shape
    # both accumulate in fp32 from the same rounded inputs; they differ by float summation order and the final cast
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * ref.float().abs().max().item())


@pytest.mark.gpu
def test_float_vim_on_cuda_uses_the_chosen_scan(count_calls, fresh_warnings, caplog):
    """On a GPU: the float model's forward under ``auto`` runs the scan the choice names and agrees with the loop."""
    from optimum_vim_kernels import scan as triton_scan

    from optimum_vim import VimConfig, VimForImageClassification

    torch.manual_seed(0)
    model = VimForImageClassification(VimConfig(hidden_size=64, num_hidden_layers=2, d_state=16, patch_size=8,
                                                stride=8, image_size=64)).cuda().eval()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    calls = count_calls(triton_scan, "selective_scan_q")
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="optimum_vim.ops.dispatch"):
        chosen = float_scan_backend(x, d_state=16)
        out = model(x).logits
        with use_kernels("reference"):
            for layer in model.vim.layers:
                layer.mixer.ssm.backend = layer.mixer.ssm_b.backend = "torch"
            ref = model(x).logits
    assert (calls["n"] == 4) == (chosen == "triton")  # two layers, two directions
    assert not caplog.records
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------- --device / --dtype
def test_device_and_dtype_names():
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype(None) is None
    assert [resolve_dtype(n) for n in ("float32", "fp16", "half", "BF16")] == [
        torch.float32, torch.float16, torch.float16, torch.bfloat16]
    for bad, match in [("gpu0", "unknown --device"), ("meta", "not a device"), ("cuda:99", "cuda")]:
        with pytest.raises(ValueError, match=match):
            resolve_device(bad)
    with pytest.raises(ValueError, match="use float32, float16 or bfloat16"):
        resolve_dtype("float64")


@pytest.mark.parametrize("argv,message", [
    (["--device", "tpu0"], "unknown --device 'tpu0': use cpu, cuda or cuda:N"),
    (["--dtype", "int8"], "unknown --dtype 'int8': use float32, float16 or bfloat16"),
    (["--device", "cuda:99"], "--device cuda:99: "),
], ids=["unknown-device", "bad-dtype", "cuda-unavailable-or-out-of-range"])
def test_cli_refuses_bad_device_or_dtype(tiny_vim_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    for command in (["quantize", tiny_vim_dir, str(out)], ["evaluate", tiny_vim_dir]):
        assert main(command + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"optimum-vim {command[0]}: error: ") and message in err[0]
    assert not out.exists()


def test_cli_quantizes_and_evaluates_in_the_requested_dtype(tiny_vim_dir, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["quantize", tiny_vim_dir, str(out), "--weight-bits", "8", "--act-bits", "8", "--num-samples", "8",
                 "--device", "cpu", "--dtype", "bfloat16", "--evaluate", "--eval-limit", "40", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["device"] == "cpu" and summary["dtype"] == "bfloat16" and summary["eval_images"] == 40
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # float parts stored as calibrated, scales in fp32
        assert f.get_tensor("vim.patch_embed.proj.weight").dtype == torch.bfloat16
        assert f.get_tensor("vim.layers.0.mixer.in_proj.weight_scale").dtype == torch.float32
    assert main(["evaluate", str(out), "--limit", "40", "--dtype", "bf16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["top1"] == summary["quantized_top1"]
