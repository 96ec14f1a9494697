"""Export: torch.export with a dynamic batch and the scan as one loop node, ONNX of float and quantized models checked
in onnxruntime, what does not export, and the `optimum-vim export` command."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageClassification

from optimum_vim import ViMQuantizationConfig
from optimum_vim.export import DEFAULT_ATOL, ExportError, check_exportable, export_onnx, export_program

CALIB = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(3))
ATOL = DEFAULT_ATOL  # the stated tolerance: onnxruntime vs PyTorch, max abs difference of the logits


def _quantize(path, **kw):
    cfg = ViMQuantizationConfig(calibration_dataset=CALIB, num_calibration_samples=16, **kw)
    return AutoModelForImageClassification.from_pretrained(path, quantization_config=cfg).eval()


@pytest.fixture(scope="module")
def float_model(tiny_vim_dir):
    return AutoModelForImageClassification.from_pretrained(tiny_vim_dir).eval()


@pytest.fixture(scope="module")
def w4a8(tiny_vim_dir):
    return _quantize(tiny_vim_dir, weight_bits=4, act_bits=8)


def _scan_nodes(program) -> int:
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and "scan" in str(n.target))


@pytest.mark.parametrize("which", ["float", "w4a8"])
def test_torch_export_has_a_dynamic_batch_and_one_scan_node_per_direction(float_model, w4a8, which):
    model = float_model if which == "float" else w4a8
    program = export_program(model)
    layers = model.config.num_hidden_layers
    assert _scan_nodes(program) == 2 * layers  # not unrolled: 50 tokens would give 50 step copies per direction
    for batch in (1, 5):
        x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x).logits, rtol=0, atol=1e-5)


def test_torch_export_of_a_quantized_state_scan(tiny_vim_dir):
    """k-scaled PTQ re-quantizes the carried state at every step: the per-step scales ride along the scan."""
    model = _quantize(tiny_vim_dir, recipe="kscale", weight_bits=8, act_bits=8,
                      recipe_args={"search_candidates": 5, "search_rounds": 1})
    program = export_program(model)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["float", "w4a8"])
def test_onnx_matches_pytorch_in_onnxruntime(float_model, w4a8, which, tmp_path):
    onnx = pytest.importorskip("onnx")  # the [export] extra; installed by [dev], so CI runs this
    ort = pytest.importorskip("onnxruntime")
    model = float_model if which == "float" else w4a8
    path = export_onnx(model, tmp_path / "model.onnx")  # check=True already compares on a batch of 3
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Scan") == 2 * model.config.num_hidden_layers
    if which == "w4a8":  # the packed 4-bit codes stay packed in the file, unpacked by the graph
        assert any(init.data_type == onnx.TensorProto.UINT8 for init in graph.initializer) and "BitShift" in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
        (logits,) = session.run(None, {"pixel_values": x.numpy()})
        with torch.no_grad():
            expected = model(x).logits.numpy()
        assert logits.shape == expected.shape and np.abs(logits - expected).max() <= ATOL


def test_what_does_not_export_says_why(w4a8):
    from optimum_vim.modules import QActivation

    holder = torch.nn.Module()
    holder.quantizer = QActivation({"bits": 4, "granularity": "dynamic_outlier", "length": 50})
    with pytest.raises(ExportError, match="outlier channels are chosen per input"):
        check_exportable(holder)
    holder.quantizer = QActivation({"bits": 4, "granularity": "dynamic_outlier", "length": 50, "channels": 8,
                                    "static_outliers": True})
    check_exportable(holder)  # a fixed outlier list exports
    check_exportable(w4a8)


@pytest.mark.slow
def test_cli_export(tiny_vim_dir, w4a8, tmp_path):
    w4a8.save_pretrained(tmp_path / "q")
    proc = subprocess.run([sys.executable, "-m", "optimum_vim", "export", str(tmp_path / "q"), str(tmp_path / "q.pt2"),
                           "--format", "torch"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dynamic batch" in proc.stdout
    program = torch.export.load(str(tmp_path / "q.pt2"))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), w4a8(x).logits, rtol=0, atol=1e-5)
    again = subprocess.run([sys.executable, "-m", "optimum_vim", "export", str(tmp_path / "q"),
                            str(tmp_path / "q.pt2")], capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "exists" in again.stderr
