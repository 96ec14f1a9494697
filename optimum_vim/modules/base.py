"""Shared machinery of the quantized modules: a typed spec per module and a registry to rebuild from it.

Every quantized module owns only named persistent buffers (never parameters), registered from the buffers its spec
declares (:mod:`optimum_vim.modules.spec`), so an empty module built from the spec on the meta device is filled by a
plain state-dict load. Each module turns itself back into the float module it replaced (:meth:`QModule.dequantize`).

NaN rule: NaN in -> NaN out. A quantized module's output is NaN wherever the float module's output would be NaN
because of a NaN input. Fake-quantized (quantize-dequantize) tensors carry NaN through by themselves; integer codes
cannot hold NaN, so every path that hands integer codes to a kernel records where NaN entered (:func:`nan_rows`) and
marks the outputs that depend on it (:func:`mark_nan`). Infinite values saturate to the largest code, as any
out-of-range value does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .spec import AnySpec, spec_from_dict, spec_kind

QMODULE_TYPES: dict[str, type] = {}


def register_qmodule(kind: str):
    """Class decorator: makes ``kind`` (the ``"type"`` of a spec) buildable by :func:`build_qmodule`."""

    def deco(cls):
        cls.KIND = kind
        QMODULE_TYPES[kind] = cls
        return cls

    return deco


class QModule(nn.Module):
    """Base of the quantized modules. ``spec`` is the module's typed spec (:mod:`optimum_vim.modules.spec`; its
    ``to_dict()`` is what config.json stores); a dict is converted (and validated) with the spec class's
    ``from_dict``. The buffers the spec declares are registered zero-filled; those of ``OPTIONAL_BUFFERS`` that it
    does not declare are ``None``."""

    KIND = "abstract"
    SPEC: type = None  # the spec class of this kind
    OPTIONAL_BUFFERS: tuple[str, ...] = ()  # buffer attributes that read None when the spec declares no such buffer

    def __init__(self, spec: AnySpec | dict):
        super().__init__()
        self.spec = self.SPEC.from_dict(spec)
        for buf in self.spec.buffers():
            self.register_buffer(buf.name, torch.zeros(buf.shape, dtype=buf.dtype), persistent=True)
        for name in self.OPTIONAL_BUFFERS:
            if not hasattr(self, name):
                setattr(self, name, None)

    def dequantize(self, dtype: torch.dtype | None = None, *, use_mamba_kernels: bool = True) -> nn.Module:
        """The float module this one stands for, with the dequantized weights (activation quantizers dropped; folded
        reparameterisations stay folded, which is exact in float), on this module's device, in ``dtype`` (default
        float32). ``use_mamba_kernels`` picks the float scan's backend, as the model config's option does."""
        new = self._float_module(use_mamba_kernels=use_mamba_kernels)
        first = next(iter(self.buffers()), None)
        new = new.to(device=first.device if first is not None else "cpu")
        return new.to(dtype) if dtype is not None else new

    def _float_module(self, use_mamba_kernels: bool) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} has no float counterpart")

    def _apply(self, fn, recurse=True):
        """Device moves apply to the buffers; dtype casts (``.to(dtype)``, ``.half()``, ``.bfloat16()``) do not:
        integer codes and fp32 scales keep their stored dtypes, as after ``from_pretrained(dtype=...)``, and the
        module's output follows its input dtype."""

        def keep_dtype(t):
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(device=out.device)

        return super()._apply(keep_dtype, recurse)

    def extra_repr(self) -> str:
        keys = ", ".join(f"{k}={v}" for k, v in self.spec.to_dict().items() if not isinstance(v, dict) and k != "type")
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


def build_qmodule(spec: AnySpec | dict) -> QModule:
    """An empty (zero-filled) quantized module of a typed spec (or a config.json dict, converted with
    :func:`~optimum_vim.modules.spec.spec_from_dict`); buffers are on the current default device."""
    spec = spec_from_dict(spec)
    return QMODULE_TYPES[spec_kind(spec)](spec)


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
