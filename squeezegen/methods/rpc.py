"""RPC (Reasoning Path Compression): every P generated tokens, keep the part of the generated path
that the last R queries attend to most.

The prompt and the newest R tokens stay whole. After the m-th compression the generated part holds
m·P/c selected entries plus the recent ones; earlier survivors are scored again each time, and
positions keep counting every token seen, so RoPE and masks stay true. Compression marks the
dropped entries' slots empty in the fixed decode buffer; later tokens take them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from squeezegen.errors import SqueezegenError
from squeezegen.methods.scoring import pool1d, window_scores
from squeezegen.runtime.hooks import Method


@dataclass
class RPCState:
    prompt_end: torch.Tensor | None = None  # (B,) first position of each row's generated path
    step: torch.Tensor | None = None  # (1,) decode steps so far, on the device (the ring's cursor)
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # per global layer (B, H, R, D)


@dataclass
class RPC(Method):
    """P: compress every P generated tokens (first after P + R); R: selector window and the newest
    entries kept whole; c: the generated path keeps 1/c of itself; aggregation: "all" heads share
    one selection, "group" selects per KV head; kernel: average pooling of the scores."""

    P: int = 1024
    R: int = 32
    c: int = 4
    aggregation: str = "all"
    kernel: int = 7

    def __post_init__(self) -> None:
        if min(self.P, self.R, self.c) < 1:
            raise SqueezegenError(f"P, R and c must be >= 1, got P={self.P}, R={self.R}, c={self.c}")
        if self.P % self.c:
            raise SqueezegenError(f"P ({self.P}) must be a multiple of c ({self.c})")
        if self.aggregation not in ("all", "group"):
            raise SqueezegenError(f"aggregation must be 'all' or 'group', got {self.aggregation!r}")
        if self.kernel < 1 or (self.kernel > 1 and self.kernel % 2 == 0):
            raise SqueezegenError(f"pooling kernel must be 1 (off) or odd, got {self.kernel}")

    def new_state(self) -> RPCState:
        return RPCState()

    def decode_capacity(self, view, live, new_tokens):
        return live + self.peak_generated(new_tokens)

    def start_decode(self, engine):
        state = engine.state_of(self)
        state.prompt_end = engine.next_pos.clone()  # positions from here on are the generated path
        state.step = torch.zeros(1, dtype=torch.long, device=engine.next_pos.device)
        b = engine.next_pos.shape[0]
        for layer, cache in enumerate(engine.cache.layers):
            if engine.parts.is_sliding(layer):
                continue
            attn = engine.parts.layers[layer].self_attn
            heads = attn.config.num_attention_heads
            state.queries[layer] = cache.keys.new_zeros(b, heads, self.R, cache.keys.shape[-1])

    def after_decode_attention(self, view, query):
        ring = view.state.queries.get(view.index)
        if ring is not None:  # a ring of the last R queries: their order does not matter to the summed scores
            ring.index_copy_(2, view.state.step % self.R, query)

    def after_decode_step(self, engine, step):
        state = engine.state_of(self)
        state.step += 1
        generated = step + 1  # tokens the decode steps have added to the cache
        if generated < self.P + self.R or (generated - self.R) % self.P:
            return
        kept = (generated - self.R) // self.P * (self.P // self.c)
        newest = engine.next_pos[:, None] - self.R + torch.arange(self.R, device=engine.next_pos.device)
        for layer, queries in state.queries.items():
            cache = engine.cache.layers[layer]
            pos = cache.pos
            # the generated path before the newest R tokens; rows decode in lockstep, so every row
            # (and head) holds the same number of such entries
            span = (pos >= state.prompt_end[:, None, None]) & (pos < newest[:, :1, None])
            count = int(span[:, :1].sum(-1).max())
            # every span key precedes every selector query, so the softmax runs over the span alone
            span_pos = pos.masked_fill(~span, -1)
            scores = window_scores(queries, cache.keys, newest, span_pos, self.R, engine.parts.scaling(layer))
            cache.evict_where(span & ~self.chosen(scores, pos, span, count, kept))

    def generated_held(self, generated: int) -> int:
        """Generated entries a global layer holds after `generated` decode steps (compressed)."""
        if generated < self.P + self.R:
            return generated
        m = (generated - self.R) // self.P
        return m * (self.P // self.c) + generated - m * self.P

    def peak_generated(self, generated: int) -> int:
        """The most generated entries held at once within `generated` decode steps: a step's
        token joins the cache before that step's compression runs."""
        return max((self.generated_held(n - 1) + 1 for n in range(1, generated + 1)), default=0)

    def chosen(
        self, scores: torch.Tensor, pos: torch.Tensor, span: torch.Tensor, count: int, kept: int
    ) -> torch.Tensor:
        """Slots (B, Hkv, C) of the `kept` best span entries per row (and KV head with "group"),
        from scores (B, H, C): heads averaged, then pooled along the path in position order."""
        b, h, n = scores.shape
        kv_heads = pos.shape[1]
        if self.aggregation == "all":
            scores = scores.mean(dim=1, keepdim=True)
        else:
            scores = scores.view(b, kv_heads, h // kv_heads, n).mean(dim=2)
        span, at = span[:, : scores.shape[1]], pos[:, : scores.shape[1]]
        order = torch.where(span, at, at.max() + 1 + torch.arange(n, device=pos.device)).sort(dim=-1).indices
        order = order[..., :count]  # the span's slots by position
        pooled = pool1d(scores.gather(-1, order), self.kernel, "avg")
        top = pooled.sort(dim=-1, descending=True, stable=True).indices[..., :kept]  # all of it when c = 1
        chosen = torch.zeros_like(span).scatter_(-1, order.gather(-1, top), True)
        return chosen.expand_as(pos)
