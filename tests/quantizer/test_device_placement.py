"""Calibration of every recipe and evaluation run on the model's device: on the emulated accelerator of
``tests/support/device_emulation.py`` (CPU data behind a second device), any tensor that a recipe, the block-wise engine,
OuroMamba-Gen or the k-means / searches leaves on the CPU meets the model's tensors and raises, as on a GPU; and the
plan computed there is bit-identical to the CPU one."""

from __future__ import annotations

import copy

import pytest
import torch

from optimum_vim import VimConfig, VimForImageClassification, ViMQuantizationConfig, quantize_model
from optimum_vim.evaluation import evaluate
from optimum_vim.ops.dispatch import use_kernels
from tests.support.device_emulation import DeviceMismatch, DeviceTensor, emulated_device


def test_emulation_refuses_what_a_gpu_refuses():
    with emulated_device() as device:
        x = torch.arange(4.0).to(device)
        assert isinstance(x, DeviceTensor) and x.device == device
        with pytest.raises(DeviceMismatch, match="CPU tensor of shape"):
            x + torch.ones(4)  # a host tensor with dimensions: refused, as by CUDA
        with pytest.raises(DeviceMismatch):
            torch.cat([x, torch.zeros(2)])
        assert (x + torch.tensor(1.0)).cpu().tolist() == [1.0, 2.0, 3.0, 4.0]  # 0-dim host scalars are allowed
        assert x[torch.tensor([3, 0])].tolist() == [3.0, 0.0]  # host index tensors are moved, as by CUDA
        assert isinstance(torch.zeros(2, device=device), DeviceTensor)
        assert isinstance(torch.tensor([1.0, 2.0], device=device), DeviceTensor)
        with torch.device(device):
            assert isinstance(torch.empty(3), DeviceTensor)
        back = (x * 2).cpu()
        assert type(back) is torch.Tensor and back.tolist() == [0.0, 2.0, 4.0, 6.0]


def _tiny(layers: int = 2):
    torch.manual_seed(0)
    config = VimConfig(hidden_size=32, num_hidden_layers=layers, d_state=4, expand=2, patch_size=4, stride=4,
                       image_size=28, num_channels=1, num_labels=10)
    return VimForImageClassification(config).eval()


CASES = {  # (recipe settings, calibration images; 0: data-free)
    # min-max per token with int8 scan inputs: the quantized scans have no float tensors to place them by
    "rtn-token-scan8": (dict(recipe="rtn", weight_bits=4, act_bits=8,
                             recipe_args={"act_granularity": "token", "scan_act_bits": 8}), 8),
    # percentile observer: random value samples drawn per batch (more values than it keeps)
    "rtn-percentile": (dict(recipe="rtn", weight_bits=4, act_bits=8, recipe_args={"observer": "percentile"}), 32),
    # block-wise engine with sampled minibatches, Lp grid init, JLSS through the scan's backward
    "ptq4vm": (dict(recipe="ptq4vm", weight_bits=4, act_bits=4, recipe_args={"steps": 2, "batch_size": 8}), 16),
    # k-means token / channel clusters, cosine searches, hidden-state reparameterisation and state search
    "kscale": (dict(recipe="kscale", weight_bits=8, act_bits=8,
                    recipe_args={"search_candidates": 3, "search_rounds": 1}), 8),
    # data-free: OuroMamba-Gen images made on the device, dynamic outliers, block-wise step learning
    "ouromamba": (dict(recipe="ouromamba", weight_bits=4, act_bits=4,
                       recipe_args={"num_synthetic": 2, "gen_iterations": 2, "epochs": 1}), 0),
    # real data, static outliers at A8
    "ouromamba-static": (dict(recipe="ouromamba", weight_bits=4, act_bits=8,
                              recipe_args={"epochs": 1, "dynamic_outliers": False}), 8),
    # CPU k-means init, convex hulls trained block by block, incremental hardening
    "vimvq": (dict(recipe="vimvq", weight_bits=2, act_bits=None,
                   recipe_args={"iterations": 4, "kmeans_iterations": 5, "replace_every": 2}), 8),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_recipe_calibrates_on_the_model_device(case):
    settings, images = CASES[case]
    base = _tiny()
    calib = torch.randn(max(images, 1), 1, 28, 28, generator=torch.Generator().manual_seed(1)) if images else None
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))

    def config():
        return ViMQuantizationConfig(calibration_dataset=calib, num_calibration_samples=max(images, 1), **settings)

    with use_kernels("reference"):
        on_cpu = quantize_model(copy.deepcopy(base), config())
        with emulated_device() as device:
            model = quantize_model(copy.deepcopy(base).to(device), config())
            stray = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                     if not isinstance(t, DeviceTensor)]
            assert not stray, f"left on the CPU by calibration: {stray[:5]}"
            with torch.no_grad():
                logits = model(x.to(device)).logits.cpu()
            model = model.to("cpu")
        with torch.no_grad():
            expected = on_cpu(x).logits
    assert ("synthetic" in on_cpu.config.quantization_config.calibration_source) == (images == 0)
    assert torch.equal(logits, expected)  # same arithmetic: the device changes where, never what
    cpu_state, state = on_cpu.state_dict(), model.state_dict()
    assert cpu_state.keys() == state.keys()
    for name, t in cpu_state.items():
        assert torch.equal(state[name], t), name


def test_data_free_recipe_under_no_grad():
    """OuroMamba-Gen trains pixels by backprop: a caller's ``torch.no_grad()`` must not break it."""
    settings, _ = CASES["ouromamba"]
    with torch.no_grad():
        model = quantize_model(_tiny(1), ViMQuantizationConfig(**settings))
    assert "synthetic" in model.config.quantization_config.calibration_source


def test_evaluation_runs_on_the_model_device():
    model = _tiny()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(5, 1, 28, 28, generator=g), torch.randint(0, 10, (5,), generator=g)) for _ in range(3)]
    expected = evaluate(model, batches, progress=False)
    with emulated_device() as device:
        result = evaluate(model.to(device), batches, progress=False)
    assert (result.correct, result.total) == (expected.correct, expected.total)
    assert result.device == str(device) and expected.device == "cpu"
