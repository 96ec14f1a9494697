"""Plans: what a recipe decides (pure data), and the one function that swaps modules on a model.

They live with the module family (below calibration and recipes) so that the calibration engine, which applies each
block's plan to a copy of the block, and the recipes share them; ``optimum_vim.recipes`` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .base import build_qmodule, load_qmodule_tensors
from .spec import AnySpec, spec_from_dict


@dataclass
class LayerPlan:
    """What replaces one module: the quantized module's typed spec and its buffers (names relative to the module).
    A config.json dict is accepted too and converted (validated) with
    :func:`~optimum_vim.modules.spec.spec_from_dict`."""

    spec: AnySpec
    tensors: dict[str, torch.Tensor]

    def __post_init__(self):
        self.spec = spec_from_dict(self.spec)


@dataclass
class QuantPlan:
    """The full outcome of a recipe's calibration."""

    recipe: str
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    float_overrides: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def specs(self) -> dict[str, dict]:
        """The JSON dicts of the planned modules' specs (what ``quantization_config.layers`` stores)."""
        return {name: lp.spec.to_dict() for name, lp in self.layers.items()}


def apply_plan(model: nn.Module, plan: QuantPlan) -> nn.Module:
    """Swaps every planned module for its quantized version (in place) and applies the float overrides."""
    params = dict(model.named_parameters())
    for name, value in plan.float_overrides.items():
        if name not in params:
            raise ValueError(f"float override for unknown parameter {name!r}")
        with torch.no_grad():
            params[name].copy_(value.to(params[name].dtype))
    home = _device_of(model, torch.device("cpu"))
    for name, layer in plan.layers.items():
        old = model.get_submodule(name)
        # a module without tensors of its own (the float scan) takes the model's device
        device = _device_of(old, home)
        with torch.device(device):
            new = build_qmodule(layer.spec)
        load_qmodule_tensors(new, layer.tensors)
        new.requires_grad_(False)
        new.train(old.training)  # a fresh module defaults to train mode; it takes the mode of the one it replaces
        model.set_submodule(name, new)
    return model


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    """The device of ``module``'s first parameter or buffer, ``default`` when it has none."""
    first = next(iter(module.parameters()), None)
    if first is None:
        first = next(iter(module.buffers()), None)
    return default if first is None else first.device
