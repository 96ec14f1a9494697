"""The one dispatch point: quantized modules reach the Triton kernels, or the references, as the policy says."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import AutoModelForImageClassification

from optimum_vim import ViMQuantizationConfig
from optimum_vim.ops.dispatch import KernelUnsupportedError, current_backend, pick_kernel, use_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton path: compiled on a GPU, interpreted here


@pytest.fixture(scope="module")
def w8a8_scan_model(tiny_vim_dir):
    cfg = ViMQuantizationConfig(weight_bits=8, act_bits=8, recipe_args={"scan_act_bits": 8, "act_granularity": "token"},
                                calibration_dataset=torch.randn(16, 1, 28, 28))
    return AutoModelForImageClassification.from_pretrained(tiny_vim_dir, quantization_config=cfg).to(DEVICE)


@pytest.fixture(scope="module")
def w4_model(tiny_vim_dir):
    return AutoModelForImageClassification.from_pretrained(
        tiny_vim_dir, quantization_config=ViMQuantizationConfig(weight_bits=4)).to(DEVICE)


def _count_calls(monkeypatch):
    from optimum_vim_kernels import gemm, scan

    calls = {"gemm": 0, "scan": 0, "combine": 0}
    real_gemm, real_scan, real_combine = gemm.quant_gemm, scan.selective_scan_q, scan.combine_directions

    def counting_gemm(*a, **k):
        calls["gemm"] += 1
        return real_gemm(*a, **k)

    def counting_scan(*a, **k):
        calls["scan"] += 1
        return real_scan(*a, **k)

    def counting_combine(*a, **k):
        calls["combine"] += 1
        return real_combine(*a, **k)

    monkeypatch.setattr(scan, "combine_directions", counting_combine)
    monkeypatch.setattr(gemm, "quant_gemm", counting_gemm)
    monkeypatch.setattr(scan, "selective_scan_q", counting_scan)
    return calls


@pytest.mark.parametrize("fixture", ["w8a8_scan_model", "w4_model"])
def test_whole_model_through_triton_matches_reference(fixture, request, monkeypatch):
    model = request.getfixturevalue(fixture)
    x = torch.randn(2, 1, 28, 28, device=DEVICE)
    with torch.no_grad(), use_kernels("reference"):
        ref = model(x).logits
    calls = _count_calls(monkeypatch)
    with torch.no_grad(), use_kernels("triton"):
        out = model(x).logits
    assert calls["gemm"] == 12  # every block linear ran the Triton GEMM (interpreted here)
    # int8 scan inputs -> the Triton scan; forced Triton on CUDA runs the W4 model's float scans there too
    assert calls["scan"] == (4 if fixture == "w8a8_scan_model" or DEVICE == "cuda" else 0)
    # static int8 out_proj input -> the fused combine + requantization, one per layer
    assert calls["combine"] == (2 if fixture == "w8a8_scan_model" else 0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_auto_on_cpu_uses_reference(w8a8_scan_model, monkeypatch):
    model = copy.deepcopy(w8a8_scan_model).cpu()
    calls = _count_calls(monkeypatch)
    assert current_backend().value == "auto"
    with torch.no_grad():
        model(torch.randn(1, 1, 28, 28))
    assert calls == {"gemm": 0, "scan": 0, "combine": 0}


def test_environment_variable_selects_policy(monkeypatch):
    monkeypatch.setenv("OPTIMUM_VIM_KERNELS", "reference")
    assert current_backend().value == "reference"
    monkeypatch.setenv("OPTIMUM_VIM_KERNELS", "fastest")
    with pytest.raises(ValueError, match="OPTIMUM_VIM_KERNELS"):
        current_backend()


def test_forced_triton_explains_unsupported_calls(tiny_vim_dir):
    q3 = AutoModelForImageClassification.from_pretrained(
        tiny_vim_dir, quantization_config=ViMQuantizationConfig(weight_bits=3)).to(DEVICE)
    x = torch.randn(1, 1, 28, 28, device=DEVICE)
    with use_kernels("triton"), pytest.raises(KernelUnsupportedError, match="3-bit"):
        q3(x)
    with torch.no_grad():  # the default policy serves it from the reference
        assert torch.isfinite(q3(x).logits).all()


class _FakeCuda:
    is_cuda = True


def test_auto_falls_back_with_a_debug_line(caplog):
    with caplog.at_level(logging.DEBUG, logger="optimum_vim.ops.dispatch"):
        kernel = pick_kernel("gemm", "quant_gemm", _FakeCuda(), m=4, n=4, k=4, bits=5, group_size=None,
                             codebook=False, int_activations=False, act_dtype=torch.float32)
    assert kernel is None
    assert "falls back to the PyTorch reference" in caplog.text and "5-bit" in caplog.text
    assert pick_kernel("gemm", "quant_gemm", _FakeCuda(), m=4, n=4, k=4, bits=4, group_size=None, codebook=False,
                       int_activations=False, act_dtype=torch.float32) is not None
