"""Storage accounting: what quantized layers take on disk against their fp16 originals, and what a model keeps in
memory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from torch import nn

from .modules.spec import LinearSpec
from .recipes import quantized_modules


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the weight files (``*.safetensors``) in a saved model folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def quantized_layer_bytes(model: nn.Module) -> dict[str, int | float]:
    """Bytes held by the quantized modules (every buffer: codes, scales, codebooks, activation quantizers, bias)
    against fp16 storage of the weights they replace: ``{"quantized", "fp16", "ratio", "layers"}``."""
    q_bytes = fp16 = 0
    mods = quantized_modules(model)
    for mod in mods.values():
        weight_holding = 2 * mod.spec.num_float_parameters()  # fp16 bytes of the weights it replaces
        if not weight_holding:
            continue
        fp16 += weight_holding
        # buffers, and the scales / codebooks that enable_scale_training turned into parameters under the same names
        q_bytes += sum(b.numel() * b.element_size() for b in (*mod.buffers(), *mod.parameters()))
    return {"quantized": q_bytes, "fp16": fp16, "ratio": (q_bytes / fp16) if fp16 else float("nan"),
            "layers": len(mods), "bits_per_weight": bits_per_weight(model)}


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits per weight of the quantized linears: codes or codebook indices, scales and codebooks (bias,
    smoothing and activation quantizers excluded); nan when the model has none."""
    bits = weights = 0
    for mod in quantized_modules(model).values():
        spec = mod.spec
        if not isinstance(spec, LinearSpec):
            continue
        weights += spec.in_features * spec.out_features
        weight_buffers = spec.weight.BUFFER_NAMES  # codes, scales, codebook: what the weight format stores
        stored = (*mod.named_buffers(recurse=False), *mod.named_parameters(recurse=False))  # trainable scales too
        bits += 8 * sum(b.numel() * b.element_size() for name, b in stored if name in weight_buffers)
    return bits / weights if weights else float("nan")


def memory_footprint(model: nn.Module, return_buffers: bool = True) -> int:
    """Bytes a model keeps resident: transformers' ``get_memory_footprint`` (parameters, and buffers with
    ``return_buffers``: the packed codes, scales and codebooks of quantized layers) plus the CPU kernels' caches built
    from this model's buffers (int8 codes of sub-8-bit A8 weights, weight column sums, and the fp32 decodings of the
    opt-in decode cache; ``optimum_vim_kernels.cpu``). Transient decode buffers freed after each GEMM are not
    counted."""
    total = sum(p.nelement() * p.element_size() for p in model.parameters())
    if return_buffers:
        total += sum(b.nelement() * b.element_size() for b in model.buffers())
    cpu = sys.modules.get("optimum_vim_kernels.cpu")  # not imported yet: no CPU kernel ran, nothing is cached
    if cpu is not None:
        total += cpu.cache_bytes(model.buffers())
    return total
