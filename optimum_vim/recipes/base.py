"""Recipe protocol, plan types and the single function that swaps modules on a model.

A recipe decides formats and tensors; it never edits the model. Its output is a :class:`QuantPlan` (pure data):
for each module name, the spec of the quantized module that replaces it and the buffers to put in it, plus float
overrides of kept parameters (folded reparameterisations). :func:`apply_plan` is the only code that swaps modules on a
float model; :func:`build_quantized_skeleton` builds the same modules empty for a pre-quantized reload.

A recipe is built from its validated options (``Args``), its :class:`~optimum_vim.recipes.targets.Targets` and the
seed (:meth:`Recipe.from_config` makes them from a ``ViMQuantizationConfig``); what it computes during one
``calibrate`` lives in that call (block recipes: a per-run object handed to the block-wise engine), never on the
recipe. Recipes are registered by name in :mod:`optimum_vim.recipes.registry`, one line each.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..modules import QModule, build_qmodule
from ..modules.plan import LayerPlan, QuantPlan, apply_plan  # noqa: F401 - re-exported: the recipe API
from .targets import Targets


class Recipe:
    """Base class of recipes. Subclasses set ``name``, ``Args`` (a dataclass of recipe options: closed choices as
    ``Literal``, ranges in ``validate()``), the supported bit widths, ``requires_data(config)`` and implement
    ``calibrate(model, batches) -> QuantPlan``."""

    name: ClassVar[str] = "abstract"
    Args: ClassVar[type] = type(None)
    weight_bits: ClassVar[tuple[int, ...]] = ()
    act_bits: ClassVar[tuple[int | None, ...]] = (None,)
    default_calibration_samples: ClassVar[int] = 128  # used when num_calibration_samples is not given

    def __init__(self, args, targets: Targets, seed: int = 0, image_processor=None):
        self.args = args  # validated (build_args)
        self.targets = targets
        self.seed = seed
        # the image processor of the checkpoint being quantized: the config's ``image_processor`` or the one saved
        # next to the checkpoint (``quantizer.run_recipe`` resolves it for every recipe, data-free ones included)
        self.image_processor = image_processor

    @classmethod
    def from_config(cls, config, image_processor=None):
        """The recipe for a ``ViMQuantizationConfig``: its ``recipe_args`` validated, its targets and seed."""
        return cls(cls.build_args(config.recipe_args), Targets.from_config(config), config.seed,
                   image_processor if image_processor is not None else config.image_processor)

    @classmethod
    def build_args(cls, recipe_args: dict | None, *, strings: bool = False):
        """Validates ``recipe_args`` by building the ``Args`` dataclass: unknown keys are an error, every value is
        checked against its field's declared type (:func:`optimum_vim.options.coerce`: ``"no"`` is not a bool,
        ``"in_proj"`` is not a tuple), then ``Args.validate()`` checks ranges. With ``strings=True`` str values are
        command-line strings, parsed by the field type (``true``/``false``, ints, floats, comma lists, ``none``)."""
        from ..options import coerce_fields, field_types

        recipe_args = dict(recipe_args or {})
        types_ = field_types(cls.Args)
        unknown = sorted(set(recipe_args) - set(types_))
        if unknown:
            raise ValueError(f"recipe {cls.name!r} has no options {unknown}; its options are {sorted(types_)}")
        values = coerce_fields(types_, recipe_args, f"recipe {cls.name!r}", strings=strings)
        args = cls.Args(**cls._expand_preset(values))
        validate = getattr(args, "validate", None)
        if validate is not None:
            validate()
        return args

    @classmethod
    def _expand_preset(cls, values: dict) -> dict:
        """``values`` with the options of ``values["preset"]`` (a key of ``Args.PRESETS``) filled in. An option the
        preset sets may be given too only with the preset's value; options the preset leaves alone combine freely
        (e.g. fewer iterations for a quick run of the paper-faithful configuration)."""
        name = values.get("preset")
        if name is None:
            return values
        presets = getattr(cls.Args, "PRESETS", {})
        if name not in presets:
            raise ValueError(f"recipe {cls.name!r} has no preset {name!r}; its presets are {sorted(presets)}")
        preset = presets[name]
        clash = {k: v for k, v in values.items() if k in preset and v != preset[k]}
        if clash:
            sets = ", ".join(f"{k}={preset[k]!r}" for k in clash)
            given = ", ".join(f"{k}={v!r}" for k, v in clash.items())
            raise ValueError(f"recipe {cls.name!r} preset {name!r} sets {sets}, which contradicts the recipe_args "
                             f"{given}: drop the preset or those options")
        return {**preset, **values}

    @classmethod
    def parse_recipe_args(cls, raw: dict[str, str]) -> dict:
        """``{key: command-line string}`` -> ``recipe_args`` with typed values (validated like :meth:`build_args`)."""
        args = cls.build_args(raw, strings=True)
        return {key: getattr(args, key) for key in raw}

    @classmethod
    def check_bits(cls, weight_bits, act_bits) -> None:
        if weight_bits not in cls.weight_bits:
            raise ValueError(f"recipe {cls.name!r} supports weight_bits in {cls.weight_bits}; got {weight_bits!r}")
        if act_bits not in cls.act_bits:
            shown = tuple("None (weight-only)" if b is None else b for b in cls.act_bits)
            raise ValueError(f"recipe {cls.name!r} supports act_bits in {shown}; got {act_bits!r}")

    @classmethod
    def check_config(cls, config) -> None:
        """Recipe-specific checks of the rest of the config (called by ``ViMQuantizationConfig.post_init``)."""

    @classmethod
    def requires_data(cls, config) -> bool:
        return True

    @classmethod
    def uses_image_processor(cls, config) -> bool:
        """Whether calibration reads the image processor (to process calibration images, or to bound generated
        pixels); ``run_recipe`` then loads the checkpoint's when the config names none."""
        return cls.requires_data(config)

    def calibrate(self, model: nn.Module, batches: list[torch.Tensor] | None) -> QuantPlan:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------
# applying plans
def build_quantized_skeleton(model: nn.Module, specs: dict[str, dict]) -> nn.Module:
    """Replaces the modules named in ``specs`` with empty quantized modules on the meta device (pre-quantized load)."""
    missing = [name for name in specs if not _has_submodule(model, name)]
    if missing:
        raise ValueError(f"the quantization config names modules this model does not have: {missing[:5]}")
    for name, spec in specs.items():
        with torch.device("meta"):
            model.set_submodule(name, build_qmodule(spec))
    return model


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def quantized_modules(model: nn.Module) -> dict[str, QModule]:
    """Top-level quantized modules of ``model`` (quantizers nested inside them are not listed)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QModule) and not any(name.startswith(p + ".") for p in out):
            out[name] = mod
    return out
