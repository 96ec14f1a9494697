"""Runs the official NVlabs MambaVision model code (``mambavision/models/mamba_vision.py`` from the ``mambavision``
wheel, with the real timm and einops) on CPU, in its own process, for the equivalence tests.

Test-only shims, installed in this process alone:
* ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` (CUDA only upstream) -> the float64 step-by-step
  reference scan of ``tests/support/reference_vim.py``, with mamba-ssm's ``delta_bias`` / ``delta_softplus`` semantics;
* ``torchvision``, only when the installed one cannot be imported (PyPI's torchvision fails beside a CPU-only torch
  build): an empty package so that timm imports; timm uses torchvision for data pipelines and a frozen-BN helper,
  none of which the model forward touches.

Usage: ``python official_runner.py <spec.json> <out.pt>``. The spec lists cases ``{"name", "kwargs", "seed",
"inputs": [[batch, C, H, W], ...]}`` (``kwargs`` go to the official ``MambaVision`` class) and ``"shape_tables"``
(preset factory names whose state-dict key/shape tables to record, built on the meta device).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from tests.support.reference_vim import scan_loop_f64  # noqa: E402


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """mamba-ssm's selective_scan_fn contract on (batch, E, L) / (batch, N, L) tensors, computed in float64."""
    delta = delta.double()
    if delta_bias is not None:
        delta = delta + delta_bias.double()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    y = scan_loop_f64(u, delta, A, B, C, D, z).to(u.dtype)
    if return_last_state:
        raise NotImplementedError("the reference shim does not return the last state")
    return y


class _Placeholder(type):
    """A class standing for any torchvision name; its attributes are placeholders too (timm reads enum members
    such as ``InterpolationMode.NEAREST`` at import)."""

    def __getattr__(cls, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(attr, (), {"__module__": cls.__module__})


class _EmptyPackageFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``torchvision`` and its submodules importable as empty modules whose attributes are placeholders."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def __getattr__(attr, _name=spec.name):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Placeholder(attr, (), {"__module__": _name})

        module.__getattr__ = __getattr__
        return module

    def exec_module(self, module):
        pass


def _install_shims() -> None:
    pkgs = ["mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface"]
    for name in pkgs:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["mamba_ssm.ops.selective_scan_interface"].selective_scan_fn = selective_scan_fn
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or RuntimeError of a torchvision built for another torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _EmptyPackageFinder())


def _randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Every parameter and BatchNorm statistic random (moderate scales), so that no weight is a trivial init value."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=gen) * 2 - 1)
            elif name.endswith(".D") or "gamma" in name or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))


@contextlib.contextmanager
def _linspace_on_cpu():
    """The official __init__ reads drop-path rates with ``.item()``: keep linspace on the CPU under a meta device."""
    orig = torch.linspace

    def linspace(*args, **kwargs):
        kwargs["device"] = "cpu"
        return orig(*args, **kwargs)

    torch.linspace = linspace
    try:
        yield
    finally:
        torch.linspace = orig


def main(spec_path: str, out_path: str) -> None:
    _install_shims()
    from mambavision.models import mamba_vision as official

    spec = json.loads(Path(spec_path).read_text())
    results = {"module_file": official.__file__, "cases": {}, "shape_tables": {}}
    for case in spec.get("cases", []):
        gen = torch.Generator().manual_seed(case["seed"])
        model = official.MambaVision(**case["kwargs"]).eval()
        _randomize(model, gen)
        features = {}
        for i, level in enumerate(model.levels):
            if level.downsample is not None:
                level.downsample.register_forward_hook(lambda m, a, o, i=i, f=features: f.__setitem__(f"stage{i + 1}", a[0]))
            else:
                level.register_forward_hook(lambda m, a, o, i=i, f=features: f.__setitem__(f"stage{i + 1}", o))
        outs = []
        with torch.no_grad():
            for shape in case["inputs"]:
                x = torch.randn(*shape, generator=gen)
                features.clear()
                pooled = model.forward_features(x)
                outs.append({"pixel_values": x, "pooled": pooled, "logits": model.head(pooled),
                             "features": dict(features)})
        results["cases"][case["name"]] = {"state_dict": model.state_dict(), "outputs": outs}
    for name in spec.get("shape_tables", []):
        with torch.device("meta"), _linspace_on_cpu():
            model = getattr(official, name)()
        results["shape_tables"][name] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
