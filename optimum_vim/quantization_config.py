"""ViMQuantizationConfig: what to quantize, with which recipe, and (after quantization) the per-layer formats."""

from __future__ import annotations

import copy
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "vim"
FORMAT_VERSION = 1
DEFAULT_SKIP = ["head", "patch_embed"]
_RUNTIME_FIELDS = ("calibration_dataset", "image_processor")
_OVERRIDE_KEYS = {"weight_bits", "act_bits", "weight_group_size", "skip"}


class ViMQuantizationConfig(QuantizationConfigMixin):
    """Quantization settings for ``from_pretrained(..., quantization_config=ViMQuantizationConfig(...))``.

    Args:
        recipe: ``"rtn"`` (round-to-nearest baseline) or ``"ptq4vm"`` (per-token static + JLSS); the recipe decides
            scales/codebooks.
        weight_bits: bits of the integer weight codes (or equivalent bits of a codebook recipe).
        act_bits: bits of the activation quantizers; ``None`` quantizes weights only.
        weight_group_size: inputs per weight scale (``None``: one scale per output channel).
        recipe_args: recipe options (e.g. ``{"observer": "percentile"}`` for RTN); validated by the recipe.
        calibration_dataset: calibration images (runtime only, never saved): a ``datasets.Dataset`` /
            ``IterableDataset``, an image folder path, a list of PIL images, a (N, C, H, W) tensor or a DataLoader.
        image_processor: processor for calibration images (runtime only); defaults to the checkpoint's.
        num_calibration_samples / calibration_batch_size / seed: the seeded calibration draw
            (``num_calibration_samples=None``: the recipe's default, 128 for RTN, 256 for PTQ4VM).
        modules_to_not_convert: module names (or globs) left in float; defaults to ``["head", "patch_embed"]``.
        overrides: per-module settings by name pattern (glob on the full or leaf name, or ``"re:<regex>"``), e.g.
            ``{"*.x_proj*": {"weight_bits": 8}, "vim.layers.0.*": None}`` (None: keep in float): mixed precision.
        format_version: storage format version (checked on load).
        layers: per-module specs written after quantization (how a pre-quantized checkpoint is rebuilt).
        dequantize: load a pre-quantized checkpoint straight into a float model.
    """

    def __init__(
        self,
        recipe: str = "rtn",
        weight_bits: int = 8,
        act_bits: int | None = None,
        weight_group_size: int | None = None,
        recipe_args: dict | None = None,
        calibration_dataset: Any = None,
        image_processor: Any = None,
        num_calibration_samples: int | None = None,
        calibration_batch_size: int = 32,
        seed: int = 0,
        modules_to_not_convert: list[str] | None = None,
        overrides: dict[str, dict | None] | None = None,
        format_version: int = FORMAT_VERSION,
        layers: dict[str, dict] | None = None,
        calibration_source: str | None = None,
        dequantize: bool = False,
        **kwargs,
    ):
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ValueError(
                f"ViMQuantizationConfig got unknown options {sorted(kwargs)}; recipe-specific options go in recipe_args"
            )
        self.quant_method = QUANT_METHOD
        self.recipe = recipe
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.weight_group_size = weight_group_size
        self.recipe_args = dict(recipe_args or {})
        self.calibration_dataset = calibration_dataset
        self.image_processor = image_processor
        self.num_calibration_samples = num_calibration_samples
        self.calibration_batch_size = calibration_batch_size
        self.seed = seed
        self.modules_to_not_convert = list(DEFAULT_SKIP if modules_to_not_convert is None else modules_to_not_convert)
        self.overrides = dict(overrides or {})
        self.format_version = format_version
        self.layers = layers
        self.calibration_source = calibration_source
        self.dequantize = dequantize
        self.post_init()

    def post_init(self) -> None:
        """Validates the settings; impossible combinations fail here with what is allowed."""
        from .recipes import get_recipe_class

        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint uses optimum-vim storage format v{self.format_version}; this optimum-vim reads "
                f"v{FORMAT_VERSION}. Install the optimum-vim version that wrote it (or re-quantize the float model)."
            )
        recipe_cls = get_recipe_class(self.recipe)
        recipe_cls.check_bits(self.weight_bits, self.act_bits)
        if self.weight_group_size is not None and (not isinstance(self.weight_group_size, int) or self.weight_group_size < 1):
            raise ValueError(f"weight_group_size must be a positive int or None; got {self.weight_group_size!r}")
        recipe_cls.build_args(self.recipe_args)
        recipe_cls.check_config(self)
        if self.num_calibration_samples is None:
            self.num_calibration_samples = recipe_cls.default_calibration_samples
        for pattern, value in self.overrides.items():
            if value is None:
                continue
            if not isinstance(value, dict) or set(value) - _OVERRIDE_KEYS:
                raise ValueError(
                    f"override {pattern!r}: expected None or a dict with keys from {sorted(_OVERRIDE_KEYS)}; got {value!r}"
                )
            if not value.get("skip"):
                recipe_cls.check_bits(value.get("weight_bits", self.weight_bits), value.get("act_bits", self.act_bits))
        for name in ("num_calibration_samples", "calibration_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int; got {getattr(self, name)!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int; got {self.seed!r}")

    @property
    def is_quantized_layout(self) -> bool:
        """True once ``layers`` (the per-module specs) is filled, i.e. for a saved quantized checkpoint."""
        return bool(self.layers)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the runtime-only fields (calibration data, image processor)."""
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in _RUNTIME_FIELDS}
        return out

    def __deepcopy__(self, memo):
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for k, v in self.__dict__.items():
            # calibration data and processors can be large or unpicklable: share them, copy the rest
            setattr(clone, k, v if k in _RUNTIME_FIELDS else copy.deepcopy(v, memo))
        return clone

    def get_loading_attributes(self) -> dict[str, Any]:
        return {"dequantize": self.dequantize}
