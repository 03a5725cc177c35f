"""What the hardware does natively: the dtype "auto" resolves to bfloat16 only where matrix work in
bf16 is native (CUDA with bf16; CPUs with AMX or AVX512-BF16), float32 elsewhere.

`SQUEEZEGEN_AUTO_DTYPE=bfloat16|float32` forces what "auto" means whatever the hardware, so that
the bf16 default of most users' machines can be tested on a CPU without native bf16 (and the
float32 one on a CPU with it)."""

from __future__ import annotations

import os
import platform
from functools import cache

import torch

from squeezegen.errors import SqueezegenError

AUTO_DTYPE_ENV = "SQUEEZEGEN_AUTO_DTYPE"
_FORCED = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


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


def forced_auto_dtype() -> torch.dtype | None:
    """The dtype `SQUEEZEGEN_AUTO_DTYPE` makes "auto" mean, or None when it is unset."""
    value = os.environ.get(AUTO_DTYPE_ENV, "").strip()
    if not value:
        return None
    if value.lower() not in _FORCED:
        raise SqueezegenError(f"{AUTO_DTYPE_ENV}={value!r} is not a dtype: set it to bfloat16 or float32, or unset it")
    return _FORCED[value.lower()]


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 where it is native, float32 elsewhere (bf16 emulated on AVX2 is slower than fp32),
    unless `SQUEEZEGEN_AUTO_DTYPE` says otherwise."""
    forced = forced_auto_dtype()
    if forced is not None:
        return forced
    return torch.bfloat16 if native_bf16(device) else torch.float32


# the CPU features that decide which kernels run (and how fast bf16 is): what a result records
SPEED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


@cache
def cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    """The CPU's model name and the feature flags /proc/cpuinfo lists (empty where it cannot be read)."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    return model, flags


@cache
def host() -> dict:
    """The machine a result is measured on: CPU model, its speed-deciding flags and class ("amx",
    "avx512-bf16", "avx2" or "other"), cores, and the GPU if one is visible. Stored with results,
    since speed ratios hold only for the machine class they were measured on."""
    model, flags = cpu_model_and_flags()
    if "amx_bf16" in flags:
        kind = "amx"
    elif "avx512_bf16" in flags:
        kind = "avx512-bf16"
    else:
        kind = "avx2" if "avx2" in flags else "other"
    record = {"cpu": model, "cpu_class": kind, "cpu_flags": [f for f in SPEED_FLAGS if f in flags]}
    record["cores"] = os.cpu_count()
    if torch.cuda.is_available():
        record["gpu"] = torch.cuda.get_device_name()
    return record
