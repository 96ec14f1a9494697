"""Test configuration: Triton runs interpreted on CPU-only machines (must be set before anything imports Triton)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_DIR = os.path.join(REPO, "checkpoints", "vim-fashion-mnist")


@pytest.fixture(scope="session")
def fixture_dir():
    """The committed Fashion-MNIST Vim (trained by scripts/train_fashion_mnist.py)."""
    if not os.path.isfile(os.path.join(FIXTURE_DIR, "model.safetensors")):
        raise FileNotFoundError(f"the trained fixture is missing at {FIXTURE_DIR}")
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def tiny_vim_dir(tmp_path_factory):
    """A small random Vim (real architecture, 1-channel 28x28, 50 tokens) saved with its image processor."""
    import optimum_vim
    from optimum_vim import VimConfig, VimForImageClassification, VimImageProcessor

    path = tmp_path_factory.mktemp("tiny_vim")
    torch.manual_seed(1234)
    config = VimConfig(hidden_size=32, num_hidden_layers=2, d_state=4, expand=2, patch_size=4, stride=4,
                       image_size=28, num_channels=1, num_labels=10)
    model = VimForImageClassification(config)
    model.save_pretrained(path)
    VimImageProcessor(size={"height": 28, "width": 28}, do_center_crop=False, image_mean=[0.286], image_std=[0.353],
                      color_mode="L").save_pretrained(path)
    assert optimum_vim.__version__
    return str(path)


@pytest.fixture
def saved_w4a8(tiny_vim_dir, tmp_path):
    """The tiny Vim quantized with RTN W4A8 (16 seeded random calibration images), saved to a folder."""
    from tests.support.helpers import quantize

    q = quantize(tiny_vim_dir, weight_bits=4, act_bits=8)
    q.save_pretrained(tmp_path / "q")
    return tmp_path / "q"


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(module, name, check=None)`` replaces ``module.name`` for the test with a wrapper that counts its
    calls (``check(*args, **kwargs)`` runs on each) and returns the live ``{"n": count}`` dict."""

    def install(module, name, check=None):
        calls = {"n": 0}
        real = getattr(module, name)

        def counting(*args, **kwargs):
            calls["n"] += 1
            if check is not None:
                check(*args, **kwargs)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
        return calls

    return install
