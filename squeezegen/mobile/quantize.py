"""Quantization recipes for the exported modules, named as on the command line.

fp16 and int8 act on the weights only (activations stay float, as the paper ran them on the mobile
GPU); int8-dynamic also quantizes activations on the fly for the CPU kernels that support it.
"""

from __future__ import annotations

from squeezegen.errors import MissingDependencyError, SqueezegenError

RECIPES = {
    "fp32": "float32 weights and activations",
    "fp16": "float16 weights, float32 activations in the file (the GPU runs them in fp16)",
    "int8-weight-only": "int8 per-channel weights dequantized on load, float activations",
    "int8-dynamic": "int8 per-channel weights, activations quantized dynamically per op (CPU)",
}


def check_recipe(recipe: str) -> str:
    if recipe not in RECIPES:
        raise SqueezegenError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    return recipe


def quant_config(recipe: str):
    """litert-torch QuantConfig for a recipe name (None for fp32)."""
    check_recipe(recipe)
    if recipe == "fp32":
        return None
    try:
        from litert_torch.generative.quantize import quant_recipes
    except ImportError as exc:
        raise MissingDependencyError("quantized export needs litert-torch: pip install 'squeezegen[mobile]'") from exc
    if recipe == "fp16":
        return quant_recipes.full_fp16_recipe()
    if recipe == "int8-weight-only":
        return quant_recipes.full_weight_only_recipe()
    return quant_recipes.full_dynamic_recipe()
