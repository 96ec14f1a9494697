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

import typing
from dataclasses import dataclass
from typing import Literal

import torch

from ..calibration.observers import collect_activation_stats
from ..calibration.tensors import affine_from_range, rtn_weight_tensors
from ..models.family import family_of
from ..modules.spec import ActivationSpec, IntWeightSpec, LinearSpec, ScanSpec
from .base import LayerPlan, QuantPlan, Recipe

Observer = Literal["minmax", "percentile"]
OBSERVERS = typing.get_args(Observer)
# RTN's scan specs store the four input quantizers only (no y / state keys: storage format v1 as saved)
_RTN_SCAN_KEYS = frozenset({"reverse", "length", "channels", "d_state", "u", "delta", "B", "C"})


@dataclass
class RTNArgs:
    """Options of the RTN recipe (``ViMQuantizationConfig(recipe_args=...)``). ``targets``: roles of the linears to
    quantize (None: the model family's default linears, for Vim the six block linears of both scan directions)."""

    observer: Observer = "minmax"
    percentile: float = 99.99
    act_granularity: Literal["tensor", "token"] = "tensor"
    act_symmetric: bool = False
    targets: tuple[str, ...] | None = None
    scan_act_bits: Literal[8] | None = None  # 8: int8 scan inputs u, delta, B, C

    def validate(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100]; got {self.percentile}")
        if self.observer == "percentile" and self.act_granularity != "tensor":
            raise ValueError("the percentile observer supports act_granularity='tensor' only")


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
            spec = ActivationSpec(bits, "token", symmetric=symmetric, length=int(lo.numel()))
        else:
            lo, hi = (stats.min, stats.max) if a.observer == "minmax" else stats.percentile_range(a.percentile)
            spec = ActivationSpec(bits, "tensor", symmetric=symmetric)
        return spec, affine_from_range(lo.reshape(-1), hi.reshape(-1), bits, symmetric)

    @torch.no_grad()
    def calibrate(self, model, batches) -> QuantPlan:
        settings = self.targets.linears(model, self.args.targets)
        targets = {n: (n, "input", 0) for n, s in settings.items() if s.act_bits is not None}
        scans = {n: ref for n, (ref, _) in self.targets.scans(model).items()} if self.args.scan_act_bits else {}
        scan_inputs = family_of(model).scan_inputs
        for scan in scans:
            targets.update({f"{scan}:{arg}": (scan, "input", idx) for arg, idx in scan_inputs.items()})
        stats = {}
        if targets:
            if not batches:
                raise ValueError("activation quantization needs calibration data")
            stats = collect_activation_stats(model, batches, targets, seed=self.seed,
                                             keep_samples=self.args.observer == "percentile")
        plan = QuantPlan(recipe=self.name)
        for name, s in settings.items():
            linear = model.get_submodule(name)
            tensors = rtn_weight_tensors(linear.weight, s.weight_bits, s.group_size)
            if linear.bias is not None:
                tensors["bias"] = linear.bias.detach().float().clone()
            act_spec = None
            if s.act_bits is not None:
                act_spec, act_tensors = self._act_tensors(stats[name], s.act_bits)
                tensors.update({f"input_quantizer.{k}": v for k, v in act_tensors.items()})
            spec = LinearSpec(linear.in_features, linear.out_features, IntWeightSpec(s.weight_bits, s.group_size),
                              bias=linear.bias is not None, input=act_spec)
            plan.layers[name] = LayerPlan(spec=spec, tensors=tensors)
        for scan, ref in scans.items():
            plan.layers[scan] = self._scan_plan(scan, ref.reverse, stats, scan_inputs)
        return plan

    def _scan_plan(self, name: str, reverse: bool, stats, scan_inputs) -> LayerPlan:
        first = stats[f"{name}:u"]
        quantizers, tensors = {}, {}
        for arg in scan_inputs:
            # delta > 0 (after softplus): an affine grid does not waste half of the codes on negative values
            quantizers[arg], act_tensors = self._act_tensors(stats[f"{name}:{arg}"], self.args.scan_act_bits,
                                                             symmetric=arg != "delta")
            tensors.update({f"{arg}_quantizer.{k}": v for k, v in act_tensors.items()})
        spec = ScanSpec(int(first.token_min.numel()), int(first.channel_absmax.numel()),
                        int(stats[f"{name}:B"].channel_absmax.numel()), reverse=reverse, **quantizers,
                        keys=_RTN_SCAN_KEYS)
        return LayerPlan(spec=spec, tensors=tensors)
