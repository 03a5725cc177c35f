"""The packed-model kernels: a small C library (csrc/binary_linear.c) compiled once on the user's
machine with its own C compiler (AVX2/FMA/F16C and OpenMP where the CPU and compiler have them),
cached, and called through ctypes. It serves decoding (a few tokens per call): 1-bit linear layers
from their packed signs, and the 16-bit LM head; a prefill's many tokens use the dense matrix
product instead. Without a compiler everything falls back to that dense path, with one warning.
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
MAX_EXPERTS = 64  # the kernel's per-token gate buffer
MAX_GROUP = 8  # layers per grouped call (csrc: MAX_GROUP)
_DTYPES = (torch.float32, torch.bfloat16)


def _flags() -> list[str]:
    flags = ["-O3", "-fPIC", "-shared", "-fopenmp"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
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
    lib.sg_binary_linears.restype = ctypes.c_int
    lib.sg_binary_linears.argtypes = (
        [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        + [ctypes.c_int] * 3
        + [ctypes.c_void_p] * 4
        + [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    )
    lib.sg_half_linear.restype = ctypes.c_int
    lib.sg_half_linear.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 4 + [ctypes.c_void_p]
    return lib


def _kernel_input(x: torch.Tensor) -> tuple[ctypes.CDLL, torch.Tensor] | None:
    """(library, x contiguous) when the kernels take `x` (float32/bf16 on the CPU, 1..16 tokens), else None."""
    lib = library()
    if lib is None or not x.is_cpu or x.dtype not in _DTYPES:
        return None
    tokens = x.numel() // x.shape[-1]
    if tokens > KERNEL_TOKENS or tokens == 0:
        return None
    return lib, x if x.is_contiguous() else x.contiguous()


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
    ys = BinaryPlan(x.shape[-1], [(packed, out_features, in_scales, out_scales, router, bias, layernorm)])(x)
    return None if ys is None else ys[0]


class BinaryPlan:
    """One kernel call over binary layers that read the same input (attention's q/k/v, the MLP's
    gate/up; or a single layer), its constant arguments made once: `plan(x)` returns their outputs,
    or None where `binary_linear` would. Each layer is (packed, out_features, in_scales,
    out_scales, router, bias, layernorm) as `binary_linear` takes them; the tensors are kept."""

    def __init__(self, in_features: int, layers: list[tuple]) -> None:
        if not 1 <= len(layers) <= MAX_GROUP:
            raise ValueError(f"a plan takes 1 to {MAX_GROUP} layers, got {len(layers)}")
        experts = {0 if layer[2] is None else layer[2].shape[0] for layer in layers}
        if len(experts) != 1 or len({bool(layer[6]) for layer in layers}) != 1:
            raise ValueError("the layers of one plan need the same scaling (experts, layernorm)")
        self.layers, self.in_features = layers, in_features
        self.out_features = [layer[1] for layer in layers]
        self.experts = experts.pop()
        count = len(layers)
        pointers = ctypes.c_void_p * count
        self._arrays = [
            (ctypes.c_int * count)(*self.out_features),
            *(pointers(*(_pointer(layer[k]) for layer in layers)) for k in (0, 2, 3, 4, 5)),
        ]
        outs, packed, ins, scales, routers, biases = (ctypes.addressof(a) for a in self._arrays)
        self._args = (outs, packed, ins, scales, self.experts, routers, biases, int(layers[0][6]))
        self._outputs = pointers

    def __reduce__(self):  # copied or pickled: made again over the copies of its tensors
        return BinaryPlan, (self.in_features, self.layers)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        ready = _kernel_input(x)
        if ready is None or x.shape[-1] != self.in_features or self.experts > MAX_EXPERTS:
            return None
        lib, flat = ready
        ys = [torch.empty((*x.shape[:-1], out), dtype=x.dtype) for out in self.out_features]
        targets = self._outputs(*(y.data_ptr() for y in ys))
        status = lib.sg_binary_linears(
            len(ys),
            flat.data_ptr(),
            ctypes.addressof(targets),
            int(x.dtype == torch.bfloat16),
            flat.numel() // self.in_features,
            self.in_features,
            *self._args,
        )
        if status:
            raise MemoryError("the 1-bit kernel could not allocate its scratch memory")
        return ys


def half_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """y (..., out) = x @ weight.T in float32 arithmetic for a float16 `weight` (out, in), in x's
    dtype; None when the kernel does not apply (as `binary_linear`)."""
    ready = _kernel_input(x)
    if ready is None or weight.dtype != torch.float16 or weight.device.type != "cpu" or not weight.is_contiguous():
        return None
    lib, flat = ready
    tokens, out_features = flat.numel() // flat.shape[-1], weight.shape[0]
    y = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype)
    status = lib.sg_half_linear(
        flat.data_ptr(),
        y.data_ptr(),
        int(x.dtype == torch.bfloat16),
        tokens,
        x.shape[-1],
        out_features,
        weight.data_ptr(),
    )
    if status:
        raise MemoryError("the 16-bit head kernel could not allocate its scratch memory")
    return y
