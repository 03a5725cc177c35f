"""Small C kernels built on the user's machine: compiled once with its own C compiler (AVX2/FMA/F16C,
AVX512 and OpenMP where the CPU and compiler have them), cached by source and flags, loaded
through ctypes. Without a compiler, callers fall back to torch (one warning).

The C files (csrc/*.c: the decode step and the dense, 4-bit and 1-bit products it calls) make one
library, `runtime_library()`, with every entry point's signature set there, so each is called one
way; csrc/helpers.h holds what they share.

`dense_linear` is the decode-time matrix-vector product (csrc/dense_linear.c): a decode step
reads every weight once, and for float32 and 16-bit weights torch's CPU kernels reach about half
of what the memory gives on small CPUs (SmolLM2's LM head, 2 cores: float32 11 GB/s against 26).
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

from squeezegen.errors import SqueezegenError
from squeezegen.paths import cache_dir
from squeezegen.runtime.device import cpu_model_and_flags

CSRC = Path(__file__).parent / "csrc"
KERNEL_TOKENS = 16  # a module's product takes the kernel up to this many tokens; more are a matrix product's job
STEP_ROWS = 64  # the most rows a C decode step takes (csrc/kernels.h's SG_MAX_TOKENS)
BINARY_MAX_LAYERS = 8  # 1-bit layers one call takes (SG_MAX_LAYERS)
BINARY_MAX_EXPERTS = 64  # 1-bit scale rows mixed per token (SG_MAX_EXPERTS)
_WEIGHT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def compile_flags() -> list[str]:
    """What this CPU's kernels are built with (the vector units torch found on it)."""
    flags = ["-O3", "-fPIC", "-shared", "-fopenmp", f"-I{CSRC}"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    cpu = cpu_model_and_flags()[1]
    if capability == "AVX512" and {"avx512f", "avx512bw", "avx512vl"} <= cpu:
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl"]
        if "avx512_bf16" in cpu:
            flags.append("-mavx512bf16")
    return flags


def build(sources: list[Path], what: str) -> ctypes.CDLL | None:
    """C files compiled for this machine into one library (once; later calls load the cached
    library), or None with a warning naming `what` falls back to torch."""
    sources = sorted(sources)
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        warnings.warn(f"no C compiler found: {what} runs through torch (slower)", stacklevel=3)
        return None
    flags = compile_flags()
    headers = sorted(CSRC.glob("*.h"))
    text = b"".join(p.read_bytes() for p in [*sources, *headers]) + " ".join([compiler, *flags]).encode()
    target = cache_dir() / "kernels" / f"{sources[0].stem}-{hashlib.sha256(text).hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                    built = Path(tmp) / target.name
                    result = subprocess.run(
                        [compiler, *flags, *map(str, sources), "-o", str(built), "-lm"], capture_output=True
                    )
                    if result.returncode:
                        message = result.stderr.decode(errors="replace").strip().splitlines()[-1:]
                        warnings.warn(
                            f"building {sources[0].name} failed ({message}): {what} runs through torch", stacklevel=3
                        )
                        return None
                    built.replace(target)
    return ctypes.CDLL(str(target))


@functools.cache
def runtime_library() -> ctypes.CDLL | None:
    """The C files built together (decode step; dense, 4-bit and 1-bit products) for this machine,
    their entry points' signatures set (`with_signatures`), or None."""
    lib = build(list(CSRC.glob("*.c")), "decoding's matrix-vector products")
    return None if lib is None else with_signatures(lib)


def with_signatures(lib: ctypes.CDLL) -> ctypes.CDLL:
    """`lib`, a build of csrc/*.c, with the signatures of the products modules call set: the one
    way each is called."""
    pointer, integer = [ctypes.c_void_p], [ctypes.c_int]
    for entry, args in {
        "sg_dense_linear": pointer * 2 + integer * 4 + pointer + integer,
        "sg_int4_linear": pointer * 2 + integer * 4 + pointer * 3 + integer,
        "sg_binary_linears": integer + pointer * 2 + integer * 3 + pointer * 4 + integer + pointer * 2 + integer,
    }.items():
        getattr(lib, entry).restype = ctypes.c_int
        getattr(lib, entry).argtypes = args
    return lib


def kernel_input(x: torch.Tensor, in_features: int) -> torch.Tensor | None:
    """x contiguous when a decode kernel takes it (float32/bf16 on the CPU, 1..16 tokens), else None;
    an x whose last dimension is not `in_features` is refused here, since the kernels trust it."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != in_features:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise SqueezegenError(f"this layer takes inputs of shape (..., {in_features}), got {got}")
    if (
        not x.is_cpu
        or x.dtype not in (torch.float32, torch.bfloat16)
        or not 0 < x.numel() // x.shape[-1] <= KERNEL_TOKENS
    ):
        return None
    return x if x.is_contiguous() else x.contiguous()


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """y (..., out) = x @ weight.T, summed in float32, in x's dtype, for a float32, bfloat16 or
    float16 `weight` (out, in) on the CPU; None where the kernel does not apply (too many tokens,
    another dtype or device, no compiler), and the caller computes it with torch."""
    if torch.compiler.is_compiling():  # inside torch.compile the compiler's own kernels serve
        return None
    if weight.dim() != 2:
        raise SqueezegenError(f"dense_linear takes a weight (out, in), got shape {tuple(weight.shape)}")
    flat = kernel_input(x, weight.shape[1])
    kind = _WEIGHT_KINDS.get(weight.dtype)
    if flat is None or kind is None or weight.device.type != "cpu" or not weight.is_contiguous():
        return None
    lib = runtime_library()
    if lib is None:
        return None
    y = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype)
    tokens = flat.numel() // flat.shape[-1]
    bf16 = int(x.dtype == torch.bfloat16)
    if lib.sg_dense_linear(
        flat.data_ptr(), y.data_ptr(), bf16, tokens, x.shape[-1], weight.shape[0], weight.data_ptr(), kind
    ):
        raise MemoryError("the decode kernel could not allocate its scratch memory")
    return y
