"""Training path of the quantized modules: straight-through estimators through every quantizer of the integer path.

The inference path of a quantized module hands integer codes to kernels (``round`` and integer GEMMs have no
gradient), so without this path a model quantized with activation quantizers returns no gradient upstream of its
first quantized layer. Each quantized module's ``forward`` starts with one branch::

    if needs_grad(self, x): return <the training forward below>

which is taken only when a gradient is asked for while training: grad mode on, the module in train mode (or inside
:func:`straight_through` for an eval-mode model), and the input or one of the module's own trainable scales requiring
grad. Evaluation (a model in eval mode, with or without ``torch.no_grad()``) and head-only probing (frozen inputs)
keep the integer kernels.

The training forward computes the same function in float: activations are fake-quantized with straight-through
rounding (identity gradient inside the clamp range, zero outside; the gradient reaches a trainable scale as in LSQ),
weights are the dequantized codes (``codes * scale``, or codebook vectors), and the GEMM runs in fp32. Outputs equal the
inference path's up to float summation order. **Weights stay frozen as codes**; scales and codebooks train only after
:func:`enable_scale_training`, which turns those buffers into parameters under the same names (checkpoints keep their
layout, a reload gives buffers again).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import selective_scan
from ..primitives import fake_quantize, round_ste

# buffers that may become trainable parameters, by kind
_SCALE_BUFFERS = {"weight": ("weight_scale",), "activation": ("scale",), "codebook": ("codebook",),
                  "state": ("state_scale", "state_channel_scale")}


_FORCED = [0]  # depth of straight_through() blocks (a plain global: torch.compile reads it without a graph break)


@contextlib.contextmanager
def straight_through():
    """Inside this block, quantized modules in eval mode take the straight-through path too whenever a gradient is
    asked for (e.g. input saliency of an evaluated model, without switching drop-path / dropout on)."""
    _FORCED[0] += 1
    try:
        yield
    finally:
        _FORCED[0] -= 1


def needs_grad(module: nn.Module, *tensors: torch.Tensor | None) -> bool:
    """Whether ``module`` must take its differentiable (straight-through) path for these inputs: grad mode on, the
    module training (``model.train()``, as ``Trainer`` sets it) or inside :func:`straight_through`, and an input or
    one of the module's own parameters requiring grad. A model in eval mode therefore computes with its integer
    kernels even when grad mode is on and upstream float parameters require grad (a plain ``model(x)`` call)."""
    if not torch.is_grad_enabled() or not (module.training or _FORCED[0]):
        return False
    if any(t is not None and t.requires_grad for t in tensors):
        return True
    return any(p.requires_grad for p in module.parameters())


def activation_ste(quantizer, x: torch.Tensor) -> torch.Tensor:
    """Fake quantization of ``x`` by a :class:`~optimum_vim.modules.QActivation` with straight-through rounding."""
    if quantizer.granularity == "dynamic_outlier":
        return quantizer.outlier_split(x, ste=True).dequantize().reshape(x.shape).to(x.dtype)
    x3 = quantizer._as3d(x)
    scale, zero = quantizer.scale_and_zero(x3)
    y = fake_quantize(x3.float(), scale, zero, quantizer.qmin, quantizer.qmax, ste=True)
    return y.reshape(x.shape).to(x.dtype)


def combine_float(y_f: torch.Tensor, y_b: torch.Tensor, z: torch.Tensor, divide: bool) -> torch.Tensor:
    """Vim's direction combine ahead of out_proj, ``(y_f + y_b) / 2 * silu(z)``, in float (``y_f.dtype`` out), in
    the order of ``combine_directions_ref``."""
    y = y_f.float() + y_b.float()
    if divide:
        y = y / 2
    return (y * F.silu(z.float())).to(y_f.dtype)


def linear_train_forward(layer, x: torch.Tensor, combine: tuple | None = None) -> torch.Tensor:
    """:class:`~optimum_vim.modules.QLinear` in float with straight-through activation quantization.
    ``combine=(y_b, z, divide)``: Vim's direction average and gate first, as the fused inference path does."""
    if combine is not None:
        x = combine_float(x, *combine)
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"QLinear expects {layer.in_features} input features; got {x.shape[-1]}")
    out_dtype = x.dtype
    if layer.smooth_scale is not None:
        x = x / layer.smooth_scale.to(x.dtype)
    if layer.input_quantizer is not None:
        x = activation_ste(layer.input_quantizer, x)
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x.float(), layer.dequantized_weight(), bias).to(out_dtype)


def _scan_with_state_ste(u, delta, A, B, C, h_scale, h_channel_scale, qmin, qmax, reverse):
    """``C . h`` of the selective scan with the carried state re-quantized after every step (straight-through
    rounding), as ``selective_scan_q_ref`` computes it; autograd through the L steps (k-scaled PTQ's 8-bit state)."""
    b, length, e = u.shape
    Af = A.float()
    h = u.new_zeros(b, e, Af.shape[1], dtype=torch.float32)
    ys = [None] * length
    for t in (range(length - 1, -1, -1) if reverse else range(length)):
        h = torch.exp(delta[:, t, :, None].float() * Af) * h + (delta[:, t] * u[:, t]).float()[:, :, None] * \
            B[:, t, None, :].float()
        ys[t] = (h * C[:, t, None, :].float()).sum(-1)
        s = (h_scale[t] if h_scale.numel() > 1 else h_scale.reshape(())).float()
        if h_channel_scale is not None:
            s = s * h_channel_scale.float()[None, :, None]
        h = torch.clamp(round_ste(h / s), qmin, qmax) * s
    return torch.stack(ys, 1)


def scan_train_forward(scan, u, delta, A, B, C, D=None, z=None) -> torch.Tensor:
    """:class:`~optimum_vim.modules.QSelectiveScan` in float: straight-through input / output quantizers, the
    differentiable PyTorch scan (or the step loop when the state is quantized)."""
    quant = {name: getattr(scan, f"{name}_quantizer") for name in ("u", "delta", "B", "C", "y")}
    uq, dq, bq, cq = (activation_ste(quant[n], t) if quant[n] is not None else t
                      for n, t in (("u", u), ("delta", delta), ("B", B), ("C", C)))
    if scan.state_scale is None and quant["y"] is None:
        return selective_scan(uq, dq, A, bq, cq, D, z, reverse=scan.reverse, backend="torch").to(u.dtype)
    if scan.state_scale is not None:
        if u.shape[1] != scan.spec.length:
            raise ValueError(f"per-step state scales were calibrated for {scan.spec.length} tokens; got {u.shape[1]}")
        y = _scan_with_state_ste(uq, dq, A, bq, cq, scan.state_scale, scan.state_channel_scale, scan.state_qmin,
                                 scan.state_qmax, scan.reverse)
    else:
        y = selective_scan(uq, dq, A, bq, cq, None, None, reverse=scan.reverse, backend="torch").float()
    if quant["y"] is not None:
        y = activation_ste(quant["y"], y)
    if D is not None:
        y = y + uq.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)


def enable_scale_training(model: nn.Module, weight: bool = True, activation: bool = True, codebook: bool = False,
                          state: bool = False) -> list[str]:
    """Makes the chosen quantization scales of every quantized module trainable (in place): each buffer becomes an
    ``nn.Parameter`` of the same name and dtype fp32, so optimizers see it and checkpoints keep their tensor names.
    Integer codes, zero points and labels stay frozen buffers. Returns the names of the new parameters.

    ``weight``: weight scales (``weight_scale``); ``activation``: static activation scales (``scale``);
    ``codebook``: codebook vectors of codebook (VQ) weights; ``state``: k-scaled PTQ's per-step state scales."""
    from .base import QModule

    wanted = [name for kind, on in (("weight", weight), ("activation", activation), ("codebook", codebook),
                                    ("state", state)) if on for name in _SCALE_BUFFERS[kind]]
    made = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, QModule):
            continue
        for name in wanted:
            buf = module._buffers.get(name)
            if buf is None or not buf.is_floating_point():
                continue
            del module._buffers[name]
            module.register_parameter(name, nn.Parameter(buf.detach().float().clone()))
            made.append(f"{mod_name}.{name}" if mod_name else name)
    if not made:
        raise ValueError(
            "enable_scale_training found no quantization scale to train: the model has no quantized modules with "
            f"the chosen kinds (weight={weight}, activation={activation}, codebook={codebook}, state={state})"
        )
    return made


__all__ = ["activation_ste", "combine_float", "enable_scale_training", "linear_train_forward", "needs_grad", "scan_train_forward"]
