"""Fine-tuning quantized Vims: straight-through training of every quantizer (automatic, see
:mod:`optimum_vim.modules.training`), trainable scales, LoRA adapters on quantized linears, linear probing.

The LoRA helpers (:mod:`optimum_vim.training.lora`) need PEFT (``pip install 'optimum-vim[train]'``) and are imported
on first use.
"""

from __future__ import annotations

from torch import nn

from ..modules.training import enable_scale_training, straight_through

_LORA = ("LoraQLinear", "add_lora", "load_lora_adapter", "lora_config", "register_lora_qlinear")


def prepare_linear_probe(model: nn.Module, trainable: tuple[str, ...] = ("head",)) -> list[str]:
    """Freezes every parameter except those of the modules named in ``trainable`` (default: the classifier head);
    returns the names of the parameters left trainable. The quantized layers then run their integer kernels in
    training too (no gradient passes through them)."""
    names = []
    for name, param in model.named_parameters():
        keep = any(name == t or name.startswith(t + ".") for t in trainable)
        param.requires_grad_(keep)
        if keep:
            names.append(name)
    if not names:
        raise ValueError(f"prepare_linear_probe: no parameter lies under {list(trainable)}; module names are e.g. "
                         f"{[n for n, _ in model.named_children()]}")
    return names


def __getattr__(name: str):
    if name in _LORA:
        from . import lora

        return getattr(lora, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["enable_scale_training", "prepare_linear_probe", "straight_through", *_LORA]
