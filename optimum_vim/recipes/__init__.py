"""Quantization recipes: each decides scales / codebooks and returns a plan; ``apply_plan`` swaps the modules."""

from .base import (
    LayerPlan,
    QuantPlan,
    Recipe,
    apply_plan,
    build_quantized_skeleton,
    quantized_modules,
)
from .registry import RECIPES, get_recipe_class
from .rtn import RTNArgs, RTNRecipe
from .targets import LayerSettings, Targets

__all__ = [
    "RECIPES",
    "LayerPlan",
    "LayerSettings",
    "QuantPlan",
    "RTNArgs",
    "RTNRecipe",
    "Recipe",
    "Targets",
    "apply_plan",
    "build_quantized_skeleton",
    "get_recipe_class",
    "quantized_modules",
]
