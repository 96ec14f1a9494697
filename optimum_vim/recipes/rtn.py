"""RTN: round-to-nearest baseline (symmetric per-channel / per-group weights, static activation ranges).

Weights: ``scale = max|W| / (2^(b-1) - 1)`` per output channel (or per group of ``weight_group_size`` inputs);
1 bit is binary, ``sign(W) * mean|W|`` (round-to-nearest has no zero-centred 1-bit grid; the closed-form binary
scale is the natural RTN counterpart).
Activations (``act_bits``): the inputs of the block linears get a static affine (default) or symmetric quantizer,
per tensor (default) or per token position, whose range comes from a min-max or percentile observer over the
calibration set. ``scan_act_bits=8`` also quantizes the selective-scan inputs u, delta, B and C of both directions
(static, per tensor or per token like the linears; delta affine, the others symmetric), which feeds the int8 scan
kernel. Needs no data when weight-only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration.observers import collect_activation_stats
from ..calibration.tensors import affine_from_range, rtn_weight_tensors
from .base import (
    BLOCK_LINEARS,
    LayerPlan,
    QuantPlan,
    Recipe,
    is_skipped,
    layer_overrides,
    register_recipe,
    select_linears,
)

OBSERVERS = ("minmax", "percentile")
_SCAN_ARGS = {"u": 0, "delta": 1, "B": 3, "C": 4}  # positional inputs of VimSelectiveScan.forward


@dataclass
class RTNArgs:
    """Options of the RTN recipe (``ViMQuantizationConfig(recipe_args=...)``)."""

    observer: str = "minmax"
    percentile: float = 99.99
    act_granularity: str = "tensor"
    act_symmetric: bool = False
    targets: tuple[str, ...] = BLOCK_LINEARS
    scan_act_bits: int | None = None


    def validate(self) -> None:
        if self.observer not in OBSERVERS:
            raise ValueError(f"RTN observer must be one of {OBSERVERS}; got {self.observer!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100]; got {self.percentile}")
        if self.act_granularity not in ("tensor", "token"):
            raise ValueError(f"RTN act_granularity must be 'tensor' or 'token'; got {self.act_granularity!r}")
        if self.observer == "percentile" and self.act_granularity != "tensor":
            raise ValueError("the percentile observer supports act_granularity='tensor' only")
        self.targets = tuple(self.targets)
        if self.scan_act_bits not in (None, 8):
            raise ValueError(f"scan_act_bits must be None or 8 (int8 scan inputs); got {self.scan_act_bits!r}")


@register_recipe
class RTNRecipe(Recipe):
    """Round-to-nearest quantization of the block linears; the baseline every other recipe is compared with."""

    name = "rtn"
    Args = RTNArgs
    weight_bits = (1, 2, 3, 4, 5, 6, 8)
    act_bits = (None, 4, 6, 8)

    @classmethod
    def requires_data(cls, config) -> bool:
        if (config.recipe_args or {}).get("scan_act_bits"):
            return True
        return config.act_bits is not None or any(
            (v or {}).get("act_bits") for v in (config.overrides or {}).values()
        )

    def _act_tensors(self, stats, bits: int, symmetric: bool | None = None) -> tuple[dict, dict]:
        a = self.args
        symmetric = a.act_symmetric if symmetric is None else symmetric
        if a.act_granularity == "token":
            lo, hi = stats.token_min, stats.token_max
            spec = {"bits": bits, "symmetric": symmetric, "granularity": "token", "length": int(lo.numel())}
        else:
            lo, hi = (stats.min, stats.max) if a.observer == "minmax" else stats.percentile_range(a.percentile)
            spec = {"bits": bits, "symmetric": symmetric, "granularity": "tensor"}
        return spec, affine_from_range(lo.reshape(-1), hi.reshape(-1), bits, symmetric)

    @torch.no_grad()
    def calibrate(self, model, batches) -> QuantPlan:
        names = select_linears(model, self.args.targets, self.config.modules_to_not_convert)
        settings = {n: s for n in names if (s := self.layer_settings(n)) is not None}
        targets = {n: (n, "input", 0) for n, s in settings.items() if s["act_bits"] is not None}
        scans = self._scan_modules(model) if self.args.scan_act_bits else []
        for scan in scans:
            targets.update({f"{scan}:{arg}": (scan, "input", idx) for arg, idx in _SCAN_ARGS.items()})
        stats = {}
        if targets:
            if not batches:
                raise ValueError("activation quantization needs calibration data")
            stats = collect_activation_stats(model, batches, targets, seed=self.config.seed)
        plan = QuantPlan(recipe=self.name)
        for name, s in settings.items():
            linear = model.get_submodule(name)
            tensors = rtn_weight_tensors(linear.weight, s["weight_bits"], s["group_size"])
            spec = {
                "type": "linear", "in_features": linear.in_features, "out_features": linear.out_features,
                "bias": linear.bias is not None,
                "weight": {"format": "int", "bits": s["weight_bits"], "group_size": s["group_size"]},
                "input": None,
            }
            if linear.bias is not None:
                tensors["bias"] = linear.bias.detach().float().clone()
            if s["act_bits"] is not None:
                act_spec, act_tensors = self._act_tensors(stats[name], s["act_bits"])
                spec["input"] = act_spec
                tensors.update({f"input_quantizer.{k}": v for k, v in act_tensors.items()})
            plan.layers[name] = LayerPlan(spec=spec, tensors=tensors)
        for scan in scans:
            plan.layers[scan] = self._scan_plan(model, scan, stats)
        return plan

    def _scan_modules(self, model) -> list[str]:
        from ..models.vim.modeling_vim import VimSelectiveScan

        skip = self.config.modules_to_not_convert
        return [n for n, m in model.named_modules()
                if isinstance(m, VimSelectiveScan) and not is_skipped(n, skip) and not layer_overrides(n, self.config.overrides).get("skip")]

    def _scan_plan(self, model, name: str, stats) -> LayerPlan:
        mod = model.get_submodule(name)
        first = stats[f"{name}:u"]
        spec = {"type": "scan", "reverse": mod.reverse, "length": int(first.token_min.numel()),
                "channels": int(first.channel_absmax.numel()), "d_state": int(stats[f"{name}:B"].channel_absmax.numel())}
        tensors = {}
        for arg in _SCAN_ARGS:
            # delta > 0 (after softplus): an affine grid does not waste half of the codes on negative values
            act_spec, act_tensors = self._act_tensors(stats[f"{name}:{arg}"], self.args.scan_act_bits,
                                                      symmetric=arg != "delta")
            spec[arg] = act_spec
            tensors.update({f"{arg}_quantizer.{k}": v for k, v in act_tensors.items()})
        return LayerPlan(spec=spec, tensors=tensors)
