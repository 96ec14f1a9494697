"""The float modules that the quantized conv and scan stand for, below every model family so that
:meth:`QConv1d.dequantize <optimum_vim.modules.QModule.dequantize>` and ``QSelectiveScan.dequantize`` can build them
without importing a model. Model files use them directly (Vim names them ``VimConv1d`` / ``VimSelectiveScan``;
MambaVision uses them as they are)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import causal_conv1d, selective_scan

TOKEN_PADDINGS = ("causal", "same")


def token_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, reverse: bool = False,
                 padding: str = "causal") -> torch.Tensor:
    """Depthwise token convolution (batch, L, E) -> (batch, L, E) on optimum-vim's conv op (the fused CPU kernel on
    CPU inference). ``padding="causal"``: zeros before the sequence (after it with ``reverse``), as Vim's convs;
    ``"same"``: PyTorch's ``padding="same"`` (``(K - 1) // 2`` zeros before, the rest after), as MambaVision's, computed
    as the causal convolution of the input followed by the after-zeros, read from that offset on."""
    if padding == "causal":
        return causal_conv1d(x, weight, bias, reverse=reverse)
    if padding != "same" or reverse:
        raise ValueError(f"token conv padding must be 'causal' (optionally reversed) or 'same'; got {padding!r}"
                         f"{' with reverse' if reverse else ''}")
    k = weight.shape[-1]
    right = k - 1 - (k - 1) // 2
    if not right:
        return causal_conv1d(x, weight, bias)
    return causal_conv1d(torch.nn.functional.pad(x, (0, 0, 0, right)), weight, bias)[:, right:]


class TokenConv1d(nn.Conv1d):
    """Depthwise convolution over tokens: causal for the forward scan, anti-causal (``reverse``) for the backward one,
    or non-causal (``padding="same"``, MambaVision's ``conv1d_x`` / ``conv1d_z``).

    Stores ``weight`` (E, 1, K) and ``bias`` (E,) (none with ``bias=False``) exactly as the official modules.
    Input and output are token-major: (batch, L, E).
    """

    def __init__(self, channels: int, kernel_size: int, reverse: bool = False, padding: str = "causal",
                 bias: bool = True):
        if padding not in TOKEN_PADDINGS or (reverse and padding != "causal"):
            raise ValueError(f"TokenConv1d padding must be one of {TOKEN_PADDINGS} (reverse only with 'causal'); got "
                             f"padding={padding!r}, reverse={reverse}")
        super().__init__(channels, channels, kernel_size, groups=channels, bias=bias,
                         padding="same" if padding == "same" else 0)
        self.reverse = reverse

    @property
    def token_padding(self) -> str:
        """``"causal"`` or ``"same"``."""
        return "same" if self.padding == "same" else "causal"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return token_conv1d(x, self.weight, self.bias, reverse=self.reverse, padding=self.token_padding)

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
