"""The float modules that the quantized conv and scan stand for, below every model family so that
:meth:`QConv1d.dequantize <optimum_vim.modules.QModule.dequantize>` and ``QSelectiveScan.dequantize`` can build them
without importing a model. Model files use them directly (Vim names them ``VimConv1d`` / ``VimSelectiveScan``)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import causal_conv1d, selective_scan


class TokenConv1d(nn.Conv1d):
    """Depthwise convolution over tokens: causal for the forward scan, anti-causal (``reverse``) for the backward one.

    Stores ``weight`` (E, 1, K) and ``bias`` (E,) exactly as the official ``conv1d`` / ``conv1d_b``.
    Input and output are token-major: (batch, L, E).
    """

    def __init__(self, channels: int, kernel_size: int, reverse: bool = False):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=True)
        self.reverse = reverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return causal_conv1d(x, self.weight, self.bias, reverse=self.reverse)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", reverse={self.reverse}"


class SelectiveScan(nn.Module):
    """The selective scan of one direction, a parameter-free module so that quantizers can wrap it.

    ``forward(u, delta, A, B, C, D)``: u, delta (batch, L, E); A (E, N); B, C (batch, L, N); D (E,) -> (batch, L, E).
    """

    def __init__(self, reverse: bool = False, use_mamba_kernels: bool = True):
        super().__init__()
        self.reverse = reverse
        self.backend = "auto" if use_mamba_kernels else "torch"

    def forward(self, u, delta, A, B, C, D=None, z=None):
        return selective_scan(u, delta, A, B, C, D, z, reverse=self.reverse, backend=self.backend)

    def extra_repr(self) -> str:
        return f"reverse={self.reverse}"
