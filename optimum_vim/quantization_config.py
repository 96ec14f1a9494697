"""ViMQuantizationConfig: what to quantize, with which recipe, and (after quantization) the per-layer formats."""

from __future__ import annotations

import copy
import functools
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .options import coerce, coerce_fields, field_types

QUANT_METHOD = "vim"
FORMAT_VERSION = 1
DEFAULT_SKIP = ["head", "patch_embed"]
_RUNTIME_FIELDS = ("calibration_dataset", "image_processor")
# per-module settings of ``overrides`` and their types (checked like every other option)
OVERRIDE_TYPES = {"weight_bits": int, "act_bits": int | None, "weight_group_size": int | None, "skip": bool}
_OVERRIDE_KEYS = set(OVERRIDE_TYPES)


@functools.cache
def _field_types() -> dict[str, Any]:
    """The declared types of ViMQuantizationConfig's fields (its ``__init__`` annotations)."""
    types_ = field_types(ViMQuantizationConfig.__init__)
    types_.pop("kwargs", None)
    return types_


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
        dequantize: load a pre-quantized checkpoint straight into a float model (also honoured when passed to
            ``from_pretrained`` of a quantized folder: ``quantization_config=ViMQuantizationConfig(dequantize=True)``).
        base_model: Hub id of the float model this one is quantized from (model card ``base_model`` metadata and
            link); set automatically when the float model was loaded from the Hub.

    Every field is checked against its declared type (``True`` is not an int, ``"1"`` is not an int, ``"no"`` is not
    a bool); ``recipe_args`` are checked against the recipe's ``Args`` field types (:mod:`optimum_vim.options`).
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
        base_model: str | None = None,
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
        self.recipe_args = recipe_args
        self.calibration_dataset = calibration_dataset
        self.image_processor = image_processor
        self.num_calibration_samples = num_calibration_samples
        self.calibration_batch_size = calibration_batch_size
        self.seed = seed
        self.modules_to_not_convert = modules_to_not_convert
        self.overrides = overrides
        self.format_version = format_version
        self.layers = layers
        self.calibration_source = calibration_source
        self.dequantize = dequantize
        self.base_model = base_model
        self.post_init()

    def post_init(self) -> None:
        """Validates the settings; impossible combinations fail here with what is allowed. Every field is checked
        against its declared type first (``weight_bits=True`` or ``format_version="1"`` are errors, not coerced)."""
        from .recipes import get_recipe_class

        types_ = _field_types()
        for name, tp in types_.items():
            if name not in _RUNTIME_FIELDS:
                setattr(self, name, coerce(getattr(self, name), tp, name, "ViMQuantizationConfig"))
        if self.modules_to_not_convert is None:
            self.modules_to_not_convert = list(DEFAULT_SKIP)
        self.recipe_args = dict(self.recipe_args or {})
        self.overrides = dict(self.overrides or {})
        for pattern, value in self.overrides.items():
            if isinstance(value, dict):
                unknown = sorted(set(value) - set(OVERRIDE_TYPES))
                if unknown:
                    raise ValueError(f"override {pattern!r}: unknown keys {unknown}; expected None or a dict with "
                                     f"keys from {sorted(OVERRIDE_TYPES)}")
                self.overrides[pattern] = coerce_fields(OVERRIDE_TYPES, value, f"override {pattern!r}:")
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
        if self.layers:
            self._check_layers_agree()

    def _check_layers_agree(self) -> None:
        """The top-level ``weight_bits`` / ``act_bits`` of a quantized checkpoint's config must describe its ``layers``
        (the model card and ``repr`` read them): every integer-weight linear without a per-module override has
        ``weight_bits``; with ``act_bits=None`` no such linear quantizes its input, otherwise some activation
        quantizer has ``act_bits``."""
        from .modules.spec import ActivationSpec, IntWeightSpec, LinearSpec, spec_from_dict
        from .recipes.targets import layer_overrides

        if not isinstance(self.layers, dict) or not all(isinstance(v, dict) for v in self.layers.values()):
            raise ValueError("quantization_config.layers must map module names to module specs (dicts)")
        wrong, act_seen = [], set()
        for name, raw in self.layers.items():
            try:
                spec = spec_from_dict(raw)
            except ValueError as err:
                raise ValueError(f"quantization_config.layers[{name!r}] is not a valid module spec: {err}") from err
            act_seen.update(act.bits for act in spec.activations().values())
            if isinstance(spec, ActivationSpec):
                act_seen.add(spec.bits)
            if not isinstance(spec, LinearSpec):
                continue
            over = layer_overrides(name, self.overrides) or {}
            weight = spec.weight
            want = over.get("weight_bits", self.weight_bits)
            if isinstance(weight, IntWeightSpec) and weight.bits != want:
                wrong.append(f"{name} has {weight.bits}-bit weights, the config says weight_bits={want}")
            want_act = over.get("act_bits", self.act_bits)
            got_act = spec.input.bits if spec.input is not None else None
            if want_act is None and got_act is not None:
                wrong.append(f"{name} quantizes its input to {got_act} bits, the config says act_bits=None")
        if self.act_bits is not None and self.act_bits not in act_seen:
            wrong.append(f"no module quantizes activations to act_bits={self.act_bits} "
                         f"(found {sorted(act_seen) or 'none'})")
        if wrong:
            raise ValueError(
                f"this quantization_config contradicts its own per-layer specs ({len(wrong)} problem(s), e.g. "
                f"{wrong[:3]}): config.json was edited by hand or mixes two checkpoints. The top-level settings of a "
                "saved config describe what the quantizer did and cannot be changed; restore the original config.json "
                "or quantize the float model again with the settings you want."
            )

    @property
    def is_quantized_layout(self) -> bool:
        """True once ``layers`` (the per-module specs) is filled, i.e. for a saved quantized checkpoint."""
        return bool(self.layers)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the runtime-only fields (calibration data, image processor)."""
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in _RUNTIME_FIELDS}
        return out

    def __iter__(self):
        """``dict(config)`` (transformers' "a dict or a config" idiom): the serializable fields, deep-copied, plus the
        runtime-only fields by reference (a calibration generator or DataLoader cannot be copied, and copying a data
        set would be wasteful)."""
        yield from self.to_dict().items()
        for name in _RUNTIME_FIELDS:
            yield name, getattr(self, name, None)

    def update(self, **kwargs) -> dict[str, Any]:
        """Sets the given fields with the same checks as the constructor (``weight_bits="four"`` raises, as it does in
        ``ViMQuantizationConfig(weight_bits="four")``), all or nothing: on an error the config is left unchanged.
        Returns the keys that are not fields of this config, as ``QuantizationConfigMixin.update`` does."""
        known = {k: v for k, v in kwargs.items() if k in _field_types()}
        unused = {k: v for k, v in kwargs.items() if k not in known}
        if not known:
            return unused
        if self.is_quantized_layout and set(known) - set(self.get_loading_attributes()):
            raise ValueError(
                f"update({sorted(known)}): this config describes an already quantized checkpoint; only its loading "
                f"options {sorted(self.get_loading_attributes())} can change. Quantize the float model again with a "
                "new ViMQuantizationConfig for other settings."
            )
        trial = copy.deepcopy(self)
        for key, value in known.items():
            setattr(trial, key, value)
        trial.post_init()  # raises before anything is applied to self
        self.__dict__.update(trial.__dict__)
        return unused

    def __deepcopy__(self, memo):
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for k, v in self.__dict__.items():
            # calibration data and processors can be large or unpicklable: share them, copy the rest
            setattr(clone, k, v if k in _RUNTIME_FIELDS else copy.deepcopy(v, memo))
        return clone

    def get_loading_attributes(self) -> dict[str, Any]:
        return {"dequantize": self.dequantize}
