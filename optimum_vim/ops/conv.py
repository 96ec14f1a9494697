"""Depthwise causal (and anti-causal) 1-D convolution over tokens, token-major layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, reverse: bool = False
) -> torch.Tensor:
    """Depthwise convolution along the token axis with zero padding on one side.

    Args:
        x: (batch, L, E). weight: (E, K) or (E, 1, K) as stored by ``nn.Conv1d``. bias: (E,) or None.
        reverse: anti-causal (looks at tokens ``t .. t+K-1``), which equals the official Vim backward branch's causal
            convolution of the flipped sequence, flipped back.

    Returns:
        (batch, L, E) in ``x.dtype``; accumulation in fp32 (as the causal-conv1d kernel does), fp64 for fp64 input.

    ``out[t] = bias + sum_k w[k] * x[t - (K-1) + k]`` (forward), ``out[t] = bias + sum_k w[k] * x[t + (K-1) - k]``
    (reverse). Written as K shifted multiply-adds, so the token-major layout needs no transposes.
    """
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d expects x of shape (batch, length, channels); got {tuple(x.shape)}")
    channels = x.shape[-1]
    w = weight.reshape(weight.shape[0], weight.shape[-1])
    if w.shape[0] != channels:
        raise ValueError(f"conv weight has {w.shape[0]} channels but x has {channels}")
    k = w.shape[1]
    length = x.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x32 = x.to(acc)
    w32 = w.to(acc).t()  # (K, E)
    pad = (0, 0, 0, k - 1) if reverse else (0, 0, k - 1, 0)
    xp = F.pad(x32, pad)
    if bias is not None:
        out = bias.to(acc).expand_as(x32).clone()
    else:
        out = torch.zeros_like(x32)
    for j in range(k):
        # forward: tap j reads xp[t + j]; reverse: tap j reads xp[t + (K-1) - j]
        offset = (k - 1 - j) if reverse else j
        out = out.addcmul(xp[:, offset : offset + length], w32[j])
    return out.to(x.dtype)
