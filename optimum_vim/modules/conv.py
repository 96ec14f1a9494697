"""QConv1d (Vim's depthwise token convolution) and QOutput (output quantizer around an elementwise module).

QConv1d spec::

    {"type": "conv1d", "channels": E, "kernel_size": K, "reverse": bool,
     "weight": {"bits": 2..8, "granularity": "channel" | "tensor"},
     "input": null | <QActivation spec>, "output": null | <QActivation spec>}

Buffers: ``qweight`` (int8 (E, K) or packed uint8), ``weight_scale`` (fp32 (E,) or (1,)), ``bias`` (fp32 (E,)).

QOutput spec: ``{"type": "output", "inner": "silu" | "softplus" | "identity", "output": <QActivation spec>,
"input": null | <QActivation spec>}``. The optional ``input`` quantizer runs before the function: k-scaled PTQ
quantizes the *outputs* of in_proj (z half) and dt_proj, which in this module family are the inputs of the gate
SiLU and of the softplus (buffers ``input_quantizer.*``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import causal_conv1d
from ..primitives import packed_row_bytes, unpack_signed
from .activation import QActivation
from .base import QModule, register_qmodule


@register_qmodule("conv1d")
class QConv1d(QModule):
    """Quantized depthwise (anti-)causal conv over tokens: (batch, L, E) -> (batch, L, E)."""

    def __init__(self, spec: dict):
        super().__init__(spec)
        e, k = spec["channels"], spec["kernel_size"]
        w = spec["weight"]
        self.bits = w["bits"]
        if self.bits not in range(2, 9):
            raise ValueError(f"conv weight bits must be 2..8; got {self.bits}")
        if w.get("granularity", "channel") not in ("channel", "tensor"):
            raise ValueError(f"conv weight granularity must be 'channel' or 'tensor'; got {w.get('granularity')!r}")
        self.reverse = bool(spec.get("reverse", False))
        if self.bits == 8:
            self._buffer("qweight", (e, k), torch.int8)
        else:
            self._buffer("qweight", (e, packed_row_bytes(k, self.bits)), torch.uint8)
        self._buffer("weight_scale", (e if w.get("granularity", "channel") == "channel" else 1,), torch.float32)
        self._buffer("bias", (e,), torch.float32)
        self.input_quantizer = QActivation(spec["input"]) if spec.get("input") else None
        self.output_quantizer = QActivation(spec["output"]) if spec.get("output") else None

    def num_weight_parameters(self) -> int:
        """Float parameters this layer stands for (weight and bias), as ``num_parameters()`` counts them."""
        return self.spec["channels"] * (self.spec["kernel_size"] + 1)

    def dequantized_weight(self) -> torch.Tensor:
        """(E, 1, K) float32, the layout of ``nn.Conv1d``."""
        k = self.spec["kernel_size"]
        codes = self.qweight.to(torch.int32) if self.bits == 8 else unpack_signed(self.qweight, self.bits, k)
        return (codes.float() * self.weight_scale.view(-1, 1)).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = causal_conv1d(x, self.dequantized_weight().to(x.dtype), self.bias, reverse=self.reverse)
        if self.output_quantizer is not None:
            y = self.output_quantizer(y)
        return y


_INNER = {"silu": F.silu, "softplus": F.softplus, "identity": lambda x: x}


@register_qmodule("output")
class QOutput(QModule):
    """Applies an elementwise function (SiLU, softplus, identity) around an input and/or an output quantizer
    (k-scaled PTQ quantizes the outputs; OuroMamba's official Δ quantizer sits on softplus's input)."""

    def __init__(self, spec: dict):
        super().__init__(spec)
        if spec.get("inner") not in _INNER:
            raise ValueError(f"QOutput inner must be one of {sorted(_INNER)}; got {spec.get('inner')!r}")
        if not isinstance(spec.get("output"), dict) and not isinstance(spec.get("input"), dict):
            raise ValueError(f"QOutput needs an input or an output quantizer spec; got input {spec.get('input')!r}, "
                             f"output {spec.get('output')!r}")
        self.fn = _INNER[spec["inner"]]
        self.input_quantizer = QActivation(spec["input"]) if spec.get("input") else None
        self.output_quantizer = QActivation(spec["output"]) if spec.get("output") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = self.fn(x)
        return y if self.output_quantizer is None else self.output_quantizer(y)
