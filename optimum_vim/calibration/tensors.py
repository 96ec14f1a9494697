"""Turning float weights and activation statistics into the buffers of the quantized modules."""

from __future__ import annotations

import torch

from ..primitives import affine_params, int_range, pack_signed, quantize


def weight_absmax(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Per-row (G = 1) or per-group absolute max of a (N, K) weight: (N, G)."""
    w = w.detach().float()
    if not group_size or group_size >= w.shape[1]:
        return w.abs().amax(1, keepdim=True)
    n, k = w.shape
    groups = -(-k // group_size)
    pad = groups * group_size - k
    wp = torch.nn.functional.pad(w, (0, pad)) if pad else w
    return wp.abs().reshape(n, groups, group_size).amax(-1)


def weight_codes(w: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Symmetric narrow-range integer codes (N, K) of ``w`` with (N, G) scales (int32)."""
    qmin, qmax = int_range(bits, True, True)
    k = w.shape[1]
    s = scale if scale.shape[1] == 1 else scale.repeat_interleave(group_size, 1)[:, :k]
    return quantize(w.detach().float(), s, None, qmin, qmax).to(torch.int32)


def store_weight_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Storage tensor for integer codes: int8 for 8 bit, packed uint8 (format v1) otherwise."""
    return codes.to(torch.int8) if bits == 8 else pack_signed(codes, bits)


def weight_absmean(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Per-row (G = 1) or per-group mean absolute value of a (N, K) weight: (N, G) (padding excluded)."""
    w = w.detach().float()
    if not group_size or group_size >= w.shape[1]:
        return w.abs().mean(1, keepdim=True)
    n, k = w.shape
    groups = -(-k // group_size)
    pad = groups * group_size - k
    wp = torch.nn.functional.pad(w.abs(), (0, pad)) if pad else w.abs()
    counts = torch.full((groups,), float(group_size), device=w.device)
    counts[-1] = group_size - pad
    return wp.reshape(n, groups, group_size).sum(-1) / counts


def binary_weight_tensors(w: torch.Tensor, group_size: int | None) -> dict[str, torch.Tensor]:
    """1-bit weights: ``sign(w)`` (0 counts as +1) times the per-row / per-group mean |w|, the scale that minimises
    the squared error of a +-scale approximation (XNOR-Net's closed form)."""
    scale = weight_absmean(w, group_size).clamp(min=1e-12)
    codes = torch.where(w.detach() >= 0, 1, -1).to(torch.int32)
    return {"qweight": store_weight_codes(codes, 1), "weight_scale": scale.float().contiguous()}


def rtn_weight_tensors(w: torch.Tensor, bits: int, group_size: int | None) -> dict[str, torch.Tensor]:
    """Round-to-nearest symmetric weight quantization: ``qweight`` and ``weight_scale`` buffers (1 bit: binary,
    see :func:`binary_weight_tensors`)."""
    if bits == 1:
        return binary_weight_tensors(w, group_size)
    _, qmax = int_range(bits, True, True)
    scale = (weight_absmax(w, group_size) / qmax).clamp(min=1e-12)
    codes = weight_codes(w, scale, bits, group_size)
    return {"qweight": store_weight_codes(codes, bits), "weight_scale": scale.float().contiguous()}


def affine_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, narrow: bool = True):
    """Buffers ``{"scale", "zero_point"}`` for a range: symmetric uses max(|lo|, |hi|)."""
    if symmetric:
        _, qmax = int_range(bits, True, narrow)
        absmax = torch.maximum(lo.abs(), hi.abs())
        return {"scale": (absmax / qmax).clamp(min=1e-8).float().reshape(-1)}
    scale, zero = affine_params(lo, hi, bits)
    return {"scale": scale.float().reshape(-1), "zero_point": zero.to(torch.int32).reshape(-1)}
