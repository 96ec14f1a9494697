"""QSelectiveScan: the quantized SSM of one scan direction.

Its spec is a :class:`~optimum_vim.modules.spec.ScanSpec` (dict form::

    {"type": "scan", "reverse": bool, "length": L, "channels": E, "d_state": N,
     "u": act | null, "delta": act | null, "B": act | null, "C": act | null,   # input quantizers (QActivation specs)
     "y": act | null,                                                       # SSM output before the D skip
     "state": null | {"bits": 8, "narrow": bool, "channel_scale": bool}}      # carried hidden state, per-step scales

). Buffers: ``u_quantizer.*`` ... ``y_quantizer.*``, ``state_scale`` (fp32 (L,), one scale per scan step, indexed by
token position) and ``state_channel_scale`` (fp32 (E,)): the carried state of channel e after step t is
re-quantized with scale ``state_scale[t] * state_channel_scale[e]``. That is k-scaled PTQ's reparameterised 8-bit
state ``h' = h / (r_C r_L)`` with one scale per step, expressed on the original state (r_L folded into
``state_scale``, r_C into ``state_channel_scale``; r_D is folded into x_proj by the recipe). It dequantizes to the
float :class:`~optimum_vim.modules.float.SelectiveScan`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import selective_scan
from ..ops.quantized import selective_scan_q
from ..primitives import int_range
from .activation import QActivation
from .base import QModule, mark_nan, register_qmodule
from .float import SelectiveScan
from .spec import SCAN_INPUTS as _INPUTS
from .spec import ScanSpec
from .training import needs_grad, scan_train_forward


@register_qmodule("scan")
class QSelectiveScan(QModule):
    """Drop-in for the float :class:`~optimum_vim.modules.float.SelectiveScan`: ``forward(u, delta, A, B, C, D=None, z=None)`` with (batch, L, .) inputs."""

    SPEC = ScanSpec
    OPTIONAL_BUFFERS = ("state_scale", "state_channel_scale")

    def __init__(self, spec: ScanSpec | dict):
        super().__init__(spec)
        spec = self.spec
        self.reverse = bool(spec.reverse)
        for name in (*_INPUTS, "y"):
            act = getattr(spec, name)
            setattr(self, f"{name}_quantizer", QActivation(act) if act is not None else None)
        if spec.state is not None:
            self.state_qmin, self.state_qmax = int_range(spec.state.bits, True, spec.state.narrow)

    def _float_module(self, use_mamba_kernels: bool) -> nn.Module:
        return SelectiveScan(reverse=self.reverse, use_mamba_kernels=use_mamba_kernels)

    def _nan_positions(self, u, delta, B, C) -> torch.Tensor | None:
        """(batch, L, E) bool: where the float scan's output is NaN because of a NaN input. A NaN in u or delta at
        (t, e), or in B at step t, enters the state and reaches every later step of this direction; C only reads the
        state, so a NaN in C marks its own step. ``None`` when no input holds a NaN: checked on CPU only (where the
        host sync is free) by one sum per input, a NaN anywhere making its sum NaN (so does +inf with -inf, which
        the exact check below then clears)."""
        if not u.is_cuda and not torch.compiler.is_compiling() and not any(
                bool(torch.isnan(x.sum())) for x in (u, delta, B, C)):
            return None
        carried = torch.isnan(u) | torch.isnan(delta) | torch.isnan(B).any(-1, keepdim=True)
        carried = carried.flip(1) if self.reverse else carried
        carried = carried.cumsum(1) > 0
        carried = carried.flip(1) if self.reverse else carried
        return carried | torch.isnan(C).any(-1, keepdim=True)

    def forward(self, u, delta, A, B, C, D=None, z=None):
        if needs_grad(self, u, delta, A, B, C, D, z):  # straight-through float path (optimum_vim.modules.training)
            return scan_train_forward(self, u, delta, A, B, C, D, z)
        if self.state_scale is not None and u.shape[1] != self.spec.length:
            raise ValueError(f"per-step state scales were calibrated for {self.spec.length} tokens; got {u.shape[1]}")
        if all(getattr(self, f"{n}_quantizer") is None for n in _INPUTS) and self.state_scale is None \
                and self.y_quantizer is None:
            return selective_scan(u, delta, A, B, C, D, z, reverse=self.reverse)
        # static 8-bit inputs travel as int8 codes + scales (what the Triton scan reads); others as fake-quant floats
        values, extra = {}, {}
        for name, x in zip(_INPUTS, (u, delta, B, C)):
            quantizer = getattr(self, f"{name}_quantizer")
            codes = quantizer.static_codes(x, allow_zero=name == "delta") if quantizer is not None else None
            if codes is None:
                values[name] = quantizer(x) if quantizer is not None else x
            else:
                values[name], extra[f"{name}_scale"], zero = codes
                if zero is not None:
                    extra["delta_zero"] = zero
        if self.state_scale is not None:
            extra.update(h_scale=self.state_scale, h_channel_scale=self.state_channel_scale,
                         h_qmin=self.state_qmin, h_qmax=self.state_qmax)
        nan = self._nan_positions(u, delta, B, C) if extra else None  # int8 codes cannot hold NaN
        if self.y_quantizer is None:
            y = selective_scan_q(values["u"], values["delta"], A, values["B"], values["C"], D, z,
                                 reverse=self.reverse, **extra)
            return (y if nan is None else mark_nan(y, nan)).to(u.dtype)
        y = selective_scan_q(values["u"], values["delta"], A, values["B"], values["C"], None, None,
                             reverse=self.reverse, **extra)
        y = self.y_quantizer(y if nan is None else mark_nan(y, nan))
        if D is not None:
            u_hat = self.u_quantizer(u) if self.u_quantizer is not None else u
            y = y + u_hat.float() * D.float()
        if z is not None:
            y = y * torch.nn.functional.silu(z.float())
        return y.to(u.dtype)
