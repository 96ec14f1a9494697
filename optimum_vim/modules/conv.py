"""QConv1d (the depthwise token convolution of Vim and MambaVision) and QOutput (output quantizer around an elementwise module).

QConv1d's spec is a :class:`~optimum_vim.modules.spec.Conv1dSpec` (dict form::

    {"type": "conv1d", "channels": E, "kernel_size": K, "reverse": bool,
     "weight": {"bits": 2..8, "granularity": "channel" | "tensor"},
     "input": null | <QActivation spec>, "output": null | <QActivation spec>,
     ["padding": "causal" | "same", "bias": bool]}

; ``padding`` / ``bias`` are written only when they differ from Vim's causal conv with bias, so Vim configs stay as
they were). Buffers: ``qweight`` (int8 (E, K) or packed uint8), ``weight_scale`` (fp32 (E,) or (1,)), ``bias`` (fp32
(E,), when the spec has one). It dequantizes to :class:`~optimum_vim.modules.float.TokenConv1d`.

QOutput's spec is an :class:`~optimum_vim.modules.spec.OutputSpec` (``{"type": "output", "inner": "silu" | "softplus"
| "identity", "output": <QActivation spec>, "input": null | <QActivation spec>}``). The optional ``input`` quantizer
runs before the function: k-scaled PTQ quantizes the *outputs* of in_proj (z half) and dt_proj, which in this module
family are the inputs of the gate SiLU and of the softplus (buffers ``input_quantizer.*``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..primitives import unpack_signed
from .activation import QActivation
from .base import QModule, register_qmodule
from .float import TokenConv1d, token_conv1d
from .spec import Conv1dSpec, OutputSpec


@register_qmodule("conv1d")
class QConv1d(QModule):
    """Quantized depthwise token conv ((anti-)causal or "same"): (batch, L, E) -> (batch, L, E)."""

    SPEC = Conv1dSpec
    OPTIONAL_BUFFERS = ("bias",)

    def __init__(self, spec: Conv1dSpec | dict):
        super().__init__(spec)
        self.bits = self.spec.weight.bits
        self.reverse = bool(self.spec.reverse)
        self.input_quantizer = QActivation(self.spec.input) if self.spec.input is not None else None
        self.output_quantizer = QActivation(self.spec.output) if self.spec.output is not None else None

    def _float_module(self, use_mamba_kernels: bool) -> nn.Module:
        new = TokenConv1d(self.spec.channels, self.spec.kernel_size, reverse=self.reverse, padding=self.spec.padding,
                          bias=self.spec.bias)
        with torch.no_grad():
            new.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                new.bias.copy_(self.bias)
        return new

    def num_weight_parameters(self) -> int:
        """Float parameters this layer stands for (weight and bias), as ``num_parameters()`` counts them."""
        return self.spec.num_float_parameters()

    def dequantized_weight(self) -> torch.Tensor:
        """(E, 1, K) float32, the layout of ``nn.Conv1d``."""
        k = self.spec.kernel_size
        codes = self.qweight.to(torch.int32) if self.bits == 8 else unpack_signed(self.qweight, self.bits, k)
        return (codes.float() * self.weight_scale.view(-1, 1)).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = token_conv1d(x, self.dequantized_weight().to(x.dtype), self.bias, reverse=self.reverse,
                         padding=self.spec.padding)
        if self.output_quantizer is not None:
            y = self.output_quantizer(y)
        return y


_INNER = {"silu": F.silu, "softplus": F.softplus, "identity": lambda x: x}


@register_qmodule("output")
class QOutput(QModule):
    """Applies an elementwise function (SiLU, softplus, identity) around an input and/or an output quantizer
    (k-scaled PTQ quantizes the outputs; OuroMamba's official Δ quantizer sits on softplus's input)."""

    SPEC = OutputSpec

    def __init__(self, spec: OutputSpec | dict):
        super().__init__(spec)
        self.fn = _INNER[self.spec.inner]
        self.input_quantizer = QActivation(self.spec.input) if self.spec.input is not None else None
        self.output_quantizer = QActivation(self.spec.output) if self.spec.output is not None else None

    def _float_module(self, use_mamba_kernels: bool) -> nn.Module:
        return {"silu": nn.SiLU, "softplus": nn.Softplus, "identity": nn.Identity}[self.spec.inner]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = self.fn(x)
        return y if self.output_quantizer is None else self.output_quantizer(y)
