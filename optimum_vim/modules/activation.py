"""QActivation: static (or dynamic per-token) uniform quantizer of an activation tensor (batch, L, C).

Its spec is an :class:`~optimum_vim.modules.spec.ActivationSpec` (its ``to_dict()`` is the JSON form). Fields:
``bits``, ``symmetric`` (else affine with an integer zero point), ``narrow`` (symmetric range
+-(2^(b-1)-1) instead of [-2^(b-1), 2^(b-1)-1]), ``granularity`` and the sizes it needs:

=================  ==========================================  ================================
granularity        scale / zero point buffers                  used by
=================  ==========================================  ================================
tensor             ``scale (1,)``                              RTN baseline
token              ``scale (L,)``, one per token position      PTQ4VM, OuroMamba inliers
token_cluster      ``labels (L,)`` -> ``scale (k,)``           k-scaled (token-wise)
channel            ``scale (C,)``                              --
channel_cluster    ``labels (C,)`` -> ``scale (k,)``           k-scaled (channel-wise)
dynamic_token      none (absmax of each token at run time)     --
dynamic_outlier    ``scale (L,)`` static inlier scale per      OuroMamba (W4A4O8 / W4A8O16)
                   token (+ ``zero_point (L,)`` if affine);
                   ``outlier_channels (C,)`` uint8 with
                   ``static_outliers``
=================  ==========================================  ================================

``dynamic_outlier`` (OuroMamba's mixed-precision extractor, ``optimum_vim.primitives.outliers``): inliers on the
static per-token grid; outlier channels detected **per sample at run time** (``|x| > mean + outlier_sigma·std``
over channels, triggered when a token leaves its static range), accumulated over windows of ``refresh`` tokens in
scan order (``reverse: true`` for the backward scan) and reset at each window; outliers in ``outlier_bits`` 8
(symmetric, per (sample, token) absmax) or 16 (fp16). Extra spec fields, all stored so reloads are bit-identical:
``length``, ``outlier_bits`` (8 | 16, default 8), ``refresh`` (int >= 1, default 10), ``outlier_sigma`` (> 0,
default 3.0), ``reverse`` (bool), ``static_outliers`` (bool: a fixed list ``outlier_channels`` instead of the
detection; needs ``channels``), and, only where they differ from the defaults, ``outlier_trigger`` (``"interval"`` |
``"range"``) and ``outlier_affine`` (bool): the official Δ quantizer's rules (``primitives.outliers``).

``channel_factor: true`` multiplies every scale by a per-channel vector ``factor (C,)`` (the k-scaled
reparameterisation factor r_C). Zero points are stored as int32 codes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from optimum_vim_kernels.tensors import tensor_version
from torch import nn

from ..primitives import dequantize, int_range, quantize, quantize_int8
from .base import QModule, register_qmodule
from .spec import ActivationSpec
from .training import activation_ste, needs_grad

ROW_GRANULARITIES = ("tensor", "token", "token_cluster", "dynamic_token")  # one scale per (sample, token) row
_STATIC_ROWS = ("tensor", "token", "token_cluster")  # static scales, one per (sample, token) row


class _RowConstants(NamedTuple):
    """What a static row quantizer needs per call, derived from its buffers once (``QActivation.static_rows``)."""

    scale_view: torch.Tensor  # fp32, (1, 1, 1) or (1, L, 1)
    zero_view: torch.Tensor | None  # fp32 zero point minus the int8 shift, same shape; None when symmetric
    qmin: int  # int8 clamp bounds (shifted like the zero point)
    qmax: int
    zero: torch.Tensor | None  # int32 (1,) or (L,)
    scale_rows: torch.Tensor  # the GEMM's row scales: (1,) or (batch * L,)
    zero_rows: torch.Tensor | None  # int32, same shape


@register_qmodule("activation")
class QActivation(QModule):
    """Fake-quantizes activations in the reference path, and hands kernels integer codes with row scales."""

    SPEC = ActivationSpec

    def __init__(self, spec: ActivationSpec | dict):
        super().__init__(spec)
        spec = self.spec
        self.bits = spec.bits
        self.symmetric = spec.symmetric
        self.granularity = spec.granularity
        self.qmin, self.qmax = int_range(self.bits, self.symmetric, spec.narrow)

    def _float_module(self, use_mamba_kernels: bool) -> nn.Module:
        return nn.Identity()  # a quantizer on its own stands for no float computation

    # ------------------------------------------------------------------ scales
    def _check_input(self, x: torch.Tensor) -> None:
        if self.granularity in ("token", "token_cluster") and x.shape[-2] != self.spec.length:
            raise ValueError(
                f"static per-token scales were calibrated for {self.spec.length} tokens; got {x.shape[-2]}. "
                "Per-position scales are tied to the calibration image size and patch layout."
            )
        channels = self.spec.channels
        if channels is not None and self.granularity.startswith("channel") and x.shape[-1] != channels:
            raise ValueError(f"quantizer expects {channels} channels; got {x.shape[-1]}")

    def scale_and_zero(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale and zero point broadcastable against ``x`` (batch, L, C) (fp32)."""
        self._check_input(x)
        g = self.granularity
        zero = None
        if g == "dynamic_token":
            scale = x.detach().float().abs().amax(-1, keepdim=True).clamp(min=1e-8) / self.qmax
        else:
            s = self.scale
            z = self.zero_point.float() if not self.symmetric else None
            if g.endswith("cluster"):
                idx = self.labels.long()
                s = s[idx]
                z = z[idx] if z is not None else None
            view = {"tensor": (1, 1, 1), "token": (1, -1, 1), "token_cluster": (1, -1, 1),
                    "channel": (1, 1, -1), "channel_cluster": (1, 1, -1)}[g]
            scale = s.view(view)
            zero = z.view(view) if z is not None else None
        if self.spec.channel_factor:
            scale = scale * self.factor.view(1, 1, -1)
        return scale, zero

    @staticmethod
    def _as3d(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return x
        if x.dim() < 2:
            raise ValueError(f"activation quantizer expects (batch, L, C) tensors; got shape {tuple(x.shape)}")
        return x.reshape(-1, *x.shape[-2:]) if x.dim() > 3 else x.unsqueeze(0)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Integer codes (as fp32, shape of ``x`` viewed as (batch, L, C)), scale and zero point."""
        if self.granularity == "dynamic_outlier":
            raise ValueError("a 'dynamic_outlier' quantizer has no single code tensor (its outliers keep their own "
                             "precision): use outlier_split(x), which returns the inlier codes, the outlier "
                             "positions and their values")
        x3 = self._as3d(x)
        scale, zero = self.scale_and_zero(x3)
        return quantize(x3.float(), scale, zero, self.qmin, self.qmax), scale, zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize (the reference path): float output in ``x.dtype``. With a gradient to compute, the
        rounding is straight-through (:mod:`optimum_vim.modules.training`)."""
        if needs_grad(self, x):
            return activation_ste(self, x)
        if self.granularity == "dynamic_outlier":
            return self.outlier_split(x).dequantize().reshape(x.shape).to(x.dtype)
        q, scale, zero = self.quantize(x)
        return dequantize(q, scale, zero).reshape(x.shape).to(x.dtype)

    def static_codes(self, x: torch.Tensor, allow_zero: bool = False):
        """For the scan kernel: ``(codes int8 (batch, L, C), scale (L,) or (1,), zero int32 or None)`` when the scale
        is static per tensor or per token position and codes fit int8 (affine codes only with ``allow_zero``);
        else ``None``."""
        if self.granularity not in ("tensor", "token") or self.spec.channel_factor:
            return None
        if self.qmax - self.qmin > 255 or (not self.symmetric and not allow_zero):
            return None
        x3 = self._as3d(x)
        codes, _, _ = self._int8_codes(x3)
        return codes, self.scale, self.static_rows(*x3.shape[:2]).zero

    @property
    def code_shift(self) -> int:
        """What int8 storage subtracts from this quantizer's codes: 128 for affine 8-bit codes in [0, 255], else 0."""
        return 128 if not self.symmetric and self.qmax > 127 else 0

    def _int8_codes(self, x3: torch.Tensor):
        """``(codes int8 (batch, L, C), scale, zero)`` broadcastable against ``x3``; affine 8-bit codes in [0, 255]
        are emitted shifted by -128 (the returned fp32 zero point with them), so ``x ~ scale * (codes - zero)``.

        Static per-tensor / per-token scales take their (cached) constants and four in-place passes over one
        temporary: ``x / scale``, round, ``+ zero``, clamp, then the int8 cast (the values of
        :func:`~optimum_vim.primitives.quantize_int8`)."""
        if self.granularity not in _STATIC_ROWS or self.spec.channel_factor:
            scale, zero = self.scale_and_zero(x3)
            shift = self.code_shift
            if shift:
                zero = zero - shift
            return quantize_int8(x3, scale, zero, self.qmin - shift, self.qmax - shift), scale, zero
        self._check_input(x3)
        k = self.static_rows(*x3.shape[:2])
        # fp16 / bf16 inputs are promoted exactly by the division, as x.float() would
        q = torch.div(x3 if x3.dtype in (torch.float32, torch.float16, torch.bfloat16) else x3.float(), k.scale_view)
        q.round_()
        if k.zero_view is not None:
            q.add_(k.zero_view)
        return q.clamp_(k.qmin, k.qmax).to(torch.int8), k.scale_view, k.zero_view

    def static_rows(self, batch: int, length: int) -> _RowConstants:
        """The constants of a static per-tensor / per-token quantizer for (batch, L, C) inputs, built once and kept
        until ``scale`` / ``zero_point`` / ``labels`` change (in place or replaced) or the batch size changes."""
        compiling = torch.compiler.is_compiling()  # traced into the graph: an id()-keyed cache would guard per layer
        if not compiling:
            buffers = tuple(getattr(self, name, None) for name in ("scale", "zero_point", "labels"))
            key = (batch, length, *((id(t), tensor_version(t)) for t in buffers if t is not None))
            cache = self.__dict__.setdefault("_row_constants", {})
            hit = cache.get(key)
            if hit is not None:
                return hit
        scale = self.scale.float()
        shift = self.code_shift
        zero = None if self.symmetric else (self.zero_point - shift).to(torch.int32)
        if self.granularity == "token_cluster":
            idx = self.labels.long()
            scale, zero = scale[idx], (zero[idx] if zero is not None else None)
        per_row = self.granularity != "tensor"
        view = (1, -1, 1) if per_row else (1, 1, 1)
        k = _RowConstants(
            scale_view=scale.view(view), zero_view=None if zero is None else zero.float().view(view),
            qmin=self.qmin - shift, qmax=self.qmax - shift, zero=zero,
            scale_rows=scale.repeat(batch) if per_row else scale.reshape(1),
            zero_rows=None if zero is None else (zero.repeat(batch) if per_row else zero.reshape(1)),
        )
        if compiling:
            return k
        if len(cache) >= 8:
            cache.clear()
        cache[key] = k
        return k

    def row_quantize(self, x: torch.Tensor):
        """For integer GEMMs: ``(codes int8 (M, C), scale fp32, zero int32 or None)`` with one scale per row (sample,
        token): ``scale`` / ``zero`` of shape (M,), or (1,) when one value serves every row (per-tensor scales);
        ``None`` when scales vary along channels or codes do not fit int8.

        Affine 8-bit codes in [0, 255] are shifted by -128 into int8, the zero point with them, so
        ``x = scale * (codes - zero)`` holds for the returned values."""
        if self.granularity not in ROW_GRANULARITIES or self.spec.channel_factor:
            return None
        if self.qmax - self.qmin > 255:
            return None
        x3 = self._as3d(x)
        codes, scale, _ = self._int8_codes(x3)
        c = codes.shape[-1]
        if self.granularity == "dynamic_token":  # symmetric, one scale per (sample, token) computed from x
            return codes.reshape(-1, c), scale.reshape(-1), None
        k = self.static_rows(*x3.shape[:2])
        return codes.reshape(-1, c), k.scale_rows, k.zero_rows

    # ------------------------------------------------------------------ dynamic_outlier
    def outlier_split(self, x: torch.Tensor, scale: torch.Tensor | None = None, ste: bool = False):
        """OuroMamba's extractor on ``x`` (batch, L, C): an :class:`~optimum_vim.primitives.outliers.OutlierSplit`
        (inlier codes on the static per-token grid, outlier mask and quantized outlier values). ``scale`` overrides
        the stored inlier scales (calibration with learned steps, ``ste=True``)."""
        if self.granularity != "dynamic_outlier":
            raise ValueError(f"outlier_split needs granularity 'dynamic_outlier'; this quantizer is {self.granularity!r}")
        x3 = self._as3d(x)
        if x3.shape[-2] != self.spec.length:
            raise ValueError(
                f"static per-token inlier scales were calibrated for {self.spec.length} tokens; got {x3.shape[-2]}"
            )
        from ..primitives.outliers import extract_outliers

        spec = self.spec
        static = self.outlier_channels.bool() if spec.static_outliers else None
        return extract_outliers(
            x3, self.scale if scale is None else scale, None if self.symmetric else self.zero_point, self.qmin,
            self.qmax, refresh=spec.refresh, sigma=float(spec.outlier_sigma), reverse=bool(spec.reverse),
            outlier_bits=spec.outlier_bits, static_mask=static, ste=ste,
            trigger=spec.outlier_trigger, outlier_affine=spec.outlier_affine,
        )

    def outlier_gemm_operands(self, x: torch.Tensor):
        """For :func:`optimum_vim.ops.outlier_gemm`: ``(codes int8 (M, C), scale fp32 (M,), outlier_idx int32 (P,),
        outlier_values fp32 (M, P))`` with M = batch * L; the P columns are the union of every row's outlier
        channels (a row's values are zero where the column is an outlier of other rows only, and its inlier code
        holds that value instead). Symmetric inlier grids with codes in int8 only; else None."""
        if not self.symmetric or self.qmax > 127:
            return None
        split = self.outlier_split(x)
        b, length, c = split.inlier_codes.shape
        codes = split.inlier_codes.reshape(-1, c).to(torch.int8)
        scale_rows = split.scale.reshape(1, length).expand(b, length).reshape(-1).contiguous()
        idx = split.outlier_mask.reshape(-1, c).any(0).nonzero().reshape(-1).to(torch.int32)
        values = split.outlier_values.reshape(-1, c)[:, idx.long()].contiguous()
        return codes, scale_rows, idx, values
