"""The recipe registry: one line per recipe (``name: "module:Class"``), imported on first use. Recipe modules import
from :mod:`.base` only, so registering needs no import of the recipes here and there is no import cycle."""

from __future__ import annotations

import importlib

from .base import Recipe

RECIPES: dict[str, str] = {
    "rtn": "optimum_vim.recipes.rtn:RTNRecipe",
    "ptq4vm": "optimum_vim.recipes.ptq4vm:PTQ4VMRecipe",
    "kscale": "optimum_vim.recipes.kscale:KScaleRecipe",
    "ouromamba": "optimum_vim.recipes.ouromamba.quantize:OuroMambaRecipe",
    "vimvq": "optimum_vim.recipes.vimvq:ViMVQRecipe",
}

# recipes of the README's recipe table that the storage format and module family already anticipate but that are
# not written yet: asking for one says so instead of "unknown recipe"
PLANNED_RECIPES: dict[str, str] = {}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("optimum-vim")
    except PackageNotFoundError:
        return "(source checkout)"


def get_recipe_class(name: str) -> type[Recipe]:
    """The recipe class registered as ``name``."""
    if name not in RECIPES:
        if name in PLANNED_RECIPES:
            raise ValueError(
                f"recipe {name!r} ({PLANNED_RECIPES[name]}) is not implemented in optimum-vim "
                f"{_version()} yet; available recipes: {sorted(RECIPES)}"
            )
        raise ValueError(f"unknown recipe {name!r}; available recipes: {sorted(RECIPES)}")
    module, attr = RECIPES[name].split(":")
    cls = getattr(importlib.import_module(module), attr)
    if cls.name != name:
        raise TypeError(f"{RECIPES[name]} is registered as {name!r} but its name is {cls.name!r}")
    return cls
