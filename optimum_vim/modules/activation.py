"""QActivation: static (or dynamic per-token) uniform quantizer of an activation tensor (batch, L, C).

Spec keys: ``bits``, ``symmetric`` (else affine with an integer zero point), ``narrow`` (symmetric range
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
=================  ==========================================  ================================

``channel_factor: true`` multiplies every scale by a per-channel vector ``factor (C,)`` (the k-scaled
reparameterisation factor r_C). Zero points are stored as int32 codes.
"""

from __future__ import annotations

import torch

from ..primitives import dequantize, int_range, quantize
from .base import QModule, register_qmodule

GRANULARITIES = ("tensor", "token", "token_cluster", "channel", "channel_cluster", "dynamic_token")
ROW_GRANULARITIES = ("tensor", "token", "token_cluster", "dynamic_token")  # one scale per (sample, token) row


def validate_activation_spec(spec: dict) -> None:
    """Raises ValueError for an impossible activation quantizer spec."""
    gran = spec.get("granularity")
    if gran not in GRANULARITIES:
        raise ValueError(f"activation granularity must be one of {GRANULARITIES}; got {gran!r}")
    bits = spec.get("bits")
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"activation bits must be an int in 2..16; got {bits!r}")
    if gran in ("token", "token_cluster") and not spec.get("length"):
        raise ValueError(f"granularity {gran!r} needs the sequence length")
    if (gran in ("channel", "channel_cluster") or spec.get("channel_factor")) and not spec.get("channels"):
        raise ValueError(f"granularity {gran!r} / channel_factor needs the channel count")
    if gran.endswith("cluster") and not spec.get("num_clusters"):
        raise ValueError(f"granularity {gran!r} needs num_clusters")
    if gran == "dynamic_token" and not spec.get("symmetric", True):
        raise ValueError("dynamic_token quantization is symmetric only")


@register_qmodule("activation")
class QActivation(QModule):
    """Fake-quantizes activations in the reference path, and hands kernels integer codes with row scales."""

    def __init__(self, spec: dict):
        spec = {"symmetric": True, "narrow": True, **spec}
        validate_activation_spec(spec)
        super().__init__(spec)
        self.bits = spec["bits"]
        self.symmetric = spec["symmetric"]
        self.granularity = spec["granularity"]
        self.qmin, self.qmax = int_range(self.bits, self.symmetric, spec["narrow"])
        n = {
            "tensor": 1,
            "token": spec.get("length"),
            "channel": spec.get("channels"),
            "token_cluster": spec.get("num_clusters"),
            "channel_cluster": spec.get("num_clusters"),
            "dynamic_token": 0,
        }[self.granularity]
        if n:
            self._buffer("scale", (n,), torch.float32)
            if not self.symmetric:
                self._buffer("zero_point", (n,), torch.int32)
        if self.granularity == "token_cluster":
            self._buffer("labels", (spec["length"],), torch.int32)
        if self.granularity == "channel_cluster":
            self._buffer("labels", (spec["channels"],), torch.int32)
        if spec.get("channel_factor"):
            self._buffer("factor", (spec["channels"],), torch.float32)

    # ------------------------------------------------------------------ scales
    def _check_input(self, x: torch.Tensor) -> None:
        if self.granularity in ("token", "token_cluster") and x.shape[-2] != self.spec["length"]:
            raise ValueError(
                f"static per-token scales were calibrated for {self.spec['length']} tokens; got {x.shape[-2]}. "
                "Per-position scales are tied to the calibration image size and patch layout."
            )
        if ("channels" in self.spec and self.granularity.startswith("channel")) and x.shape[-1] != self.spec["channels"]:
            raise ValueError(f"quantizer expects {self.spec['channels']} channels; got {x.shape[-1]}")

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
        if self.spec.get("channel_factor"):
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
        x3 = self._as3d(x)
        scale, zero = self.scale_and_zero(x3)
        return quantize(x3.float(), scale, zero, self.qmin, self.qmax), scale, zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize (the reference path): float output in ``x.dtype``."""
        q, scale, zero = self.quantize(x)
        return dequantize(q, scale, zero).reshape(x.shape).to(x.dtype)

    def static_codes(self, x: torch.Tensor, allow_zero: bool = False):
        """For the scan kernel: ``(codes int8 (batch, L, C), scale (L,) or (1,), zero int32 or None)`` when the scale
        is static per tensor or per token position and codes fit int8 (affine codes only with ``allow_zero``);
        else ``None``."""
        if self.granularity not in ("tensor", "token") or self.spec.get("channel_factor"):
            return None
        if self.qmax - self.qmin > 255 or (not self.symmetric and not allow_zero):
            return None
        q, _, _ = self.quantize(x)
        zero = None
        if not self.symmetric:
            shift = 128 if self.qmax > 127 else 0
            q = q - shift
            zero = self.zero_point - shift
        return q.to(torch.int8), self.scale, zero

    def row_quantize(self, x: torch.Tensor):
        """For integer GEMMs: ``(codes int8 (M, C), scale fp32 (M,), zero int32 (M,) or None)`` with one scale per
        row (sample, token), or ``None`` when scales vary along channels or codes do not fit int8.

        Affine 8-bit codes in [0, 255] are shifted by -128 into int8, the zero point with them, so
        ``x = scale * (codes - zero)`` holds for the returned values."""
        if self.granularity not in ROW_GRANULARITIES or self.spec.get("channel_factor"):
            return None
        if self.qmax - self.qmin > 255:
            return None
        q, scale, zero = self.quantize(x)
        b, length, c = q.shape
        codes = q.reshape(-1, c)
        scale_rows = scale.expand(b, length, 1).reshape(-1).contiguous()
        zero_rows = None
        if zero is not None:
            shift = 128 if self.qmax > 127 else 0
            codes = codes - shift
            zero_rows = (zero.expand(b, length, 1).reshape(-1) - shift).to(torch.int32)
        return codes.to(torch.int8), scale_rows, zero_rows
