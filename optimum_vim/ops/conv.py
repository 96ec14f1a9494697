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

    CPU inference calls run the fused numba conv (one pass, ``optimum_vim_kernels.cpu.causal_conv1d``) unless the
    kernel policy is ``reference``; with autograd, on other devices and for fp64 the PyTorch conv runs.

    ``out[t] = bias + sum_k w[k] * x[t - (K-1) + k]`` (forward), ``out[t] = bias + sum_k w[k] * x[t + (K-1) - k]``
    (reverse). Written as K shifted multiply-adds, so the token-major layout needs no transposes.
    """
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d expects x of shape (batch, length, channels); got {tuple(x.shape)}")
    channels = x.shape[-1]
    w = weight.reshape(weight.shape[0], weight.shape[-1])
    if w.shape[0] != channels:
        raise ValueError(f"conv weight has {w.shape[0]} channels but x has {channels}")
    kernel = _cpu_conv_kernel(x, weight, bias)
    if kernel is not None:
        return kernel(x, w, bias, reverse)
    return causal_conv1d_torch(x, w, bias, reverse)


def _cpu_conv_kernel(x, weight, bias):
    """The fused CPU conv (``optimum_vim_kernels.cpu.causal_conv1d``) for CPU inference calls under the ``auto`` /
    ``cpu`` kernel policies, else None (the PyTorch conv below)."""
    from .dispatch import KernelBackend, current_backend, pick_kernel

    if torch.compiler.is_compiling():  # numba is opaque to dynamo: compiled graphs take the PyTorch conv
        return None
    if x.device.type != "cpu" or current_backend() in (KernelBackend.REFERENCE, KernelBackend.TRITON):
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return None  # the fused conv has no backward: autograd runs the PyTorch conv, under every policy
    return pick_kernel("conv", "causal_conv1d", x, dtype=x.dtype, device=x.device, requires_grad=False)


def causal_conv1d_torch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                        reverse: bool = False) -> torch.Tensor:
    """The PyTorch conv (the reference, differentiable): x (batch, L, E), w (E, K)."""
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
