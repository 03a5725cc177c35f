"""Quantized weights: 1-bit binary linear layers (sign, OneBit, BinaryMoS), packing, distillation,
checkpoints; 4-bit weight-only layers in GGUF Q4_1's layout."""

from squeezegen.quant.api import (
    BinaryMoSConfig,
    OneBitConfig,
    SignConfig,
    binarize_,
    bits_per_weight,
    pack_,
    stored_bytes,
)
from squeezegen.quant.checkpoint import load_binary, save
from squeezegen.quant.int4 import Int4WeightOnlyConfig, quantize_

__all__ = [
    "BinaryMoSConfig",
    "Int4WeightOnlyConfig",
    "OneBitConfig",
    "SignConfig",
    "binarize_",
    "bits_per_weight",
    "load_binary",
    "pack_",
    "quantize_",
    "save",
    "stored_bytes",
]
