"""Quantization recipes: each decides scales / codebooks and returns a plan; ``apply_plan`` swaps the modules."""

from .base import (
    BLOCK_LINEARS,
    RECIPES,
    LayerPlan,
    QuantPlan,
    Recipe,
    apply_plan,
    build_quantized_skeleton,
    get_recipe_class,
    quantized_modules,
    register_recipe,
)
from .rtn import RTNArgs, RTNRecipe

__all__ = [
    "BLOCK_LINEARS",
    "RECIPES",
    "LayerPlan",
    "QuantPlan",
    "RTNArgs",
    "RTNRecipe",
    "Recipe",
    "apply_plan",
    "build_quantized_skeleton",
    "get_recipe_class",
    "quantized_modules",
    "register_recipe",
]
