"""Shared machinery of the quantized modules: a JSON-able spec per module and a registry to rebuild from it.

Every quantized module owns only named persistent buffers (never parameters) whose names and shapes follow from
its spec, so an empty module built from the spec on the meta device is filled by a plain state-dict load.

NaN rule: NaN in -> NaN out. A quantized module's output is NaN wherever the float module's output would be NaN
because of a NaN input. Fake-quantized (quantize-dequantize) tensors carry NaN through by themselves; integer codes
cannot hold NaN, so every path that hands integer codes to a kernel records where NaN entered (:func:`nan_rows`) and
marks the outputs that depend on it (:func:`mark_nan`). Infinite values saturate to the largest code, as any
out-of-range value does.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

QMODULE_TYPES: dict[str, type] = {}


def register_qmodule(kind: str):
    """Class decorator: makes ``kind`` (the ``"type"`` of a spec) buildable by :func:`build_qmodule`."""

    def deco(cls):
        cls.KIND = kind
        QMODULE_TYPES[kind] = cls
        return cls

    return deco


class QModule(nn.Module):
    """Base of the quantized modules. ``spec`` is the module's JSON-able description (stored in config.json)."""

    KIND = "abstract"

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = copy.deepcopy(spec)
        self.spec["type"] = self.KIND

    def _apply(self, fn, recurse=True):
        """Device moves apply to the buffers; dtype casts (``.to(dtype)``, ``.half()``, ``.bfloat16()``) do not:
        integer codes and fp32 scales keep their stored dtypes, as after ``from_pretrained(dtype=...)``, and the
        module's output follows its input dtype."""

        def keep_dtype(t):
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(device=out.device)

        return super()._apply(keep_dtype, recurse)

    def _buffer(self, name: str, shape, dtype: torch.dtype) -> None:
        self.register_buffer(name, torch.zeros(shape, dtype=dtype), persistent=True)

    def extra_repr(self) -> str:
        keys = ", ".join(f"{k}={v}" for k, v in self.spec.items() if not isinstance(v, dict) and k != "type")
        return keys


def nan_rows(*xs: torch.Tensor) -> torch.Tensor | None:
    """(..., 1) bool: rows (last dim) holding a NaN in any of ``xs`` (same leading shape); a float linear layer's
    output row is NaN exactly there. ``None`` when no row does (checked on CPU only, where the host sync is free).

    Off GPU one sum of the whole tensor comes first (one pass, one scalar read: any NaN makes it NaN, so a sum that
    is not NaN clears the tensor); only then the row sums, and element by element only the rows whose sum is NaN (a
    sum is also NaN for +inf and -inf in one row, which the exact check then clears)."""
    mask = None
    for x in xs:
        if x is None:
            continue
        if x.is_cuda or torch.compiler.is_compiling():  # no host sync (a graph break under torch.compile / export)
            rows = torch.isnan(x).any(-1, keepdim=True)
        else:
            if not math.isnan(x.sum().item()):
                continue
            rows = torch.isnan(x.sum(-1, keepdim=True))
            if not bool(rows.any()):
                continue
            rows = rows & torch.isnan(x).any(-1, keepdim=True)
        mask = rows if mask is None else mask | rows
    return mask


def mark_nan(y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``y`` with NaN where ``mask`` (broadcastable; ``None``: nowhere) is set; no host sync."""
    if mask is None:
        return y
    return y.masked_fill(mask, float("nan"))


def build_qmodule(spec: dict) -> QModule:
    """An empty (zero-filled) quantized module of the spec's ``type``; buffers are on the current default device."""
    kind = spec.get("type")
    if kind not in QMODULE_TYPES:
        raise ValueError(f"unknown quantized module type {kind!r}; known: {sorted(QMODULE_TYPES)}")
    return QMODULE_TYPES[kind](spec)


def load_qmodule_tensors(module: QModule, tensors: dict[str, torch.Tensor]) -> None:
    """Copies ``tensors`` (names relative to ``module``) into its buffers; shapes and dtypes must match exactly."""
    own = dict(module.named_buffers())
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{type(module).__name__}: missing tensors {missing}, unexpected {unexpected}")
    for name, value in tensors.items():
        buf = own[name]
        if tuple(buf.shape) != tuple(value.shape) or buf.dtype != value.dtype:
            raise ValueError(
                f"{type(module).__name__}.{name}: expected {tuple(buf.shape)} {buf.dtype}, got {tuple(value.shape)} {value.dtype}"
            )
        buf.copy_(value.to(buf.device))
