"""The fused decode step run by C (csrc/decode_step.c): the structs it reads, made once per model
from the fused forward's layers, and the call that runs a step.

Python's share of a step is then the embedding lookup, one call into C (one a layer when a
method's `after_decode_attention` hook must see each layer's queries) and the head's logits; the C
loop reads the same weight tensors the HF modules hold and writes the engine's own decode
buffers. Where it does not apply (a GPU, float16, more than 64 rows, a layer cache split per head,
a projection no kernel takes, inside `torch.compile`) the step returns None and the fused forward
runs as torch operations.

Projections are plain (concatenated) weights in float32/bf16/fp16, or modules whose class offers
`native_projection(modules) -> NativeProjection | None` (4-bit and packed 1-bit layers, the
16-bit LM head of a packed model): the runtime names the kinds it runs, the layers that are
quantized say which kind they are.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import warnings
from dataclasses import dataclass, field

import torch

from squeezegen.errors import SqueezegenError
from squeezegen.runtime.cache import LayerCache
from squeezegen.runtime.native import BINARY_MAX_EXPERTS, BINARY_MAX_LAYERS, STEP_ROWS, runtime_library

PROJ_DENSE, PROJ_INT4, PROJ_BINARY = 0, 1, 2
WEIGHT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1}
_P = ctypes.c_void_p


class Proj(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int) for name in ("kind", "weight_kind", "in_features", "out_features")),
        ("weight", _P),
        ("scales", _P),
        ("mins", _P),
        ("group", ctypes.c_int),
        ("bias", _P),
        ("bias_kind", ctypes.c_int),
        *((name, ctypes.c_int) for name in ("count", "experts", "layernorm")),
        *((name, _P) for name in ("sizes", "packed", "in_scales", "out_scales", "routers", "biases")),
    ]


class LayerStruct(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int) for name in ("heads", "kv_heads", "head_dim", "window")),
        ("scaling", ctypes.c_float),
        *(
            (name, _P)
            for name in ("input_norm", "q_norm", "k_norm", "post_attention_norm", "mlp_norm", "post_mlp_norm")
        ),
        *((name, Proj) for name in ("qkv", "o", "gate_up", "down")),
        ("act", ctypes.c_int),
        ("cos", _P),
        ("sin", _P),
        ("rope_positions", ctypes.c_int),
        ("keys", _P),
        ("values", _P),
        ("pos", _P),
        ("capacity", ctypes.c_int),
    ]


class ModelStruct(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int) for name in ("width", "bf16", "gemma_norm", "threads")),
        ("eps", ctypes.c_float),
        ("layers", ctypes.c_int),
        ("layer", ctypes.POINTER(LayerStruct)),
        ("final_norm", _P),
        ("head", Proj),
        ("scratch", _P),
        ("widest", ctypes.c_size_t),
    ]


@dataclass
class NativeProjection:
    """A projection group as the C step runs it: the `Proj` fields, and the tensors and ctypes
    arrays they point into (kept alive as long as the step)."""

    fields: dict
    alive: list = field(default_factory=list)


def check_layout(lib: ctypes.CDLL) -> None:
    """Refuse a library whose structs or constants differ from the mirrors here (sg_decode_layout)."""
    ours = {
        "sizeof(Proj)": ctypes.sizeof(Proj),
        "sizeof(Layer)": ctypes.sizeof(LayerStruct),
        "sizeof(Model)": ctypes.sizeof(ModelStruct),
        "SG_MAX_TOKENS": STEP_ROWS,
        "SG_MAX_LAYERS": BINARY_MAX_LAYERS,
        "SG_MAX_EXPERTS": BINARY_MAX_EXPERTS,
        "PROJ_DENSE": PROJ_DENSE,
        "PROJ_INT4": PROJ_INT4,
        "PROJ_BINARY": PROJ_BINARY,
    }
    lib.sg_decode_layout.restype = None
    lib.sg_decode_layout.argtypes = [_P]
    theirs = (ctypes.c_int64 * len(ours))()
    lib.sg_decode_layout(theirs)
    differ = [f"{name} {c} in C, {py} here" for (name, py), c in zip(ours.items(), theirs, strict=True) if c != py]
    if differ:
        raise SqueezegenError(f"the C decode step and native_step.py disagree ({', '.join(differ)}): change both")


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = runtime_library()
    if lib is not None:
        check_layout(lib)
        lib.sg_decode_scratch.restype = ctypes.c_size_t
        lib.sg_decode_scratch.argtypes = [_P, ctypes.c_int]
        lib.sg_decode_layers.restype = ctypes.c_int
        lib.sg_decode_layers.argtypes = [_P, ctypes.c_int, ctypes.c_int, _P, ctypes.c_int, _P, _P]
        lib.sg_decode_head.restype = ctypes.c_int
        lib.sg_decode_head.argtypes = [_P, _P, ctypes.c_int, _P]
    return lib


def dense_projection(weight: torch.Tensor, bias: torch.Tensor | None) -> NativeProjection | None:
    """A product over a dense float32/bf16/fp16 weight (out, in) as the C step runs it, or None."""
    if weight.dtype not in WEIGHT_KINDS or not weight.is_contiguous() or weight.device.type != "cpu":
        return None
    if bias is not None and (bias.dtype not in WEIGHT_KINDS or not bias.is_contiguous()):
        return None
    fields = {"kind": PROJ_DENSE, "weight_kind": WEIGHT_KINDS[weight.dtype], "weight": weight.data_ptr()}
    if bias is not None:
        fields |= {"bias": bias.data_ptr(), "bias_kind": WEIGHT_KINDS[bias.dtype]}
    return NativeProjection(fields, [weight, bias])


def _projection(projections) -> NativeProjection | None:
    """A fused `Projections` group as the C step runs it, or None."""
    if projections.weight is not None:
        made = dense_projection(projections.weight, projections.bias)
    else:
        kinds = {type(m) for m in projections.modules}
        offer = getattr(kinds.pop(), "native_projection", None) if len(kinds) == 1 else None
        made = offer(projections.modules) if offer is not None else None
    if made is not None:
        made.fields |= {"in_features": projections.modules[0].in_features, "out_features": sum(projections.sizes)}
    return made


def _norm_pointer(norm, dtype: torch.dtype, alive: list) -> int | None:
    if norm is None:
        return None
    weight = norm.module.weight.detach()
    if weight.dtype != dtype or not weight.is_contiguous():
        return -1  # a norm the step cannot read: no native step
    alive.append(weight)
    return weight.data_ptr()


class NativeStep:
    """The C decode step of one fused model (`NativeStep.of(fused)`), or None where it cannot run."""

    def __init__(self, fused, lib: ctypes.CDLL) -> None:
        self.fused, self.lib = fused, lib
        first = fused.layers[0]
        dtype = first.input_norm.module.weight.dtype
        self.dtype = dtype
        self.alive: list = []
        self.struct_layers = (LayerStruct * len(fused.layers))()
        eps = {fused.norm.eps}
        for layer, struct in zip(fused.layers, self.struct_layers, strict=True):
            norms = {
                "input_norm": layer.input_norm,
                "q_norm": layer.q_norm,
                "k_norm": layer.k_norm,
                "post_attention_norm": layer.post_attention_norm,
                "mlp_norm": layer.mlp_norm,
                "post_mlp_norm": layer.post_mlp_norm,
            }
            for name, norm in norms.items():
                pointer = _norm_pointer(norm, dtype, self.alive)
                if pointer == -1:
                    raise _Unsupported(f"{name} is not a contiguous {dtype} weight")
                setattr(struct, name, pointer)
                if norm is not None:
                    eps.add(norm.eps)
            for name, field_name in (("qkv", "qkv"), ("o_proj", "o"), ("gate_up", "gate_up"), ("down_proj", "down")):
                made = _projection(getattr(layer, name))
                if made is None:
                    raise _Unsupported(f"no kernel for the {name} projection")
                self.alive.append(made)
                setattr(struct, field_name, Proj(**made.fields))
            if layer.act_name not in ACTIVATIONS:
                raise _Unsupported(f"activation {layer.act_name}")
            struct.heads, struct.kv_heads, struct.head_dim = layer.heads, layer.kv_heads, layer.head_dim
            struct.window, struct.scaling, struct.act = layer.window or 0, layer.scaling, ACTIVATIONS[layer.act_name]
        if len(eps) != 1 or len({layer.input_norm.gemma for layer in fused.layers} | {fused.norm.gemma}) != 1:
            raise _Unsupported("norms of different forms or epsilons")
        head = _projection(fused.head)
        final_norm = _norm_pointer(fused.norm, dtype, self.alive)
        if head is None or final_norm == -1:
            raise _Unsupported("no kernel for the LM head")
        self.alive.append(head)
        self.struct = ModelStruct(
            width=fused.layers[0].input_norm.module.weight.shape[0],
            bf16=int(dtype == torch.bfloat16),
            gemma_norm=int(fused.norm.gemma),
            eps=eps.pop(),
            layers=len(fused.layers),
            layer=self.struct_layers,
            final_norm=final_norm,
            head=Proj(**head.fields),
        )
        self.vocab = head.fields["out_features"]
        self.scratch = torch.empty(0)
        self._bound: list = []
        self.steps = 0  # decode steps run in C (the rest fell back to the torch step)
        self._lock = threading.Lock()

    @classmethod
    def of(cls, fused) -> NativeStep | None:
        lib = _library()
        dtype = fused.layers[0].input_norm.module.weight.dtype if fused.layers else None
        if lib is None or dtype not in (torch.float32, torch.bfloat16) or fused.norm.module.weight.device.type != "cpu":
            return None
        try:
            return cls(fused, lib)
        except _Unsupported as exc:
            warnings.warn(  # once per message and place (Python's default filter)
                f"the C decode step does not take this model ({exc}): its decode steps run in torch, slower",
                stacklevel=2,
            )
            return None

    def _bind(self, engine) -> bool:
        """Point the layers at the engine's decode buffers and the RoPE table now (they move when
        buffers grow or the table is extended); False where a layer is not a plain decode buffer."""
        caches = engine.cache.layers
        tables = self.fused.rope.tables
        bound = []
        for cache, layer in zip(caches, self.fused.layers, strict=True):
            if type(cache) is not LayerCache or not cache.static or cache.keys.dtype != self.dtype:
                return False
            cos, sin = tables[layer.rope_type]
            bound.append((cache.keys, cache.values, cache.pos, cos, sin))
        if len(bound) == len(self._bound) and all(
            all(a is b for a, b in zip(new, old, strict=True)) for new, old in zip(bound, self._bound, strict=True)
        ):
            return True
        for (keys, values, pos, cos, sin), struct in zip(bound, self.struct_layers, strict=True):
            if not (keys.is_contiguous() and values.is_contiguous() and pos.is_contiguous() and cos.is_contiguous()):
                return False
            struct.keys, struct.values, struct.pos = keys.data_ptr(), values.data_ptr(), pos.data_ptr()
            struct.capacity = keys.shape[2]
            struct.cos, struct.sin, struct.rope_positions = cos.data_ptr(), sin.data_ptr(), cos.shape[0]
        self._bound = bound
        return True

    def __call__(self, engine, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """One decode step: tokens (B,) at positions (B,) -> logits (B, V) float32, or None where
        the C step does not apply (the caller runs the torch one)."""
        if torch.compiler.is_compiling() or tokens.shape[0] > STEP_ROWS:
            return None
        with self._lock:  # one model, one set of structs: engines on other threads wait their turn
            if not self._bind(engine):
                return None
            self._check(tokens, positions)
            return self._step(engine, tokens, positions)

    def _check(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Refuse what the C loop would read or write out of bounds: it trusts every shape."""
        rows = self._bound[0][0].shape[0]
        for name, t in (("tokens", tokens), ("positions", positions)):
            if t.shape != (rows,) or t.dtype != torch.long or t.device.type != "cpu":
                raise SqueezegenError(
                    f"the C decode step takes {name} as {rows} int64 values on the CPU (one per cached row), got "
                    f"{t.dtype} {tuple(t.shape)} on {t.device}"
                )
        if any(keys.shape[0] != rows for keys, *_ in self._bound):
            raise SqueezegenError("the engine's layers hold different numbers of rows: start a new Engine")

    def _step(self, engine, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rows = tokens.shape[0]
        hidden = engine.parts.embed(tokens[:, None])[:, 0].to(torch.float32).contiguous()
        model = ctypes.byref(self.struct)
        self.struct.threads = torch.get_num_threads()
        floats = self.lib.sg_decode_scratch(model, rows)
        if self.scratch.numel() < floats:
            self.scratch = torch.empty(floats + floats // 2, dtype=torch.float32)
            self.struct.scratch = self.scratch.data_ptr()
        positions = positions.contiguous()
        args = (hidden.data_ptr(), rows, positions.data_ptr())
        if "after_decode_attention" in engine.hooks:
            for i, layer in enumerate(self.fused.layers):
                query = torch.empty(rows, layer.heads, 1, layer.head_dim, dtype=self.dtype)
                if self.lib.sg_decode_layers(model, i, i + 1, *args, query.data_ptr()):
                    raise RuntimeError("the C decode step refused its input")
                engine.method.after_decode_attention(engine.view(i), query)
        elif self.lib.sg_decode_layers(model, 0, len(self.fused.layers), *args, None):
            raise RuntimeError("the C decode step refused its input")
        logits = torch.empty(rows, self.vocab, dtype=torch.float32)
        if self.lib.sg_decode_head(model, hidden.data_ptr(), rows, logits.data_ptr()):
            raise RuntimeError("the C decode step's head failed")
        self.steps += 1
        return logits


class _Unsupported(Exception):
    """A model part the C step has no code for (the torch step runs instead)."""
