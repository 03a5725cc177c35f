"""The packed-model kernel (runtime/csrc/binary_linear.c, in the runtime's one C library built on
the user's machine) called through ctypes. It serves decoding (a few tokens per call):
1-bit linear layers from their packed signs (the 16-bit LM head goes through the runtime's dense
kernel); a prefill's many tokens use the dense matrix product instead. Without a compiler
everything falls back to that dense path, with one warning.
"""

from __future__ import annotations

import ctypes

import torch

from squeezegen.errors import SqueezegenError
from squeezegen.runtime.native import BINARY_MAX_EXPERTS, BINARY_MAX_LAYERS, kernel_input, runtime_library
from squeezegen.runtime.native_step import PROJ_BINARY


def _kernel_input(x: torch.Tensor, in_features: int) -> tuple[ctypes.CDLL, torch.Tensor] | None:
    """(library, x contiguous) when the kernels take `x` (float32/bf16 on the CPU, 1..16 tokens), else None."""
    flat = kernel_input(x, in_features)
    lib = runtime_library() if flat is not None else None
    return None if lib is None else (lib, flat)


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


def _check_layer(in_features: int, experts: int, packed, out_features, in_scales, out_scales, router, bias) -> None:
    """Refuse tensors whose shapes or dtypes disagree with the layer (the kernel trusts them)."""
    rows = max(experts, 1)
    expected = {
        "packed": (packed, (out_features, -(-in_features // 8)), torch.uint8),
        "in_scales": (in_scales, (experts, in_features), torch.float32),
        "out_scales": (out_scales, (rows, out_features), torch.float32),
        "router": (router, (experts, in_features), torch.float32),
        "bias": (bias, (out_features,), torch.float32),
    }
    for name, (tensor, shape, dtype) in expected.items():
        if tensor is None and name in ("packed", "out_scales"):
            raise SqueezegenError(f"a packed 1-bit layer needs its {name}")
        if tensor is None:
            continue
        if tensor.shape != shape or tensor.dtype != dtype or not tensor.is_contiguous() or tensor.device.type != "cpu":
            raise SqueezegenError(
                f"a 1-bit layer ({in_features} -> {out_features}) needs {name} {dtype} {shape}, contiguous on the CPU; "
                f"got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}"
            )


class BinaryPlan:
    """One kernel call over binary layers that read the same input (attention's q/k/v, the MLP's
    gate/up; or a single layer), its constant arguments made once: `plan(x)` returns their outputs,
    or None where `binary_linear` would. Each layer is (packed, out_features, in_scales,
    out_scales, router, bias, layernorm) as `binary_linear` takes them; the tensors are kept."""

    def __init__(self, in_features: int, layers: list[tuple]) -> None:
        if not 1 <= len(layers) <= BINARY_MAX_LAYERS:
            raise ValueError(f"a plan takes 1 to {BINARY_MAX_LAYERS} layers, got {len(layers)}")
        experts = {0 if layer[2] is None else layer[2].shape[0] for layer in layers}
        if len(experts) != 1 or len({bool(layer[6]) for layer in layers}) != 1:
            raise ValueError("the layers of one plan need the same scaling (experts, layernorm)")
        self.layers, self.in_features = layers, in_features
        self.out_features = [layer[1] for layer in layers]
        self.experts = experts.pop()
        for layer in layers:
            _check_layer(in_features, self.experts, *layer[:6])
        count = len(layers)
        pointers = ctypes.c_void_p * count
        self._arrays = [
            (ctypes.c_int * count)(*self.out_features),
            *(pointers(*(_pointer(layer[k]) for layer in layers)) for k in (0, 2, 3, 4, 5)),
        ]
        outs, packed, ins, scales, routers, biases = (ctypes.addressof(a) for a in self._arrays)
        self._args = (outs, packed, ins, scales, self.experts, routers, biases, int(layers[0][6]))
        self._outputs = pointers

    def native_fields(self) -> dict | None:
        """The plan as the C decode step's `Proj` fields (runtime/native_step.py), or None."""
        if runtime_library() is None or self.experts > BINARY_MAX_EXPERTS:
            return None
        outs, packed, ins, scales, experts, routers, biases, layernorm = self._args
        return {
            "kind": PROJ_BINARY,
            "count": len(self.layers),
            "experts": experts,
            "layernorm": layernorm,
            "sizes": outs,
            "packed": packed,
            "in_scales": ins,
            "out_scales": scales,
            "routers": routers,
            "biases": biases,
        }

    def __reduce__(self):  # copied or pickled: made again over the copies of its tensors
        return BinaryPlan, (self.in_features, self.layers)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        ready = _kernel_input(x, self.in_features)
        if ready is None or self.experts > BINARY_MAX_EXPERTS:
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
