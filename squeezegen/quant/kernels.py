"""The packed 1-bit kernel: a small C library (csrc/binary_linear.c) compiled once on the user's
machine with its own C compiler (AVX2/FMA and OpenMP where the CPU and compiler have them),
cached, and called through ctypes. It serves decoding (a few tokens per call); a prefill's many
tokens unpack the signs and use the dense matrix product instead. Without a compiler the
layers fall back to that dense path everywhere, with one warning.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from squeezegen.paths import cache_dir

SOURCE = Path(__file__).parent / "csrc" / "binary_linear.c"
KERNEL_TOKENS = 16  # at most this many tokens per call go through the kernel; more are a matmul's job


def _flags() -> list[str]:
    flags = ["-O3", "-fPIC", "-shared", "-fopenmp"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use, then loaded from the cache), or None."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        warnings.warn("no C compiler found: packed 1-bit layers unpack to dense matrices (slower)", stacklevel=2)
        return None
    flags = _flags()
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"binary_linear-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                    built = Path(tmp) / target.name
                    result = subprocess.run(
                        [compiler, *flags, str(SOURCE), "-o", str(built), "-lm"], capture_output=True
                    )
                    if result.returncode:
                        message = result.stderr.decode(errors="replace").strip().splitlines()[-1:]
                        warnings.warn(
                            f"building the 1-bit kernel failed ({message}): using dense matrices", stacklevel=2
                        )
                        return None
                    built.replace(target)
    lib = ctypes.CDLL(str(target))
    lib.sg_binary_linear.restype = ctypes.c_int
    lib.sg_binary_linear.argtypes = (
        [ctypes.c_void_p] * 2
        + [ctypes.c_int] * 4
        + [ctypes.c_void_p] * 3
        + [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
        ]
    )
    return lib


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def binary_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    in_scales: torch.Tensor | None,
    out_scales: torch.Tensor,
    router: torch.Tensor | None,
    bias: torch.Tensor | None,
    layernorm: bool,
) -> torch.Tensor | None:
    """y (..., out) = out_scale * (signs @ (in_scale * x)) (+ bias), scales mixed per token by
    softmax(router . x) when a router is given; None when the kernel does not apply (too many
    tokens, a dtype or device it does not take, no kernel) and the caller computes densely.
    Scales, router and bias are float32 (E, in) / (E, out) / (out)."""
    lib = library()
    tokens = x.numel() // x.shape[-1]
    if (
        lib is None
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.bfloat16)
        or tokens > KERNEL_TOKENS
    ):
        return None
    flat = x.reshape(tokens, x.shape[-1]).contiguous()
    y = torch.empty(tokens, out_features, dtype=x.dtype)
    experts = 0 if in_scales is None else in_scales.shape[0]
    status = lib.sg_binary_linear(
        flat.data_ptr(),
        y.data_ptr(),
        int(x.dtype == torch.bfloat16),
        tokens,
        x.shape[-1],
        out_features,
        packed.data_ptr(),
        _pointer(in_scales),
        out_scales.data_ptr(),
        experts,
        _pointer(router),
        _pointer(bias),
        int(layernorm),
    )
    if status:
        raise MemoryError("the 1-bit kernel could not allocate its scratch memory")
    return y.view(*x.shape[:-1], out_features)
