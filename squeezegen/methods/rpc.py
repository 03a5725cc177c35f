"""RPC (Reasoning Path Compression): every P generated tokens, keep the part of the generated path
that the last R queries attend to most.

The prompt and the newest R tokens stay whole. After the m-th compression the generated part holds
m·P/c selected entries plus the recent ones; earlier survivors are scored again each time, and
positions keep counting every token seen, so RoPE and masks stay true.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from squeezegen.errors import SqueezegenError
from squeezegen.methods.base import Method
from squeezegen.runtime.scoring import pool1d, window_scores


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

    def on_decode_attention(self, engine, layer, query):
        if engine.parts.is_sliding(layer):
            return
        if engine.decode_steps == 0:  # where the generated part of this layer's cache begins
            engine.state.setdefault("rpc_start", {})[layer] = engine.cache.layers[layer].length - 1
            engine.state.setdefault("rpc_queries", {})[layer] = query.new_zeros(
                *query.shape[:2], self.R, query.shape[3]
            )
        # a ring of the last R queries: their order does not matter to the summed scores
        engine.state["rpc_queries"][layer][:, :, engine.decode_steps % self.R] = query[:, :, 0]

    def on_decode_step(self, engine, step):
        generated = step + 1  # tokens the decode steps have added to the cache
        if generated < self.P + self.R or (generated - self.R) % self.P:
            return
        kept = (generated - self.R) // self.P * (self.P // self.c)
        newest = engine.next_pos[:, None] - self.R + torch.arange(self.R, device=engine.next_pos.device)
        for layer, cache in enumerate(engine.cache.layers):
            if engine.parts.is_sliding(layer):
                continue
            start, end = engine.state["rpc_start"][layer], cache.length - self.R
            if end - start <= kept:
                continue
            keys, _, pos = cache.view()
            # every span key precedes every selector query, so the softmax runs over the span alone
            queries, scaling = engine.state["rpc_queries"][layer], engine.parts.scaling(layer)
            scores = window_scores(queries, keys[:, :, start:end], newest, pos[:, :, start:end], self.R, scaling)
            # room for the P tokens until the next compression, so the dropped entries' memory goes
            cache.keep(self.index(scores, keys.shape[1], start, end, cache.length, kept), room=self.P)

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

    def index(self, scores: torch.Tensor, kv_heads: int, start: int, end: int, length: int, kept: int) -> torch.Tensor:
        """Entries to keep (B, 1|Hkv, start + kept + R): the prompt, the best `kept` of the span
        scored (B, H, end - start), the newest."""
        b, h, _ = scores.shape
        if self.aggregation == "all":
            scores = scores.mean(dim=1, keepdim=True)
        else:
            scores = scores.view(b, kv_heads, h // kv_heads, -1).mean(dim=2)
        scores = pool1d(scores, self.kernel, "avg")
        top = scores.topk(kept, dim=-1).indices.sort(dim=-1).values + start
        shape = (*top.shape[:2], -1)
        prompt = torch.arange(start, device=top.device).expand(*shape)
        recent = torch.arange(end, length, device=top.device).expand(*shape)
        return torch.cat([prompt, top, recent], dim=-1)
