"""1-bit weights: binary linear layers (sign, OneBit, BinaryMoS), packing, distillation, checkpoints."""

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

__all__ = [
    "BinaryMoSConfig",
    "OneBitConfig",
    "SignConfig",
    "binarize_",
    "bits_per_weight",
    "load_binary",
    "pack_",
    "save",
    "stored_bytes",
]
