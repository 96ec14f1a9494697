"""Differentiable fake-quant stand-ins of the quantized modules, trained by the block-wise engine.

During calibration a block's linears are replaced by :class:`FakeQuantLinear`, which computes exactly what the
exported :class:`~optimum_vim.modules.QLinear` will compute (same smoothing, same rounding, same clamp) in float, with
straight-through rounding so that step sizes and smoothing vectors receive gradients. ``export()`` freezes a stand-in
into the ``LayerPlan`` of the real module.

Gradients follow methods.md §1.2: round has an identity gradient, the clamp none outside the range (so a code
clipped at the edge passes ``q_max`` to its step, like LSQ), and no LSQ gradient scaling (neither PTQ4VM's nor
OuroMamba's code applies one).
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules.plan import LayerPlan
from ..modules.spec import ActivationSpec, IntWeightSpec, LinearSpec
from ..primitives import fake_quantize, int_range, quantize
from .tensors import store_weight_codes

_MIN_STEP = 1e-8
# the keys the stand-ins' linear specs have always stored (``smooth`` even when False: storage format v1 as saved)
STAND_IN_LINEAR_KEYS = frozenset({"in_features", "out_features", "bias", "weight", "input", "smooth"})
_MIN_SMOOTH = 1e-5  # PTQ4VM clamps its smoothing init here; kept as the floor while training


class LearnedWeightQuantizer(nn.Module):
    """Symmetric per-output-row weight quantizer with a trainable step ``step (N, 1)``; codes ``+-(2^(b-1) - 1)``."""

    def __init__(self, step: torch.Tensor, bits: int):
        super().__init__()
        if step.dim() != 2 or step.shape[1] != 1:
            raise ValueError(f"per-row weight steps have shape (N, 1); got {tuple(step.shape)}")
        self.bits = bits
        self.qmin, self.qmax = int_range(bits, True, True)
        self.step = nn.Parameter(step.detach().float().clone())

    def _step(self) -> torch.Tensor:
        return self.step.clamp(min=_MIN_STEP)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self._step(), None, self.qmin, self.qmax, ste=True)

    @torch.no_grad()
    def export(self, w: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
        """``(weight spec, {"qweight", "weight_scale"})`` of the QLinear storing ``w`` with the learned steps."""
        step = self._step().detach().float().contiguous()
        codes = quantize(w.detach().float(), step, None, self.qmin, self.qmax).to(torch.int32)
        return IntWeightSpec(self.bits), {"qweight": store_weight_codes(codes, self.bits), "weight_scale": step}


class LearnedActQuantizer(nn.Module):
    """Static per-token-position activation quantizer over (batch, L, C): a trainable step per position ``step (L,)``
    and, when asymmetric, an integer zero point per position that stays frozen (PTQ4VM: the zero points are fixed
    after the grid initialisation)."""

    def __init__(self, step: torch.Tensor, bits: int, zero_point: torch.Tensor | None = None):
        super().__init__()
        if step.dim() != 1:
            raise ValueError(f"per-token steps have shape (L,); got {tuple(step.shape)}")
        self.bits = bits
        self.symmetric = zero_point is None
        self.qmin, self.qmax = int_range(bits, self.symmetric, True)
        self.step = nn.Parameter(step.detach().float().clone())
        if zero_point is not None:
            self.register_buffer("zero_point", zero_point.detach().float().round().clone())
        else:
            self.zero_point = None

    @property
    def length(self) -> int:
        return self.step.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != self.length:
            raise ValueError(f"per-token steps were initialised for {self.length} tokens; got {x.shape[-2]}")
        step = self.step.clamp(min=_MIN_STEP).view(-1, 1)
        zero = self.zero_point.view(-1, 1) if self.zero_point is not None else None
        return fake_quantize(x, step, zero, self.qmin, self.qmax, ste=True)

    @torch.no_grad()
    def export(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """``(QActivation spec, buffers)`` of the equivalent static per-token quantizer."""
        spec = ActivationSpec(self.bits, "token", symmetric=self.symmetric, length=self.length)
        tensors = {"scale": self.step.clamp(min=_MIN_STEP).detach().float().contiguous()}
        if self.zero_point is not None:
            tensors["zero_point"] = self.zero_point.to(torch.int32).contiguous()
        return spec, tensors


class FakeQuantLinear(nn.Module):
    """Training stand-in of a quantized ``nn.Linear``: ``x / sigma -> act quantizer -> (W * sigma) quantized``.

    ``smooth`` is an optional trainable per-input-channel vector sigma (PTQ4VM's SmoothQuant-style smoothing; it
    cancels exactly in float, only the rounding sees the smoothed tensors). The float weight and bias are frozen
    copies; only the quantizers' steps and sigma train. ``weight_quantizer`` is any module mapping the (smoothed)
    weight to its fake-quantized value that has ``export(w) -> (weight spec, tensors)``.
    """

    def __init__(self, linear: nn.Linear, weight_quantizer: nn.Module, act_quantizer: nn.Module | None = None,
                 smooth: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().float().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer
        self.smooth = None if smooth is None else nn.Parameter(smooth.detach().float().clone())

    def smooth_vector(self) -> torch.Tensor | None:
        return None if self.smooth is None else self.smooth.clamp(min=_MIN_SMOOTH)

    def smoothed_weight(self) -> torch.Tensor:
        s = self.smooth_vector()
        return self.weight if s is None else self.weight * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.smooth_vector()
        if s is not None:
            x = x / s
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        return nn.functional.linear(x, self.weight_quantizer(self.smoothed_weight()), self.bias)

    @torch.no_grad()
    def export(self) -> LayerPlan:
        """The ``LayerPlan`` of the QLinear computing what this stand-in computes (sigma folded into the codes)."""
        weight_spec, tensors = self.weight_quantizer.export(self.smoothed_weight())
        if self.bias is not None:
            tensors["bias"] = self.bias.clone()
        if self.smooth is not None:
            tensors["smooth_scale"] = self.smooth_vector().detach().float().contiguous()
        act_spec = None
        if self.act_quantizer is not None:
            act_spec, act_tensors = self.act_quantizer.export()
            tensors.update({f"input_quantizer.{k}": v for k, v in act_tensors.items()})
        spec = LinearSpec(self.in_features, self.out_features, weight_spec, bias=self.bias is not None, input=act_spec,
                          smooth=self.smooth is not None, keys=STAND_IN_LINEAR_KEYS)
        return LayerPlan(spec=spec, tensors=tensors)

    def trainable(self) -> dict[str, list[nn.Parameter]]:
        """The trainable tensors by kind: ``{"weight_step": [...], "act_step": [...], "smooth": [...]}``."""
        out = {"weight_step": [p for p in self.weight_quantizer.parameters() if p.requires_grad],
               "act_step": [], "smooth": []}
        if self.act_quantizer is not None:
            out["act_step"] = [p for p in self.act_quantizer.parameters() if p.requires_grad]
        if self.smooth is not None:
            out["smooth"] = [self.smooth]
        return out
