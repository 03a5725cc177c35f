"""What the hardware does natively: the dtype "auto" resolves to bfloat16 only where matrix work in
bf16 is native (CUDA with bf16; CPUs with AMX or AVX512-BF16), float32 elsewhere."""

from __future__ import annotations

from functools import cache

import torch


@cache
def _native_bf16(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return False


def native_bf16(device: torch.device | str) -> bool:
    """Does `device` run bfloat16 matrix products natively (not by converting to float32)?"""
    return _native_bf16(torch.device(device).type)


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 where it is native, float32 elsewhere (bf16 emulated on AVX2 is slower than fp32)."""
    return torch.bfloat16 if native_bf16(device) else torch.float32
