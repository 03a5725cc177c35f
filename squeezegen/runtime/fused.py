"""The engine's own decode forward: every decoder layer as plain tensor code over the HF layer's
weights, in the manner of gpt-fast's model.py.

A token per row and layer: RMSNorm, one q/k/v product, the q/k norms (Qwen3, Gemma-3), RoPE from
a table, the engine's attention over its static buffers (`Engine.attend`: the cache write, the
decode-time method hooks, per-head buffers), the output projection, one gate/up product, the
activation and the down projection; no HF module, kwargs or attention-interface dispatch on the
way. The q/k/v and gate/up weights are concatenated once per model and the HF projections' own
weights become views into them, so nothing is held twice and the HF layers (which run every
prefill, and stay the reference) compute what they computed. Projections that are not plain
`nn.Linear` (packed 1-bit layers) are called as modules, so their kernels serve the fused step too.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from squeezegen.runtime.decoder import DecoderParts
from squeezegen.runtime.native import dense_linear
from squeezegen.runtime.native_step import NativeStep

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class Norm:
    """An RMSNorm as its HF module computes it: Llama's `w * x_normed.to(dtype)` or Gemma's
    `(x_normed * (1 + w)).to(dtype)`, normalised in float32 (the module's weight read each call)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.gemma = type(module).__name__.startswith("Gemma")
        self.eps = module.eps if self.gemma else module.variance_epsilon

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.module.weight
        return (h * (1.0 + weight.float())).type_as(x) if self.gemma else weight * h.to(x.dtype)


class Projections:
    """Linear layers of `parent` that read one input (or one alone), as one product: their weights
    (and biases) concatenated into one tensor that the modules then view; modules that are not
    plain nn.Linear (4-bit or packed 1-bit layers) are called as they are."""

    def __init__(self, parent: nn.Module, names: list[str]) -> None:
        self.modules = [getattr(parent, name) for name in names]
        self.sizes = [m.out_features for m in self.modules]
        self.weight = self.bias = None
        plain = all(type(m) is nn.Linear for m in self.modules)
        biases = {m.bias is not None for m in self.modules} if plain else set()
        if plain and len(biases) == 1:  # mixed biases: left as they are
            self.weight = _concat_into([m.weight for m in self.modules])
            if biases == {True}:
                self.bias = _concat_into([m.bias for m in self.modules])

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.weight is None:
            return [m(x) for m in self.modules]
        # the decode kernel (runtime/native.py) where it beats torch: float32 weights for any few
        # tokens, 16-bit ones for one token a call (for several, torch's bf16 GEMM is the faster)
        one_token = x.numel() == x.shape[-1]
        y = dense_linear(x, self.weight) if self.weight.dtype == torch.float32 or one_token else None
        if y is None:
            y = F.linear(x, self.weight, self.bias)
        elif self.bias is not None:
            y += self.bias
        return list(y.split(self.sizes, dim=-1))


def _concat_into(params: list[nn.Parameter]) -> torch.Tensor:
    """One tensor holding `params` end to end, each parameter's data becoming a view of it (a
    single contiguous parameter is its own)."""
    if len(params) == 1 and params[0].is_contiguous():
        return params[0].data
    whole = torch.cat([p.data for p in params])
    at = 0
    for p in params:
        p.data = whole[at : at + p.shape[0]]
        at += p.shape[0]
    return whole


@dataclass
class Layer:
    """One decoder layer's weights and shapes as the fused step reads them."""

    index: int
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    window: int | None
    rope_type: str
    input_norm: Norm
    qkv: Projections
    q_norm: Norm | None
    k_norm: Norm | None
    o_proj: Projections
    post_attention_norm: Norm | None  # Gemma-3's sandwich norm after attention
    mlp_norm: Norm  # post_attention_layernorm (Llama) or pre_feedforward_layernorm (Gemma-3)
    gate_up: Projections
    down_proj: Projections
    post_mlp_norm: Norm | None  # Gemma-3's post_feedforward_layernorm
    act_name: str

    @property
    def act(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return ACTIVATIONS[self.act_name]

    @classmethod
    def of(cls, index: int, block: nn.Module, parts: DecoderParts) -> Layer:
        attn, mlp = block.self_attn, block.mlp
        config = attn.config
        gemma = hasattr(block, "pre_feedforward_layernorm")
        act_name = getattr(config, "hidden_activation", None) or config.hidden_act
        if act_name not in ACTIVATIONS:
            raise KeyError(act_name)  # not a family this forward knows: the HF layers decode it
        return cls(
            index=index,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=attn.head_dim,
            scaling=attn.scaling,
            window=getattr(attn, "sliding_window", None) if parts.is_sliding(index) else None,
            rope_type=parts.layer_types[index],
            input_norm=Norm(block.input_layernorm),
            qkv=Projections(attn, ["q_proj", "k_proj", "v_proj"]),
            q_norm=Norm(attn.q_norm) if hasattr(attn, "q_norm") else None,
            k_norm=Norm(attn.k_norm) if hasattr(attn, "k_norm") else None,
            o_proj=Projections(attn, ["o_proj"]),
            post_attention_norm=Norm(block.post_attention_layernorm) if gemma else None,
            mlp_norm=Norm(block.pre_feedforward_layernorm if gemma else block.post_attention_layernorm),
            gate_up=Projections(mlp, ["gate_proj", "up_proj"]),
            down_proj=Projections(mlp, ["down_proj"]),
            post_mlp_norm=Norm(block.post_feedforward_layernorm) if gemma else None,
            act_name=act_name,
        )

    def __call__(self, engine, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """hidden (B, 1, width) -> the layer's output (B, 1, width); the token's K/V go to the cache."""
        b, d = hidden.shape[0], self.head_dim
        q, k, v = self.qkv(self.input_norm(hidden))
        q, k, v = q.view(b, 1, self.heads, d), k.view(b, 1, self.kv_heads, d), v.view(b, 1, self.kv_heads, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        out = engine.attend(self.index, q, k, v, self.scaling, self.window)
        (out,) = self.o_proj(out.transpose(1, 2).reshape(b, 1, self.heads * d))
        if self.post_attention_norm is not None:
            out = self.post_attention_norm(out)
        hidden = hidden + out
        gate, up = self.gate_up(self.mlp_norm(hidden))
        (out,) = self.down_proj(self.act(gate) * up)
        if self.post_mlp_norm is not None:
            out = self.post_mlp_norm(out)
        return hidden + out


def _fingerprint(model: nn.Module) -> list[tuple]:
    """Where and in what dtype each of the model's tensors is now."""
    return [(t.data_ptr(), t.dtype) for t in (*model.parameters(), *model.buffers())]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RopeTable:
    """cos/sin of every position up to a length, per layer type, made by the model's own rotary
    module (so each entry equals what it computes for that position alone) and doubled on demand."""

    def __init__(self, parts: DecoderParts) -> None:
        self.parts = parts
        self.tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0

    def cover(self, length: int, like: torch.Tensor) -> None:
        """Make the tables hold positions [0, length) at least (outside a decode step: it allocates)."""
        if length <= self.length:
            return
        self.length = max(length, 2 * self.length, 256)
        positions = torch.arange(self.length, device=like.device)[None]
        self.tables = {t: (cos[0], sin[0]) for t, (cos, sin) in self.parts.rope(like, positions).items()}

    def at(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin (B, 1, 1, D) per layer type at positions (B, 1), shaped for (B, H, 1, D) heads."""
        return {t: (cos[positions][:, None], sin[positions][:, None]) for t, (cos, sin) in self.tables.items()}


class FusedDecoder:
    """The fused decode forward of one model (`FusedDecoder.of(model)`), or None where a layer is
    not of a family it knows (the engine then decodes through the HF layers)."""

    def __init__(self, model: nn.Module, parts: DecoderParts) -> None:
        self.model = weakref.ref(model)
        self.layers = [Layer.of(i, block, parts) for i, block in enumerate(parts.layers)]
        self.norm = Norm(parts.norm)
        self.head = Projections(model, ["lm_head"])  # a packed model's 16-bit head is called as it is
        self.rope = RopeTable(parts)
        self.native = NativeStep.of(self)  # the same step in C, where it applies
        self.fingerprint = _fingerprint(model)  # after both made theirs (they concatenate weights)

    _MADE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, model: nn.Module, parts: DecoderParts) -> FusedDecoder | None:
        made = cls._MADE.get(model)
        if made is not None and made.current():
            return made
        try:
            made = cls(model, parts)
        except (AttributeError, KeyError) as exc:  # a layer of another shape: the HF layers decode it
            warnings.warn(  # once per message and place (Python's default filter)
                f"{type(model).__name__} decodes through its Hugging Face layers, about 3x slower than squeezegen's "
                f"fused step, which does not take its layers ({type(exc).__name__}: {exc})",
                stacklevel=2,
            )
            return None
        cls._MADE[model] = made
        return made

    def current(self) -> bool:
        """Whether the model still holds the tensors this forward reads: not cast, moved, reloaded
        or replaced (by sg.binarize_, sg.quantize_) since it was made."""
        return _fingerprint(self.model()) == self.fingerprint

    def step(self, engine, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step: tokens (B,) at positions (B,) -> next-token logits (B, V): in C where
        it applies and the engine wants it (`engine.native`), else as torch operations."""
        parts = engine.parts  # the model's modules now (a packed model's embedding is its own)
        logits = self.native(engine, tokens, positions) if self.native is not None and engine.native else None
        if logits is None:
            hidden = parts.embed(tokens[:, None])
            rope = self.rope.at(positions[:, None])
            for layer in self.layers:
                cos, sin = rope[layer.rope_type]
                hidden = layer(engine, hidden, cos, sin)
            (logits,) = self.head(self.norm(hidden[:, -1]))
        softcap = parts.logit_softcap
        return torch.tanh(logits.float() / softcap) * softcap if softcap else logits.float()


def decode_path(model: nn.Module) -> str:
    """Where the engine runs this model's decode steps: "C step" (every layer of a step in one C
    call), "fused torch step" (squeezegen's fused layers in torch) or "Hugging Face layers" (the
    model's own, about 3x slower); the warnings the engine gives once are not repeated here."""
    from squeezegen.runtime.decoder import DecoderParts

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = FusedDecoder.of(model, DecoderParts.of(model))
    if fused is None:
        return "Hugging Face layers"
    return "C step" if fused.native is not None else "fused torch step"
