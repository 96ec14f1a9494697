"""LoRA adapters on quantized linears (the QLoRA pattern) through PEFT's custom-module mapping.

``y = QLinear(x) + B(A(dropout(x))) * scaling``: the quantized base layer keeps its frozen codes (and its integer
kernels when no gradient has to pass through it), the float low-rank adapter trains. PEFT does not know
:class:`~optimum_vim.modules.QLinear`, so the mapping ``QLinear -> LoraQLinear`` is registered on the ``LoraConfig``
(:func:`lora_config`, :func:`register_lora_qlinear`); PEFT does not save that mapping, so an adapter is reloaded with
:func:`load_lora_adapter` (or ``PeftModel.from_pretrained(model, path, config=register_lora_qlinear(...))``).
Merging into the quantized weights is refused (it would re-quantize them): dequantize the model first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

try:
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora import LoraLayer
except ImportError as err:  # peft is the optional extra "train"
    raise ImportError("LoRA adapters on quantized Vims need PEFT: pip install 'optimum-vim[train]' (or pip install "
                      "peft)") from err

from ..models.family import known_roles
from ..modules import QLinear
from ..modules.training import combine_float


class LoraQLinear(nn.Module, LoraLayer):
    """A LoRA adapter around a :class:`~optimum_vim.modules.QLinear` (built by PEFT through the custom mapping)."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1,
                 **kwargs) -> None:
        if config.lora_bias or config.use_dora:
            raise ValueError("LoRA on quantized Vim linears supports plain LoRA (lora_bias=False, use_dora=False)")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def can_fuse_combine(self) -> bool:
        """Vim's mixer may hand out_proj both scan directions and the gate (``combine=``), as for a bare QLinear."""
        return self.get_base_layer().can_fuse_combine()

    def forward(self, x: torch.Tensor, *args: Any, combine: tuple | None = None, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        base = self.get_base_layer()
        result = base(x, *args, combine=combine, **kwargs)
        if self.disable_adapters:
            return result
        if combine is not None:  # the adapter reads out_proj's real input: the combined directions
            x = combine_float(x, *combine)
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            h = self._cast_input_dtype(x, lora_A.weight.dtype)
            result = result + (lora_B(lora_A(self.lora_dropout[name](h))) * self.scaling[name]).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError(
            "merging a LoRA adapter into a quantized QLinear would re-quantize its weights; dequantize first "
            "(model.dequantize(), which keeps the adapter modules) or keep the adapter separate"
        )

    def unmerge(self) -> None:
        raise NotImplementedError("LoRA adapters on quantized linears are never merged")

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_lora_qlinear(config: LoraConfig) -> LoraConfig:
    """Registers ``QLinear -> LoraQLinear`` on a user's ``LoraConfig`` (PEFT's custom-module mapping); returns it."""
    config._register_custom_module({QLinear: LoraQLinear})
    return config


def lora_config(r: int = 8, lora_alpha: int = 16, target_modules=None, **kwargs) -> LoraConfig:
    """A ``LoraConfig`` for a (quantized or float) model: adapters on the default linears of the model families by
    default (their roles; for Vim ``in_proj``, ``x_proj(_b)``, ``dt_proj(_b)``, ``out_proj``), the QLinear mapping
    registered. ``modules_to_save=["head"]`` trains the classifier head in full alongside."""
    if target_modules is None:
        target_modules = list(dict.fromkeys(r for roles in known_roles().values() for r in roles))
    return register_lora_qlinear(LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules), **kwargs))


def add_lora(model: nn.Module, config: LoraConfig | None = None, **kwargs) -> PeftModel:
    """``peft.get_peft_model`` with the QLinear mapping registered (``config`` or ``lora_config(**kwargs)``)."""
    config = register_lora_qlinear(config) if config is not None else lora_config(**kwargs)
    return get_peft_model(model, config)


def load_lora_adapter(model: nn.Module, path: str, is_trainable: bool = False, **kwargs) -> PeftModel:
    """Reloads an adapter saved with ``peft_model.save_pretrained(path)`` onto ``model`` (quantized or float):
    ``PeftModel.from_pretrained`` with the QLinear mapping, which PEFT does not store in adapter_config.json."""
    config = register_lora_qlinear(LoraConfig.from_pretrained(path, **{k: kwargs.pop(k) for k in ("revision", "token")
                                                                       if k in kwargs}))
    return PeftModel.from_pretrained(model, path, is_trainable=is_trainable, config=config, **kwargs)


__all__ = ["LoraQLinear", "add_lora", "load_lora_adapter", "lora_config", "register_lora_qlinear"]
