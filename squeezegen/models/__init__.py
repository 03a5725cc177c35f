"""Load models by name or path: bundled real models, local Hugging Face folders, tiny test models."""

from squeezegen.models.loading import SUPPORTED_MODEL_TYPES, available_models, load

__all__ = ["SUPPORTED_MODEL_TYPES", "available_models", "load"]
