"""Recipe protocol, plan types and the single function that swaps modules on a model.

A recipe decides formats and tensors; it never edits the model. Its output is a :class:`QuantPlan` (pure data):
for each module name, the spec of the quantized module that replaces it and the buffers to put in it, plus float
overrides of kept parameters (folded reparameterisations). :func:`apply_plan` is the only code that swaps modules on a
float model; :func:`build_quantized_skeleton` builds the same modules empty for a pre-quantized reload.
"""

from __future__ import annotations

import fnmatch
import re
from typing import ClassVar

import torch
from torch import nn

from ..modules import QModule, build_qmodule
from ..modules.plan import LayerPlan, QuantPlan, apply_plan  # noqa: F401 - re-exported: the recipe API

RECIPES: dict[str, type[Recipe]] = {}

# the six block linears every published Vim PTQ method quantizes (both scan directions)
BLOCK_LINEARS = ("in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj")


class Recipe:
    """Base class of recipes. Subclasses set ``name``, ``Args`` (a dataclass of recipe options), the supported bit
    widths, ``requires_data(config)`` and implement ``calibrate``."""

    name: ClassVar[str] = "abstract"
    Args: ClassVar[type] = type(None)
    weight_bits: ClassVar[tuple[int, ...]] = ()
    act_bits: ClassVar[tuple[int | None, ...]] = (None,)
    default_calibration_samples: ClassVar[int] = 128  # used when num_calibration_samples is not given

    def __init__(self, config):
        self.config = config
        self.args = self.build_args(config.recipe_args)
        # the image processor of the checkpoint being quantized: the config's ``image_processor`` or the one saved
        # next to the checkpoint (``quantizer.run_recipe`` resolves it for every recipe, data-free ones included)
        self.image_processor = config.image_processor

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

    def layer_settings(self, name: str) -> dict | None:
        """Bits of module ``name`` after the config's ``overrides`` (None: the module stays in float)."""
        cfg = self.config
        over = layer_overrides(name, cfg.overrides)
        if over.get("skip"):
            return None
        return {
            "weight_bits": over.get("weight_bits", cfg.weight_bits),
            "act_bits": over.get("act_bits", cfg.act_bits),
            "group_size": over.get("weight_group_size", cfg.weight_group_size),
        }

    def calibrate(self, model: nn.Module, batches: list[torch.Tensor] | None) -> QuantPlan:
        raise NotImplementedError


def register_recipe(cls):
    """Class decorator adding a recipe to :data:`RECIPES` under ``cls.name``."""
    RECIPES[cls.name] = cls
    return cls


# recipes of the README's recipe table that the storage format and module family already anticipate but that are
# not written yet: asking for one says so instead of "unknown recipe"
PLANNED_RECIPES = {
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("optimum-vim")
    except PackageNotFoundError:
        return "(source checkout)"


def get_recipe_class(name: str) -> type[Recipe]:
    from . import kscale, ptq4vm, rtn, vimvq  # noqa: F401 - registration side effect
    from .ouromamba import quantize as _ouromamba  # noqa: F401 - registration side effect

    if name not in RECIPES:
        if name in PLANNED_RECIPES:
            raise ValueError(
                f"recipe {name!r} ({PLANNED_RECIPES[name]}) is not implemented in optimum-vim "
                f"{_version()} yet; available recipes: {sorted(RECIPES)}"
            )
        raise ValueError(f"unknown recipe {name!r}; available recipes: {sorted(RECIPES)}")
    return RECIPES[name]


# ---------------------------------------------------------------------------------------------------------------
# target selection
def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    leaf = name.rsplit(".", 1)[-1]
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(leaf, pattern) or name.endswith("." + pattern)


def is_skipped(name: str, skip: list[str] | None) -> bool:
    """``modules_to_not_convert`` semantics: a module is skipped when an entry matches its full name, its leaf name
    (glob) or a dotted suffix, or when it lies inside a skipped module."""
    if not skip:
        return False
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(_matches(p, pat) for pat in skip for p in prefixes)


def layer_overrides(name: str, overrides: dict | None) -> dict | None:
    """Merged per-module settings from the config's ``overrides`` (later patterns win); ``{"skip": True}`` or a
    None value means "leave in float"."""
    merged: dict = {}
    for pattern, value in (overrides or {}).items():
        if _matches(name, pattern):
            if value is None:
                return {"skip": True}
            merged.update(value)
    return merged


def select_linears(model: nn.Module, leaf_names=BLOCK_LINEARS, skip: list[str] | None = None) -> list[str]:
    """Names of the ``nn.Linear`` modules whose leaf name is in ``leaf_names`` and that are not skipped."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in leaf_names and not is_skipped(name, skip):
            out.append(name)
    return out


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
