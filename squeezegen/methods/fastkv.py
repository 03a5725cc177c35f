"""FastKV: Token-Selective Propagation (TSP) at a middle layer, decoupled from per-layer KV selection.

Layers up to `tsp_layer` prefill the whole prompt; after it only the tokens its last `window`
queries attend to most go on, at their original positions, so the later layers prefill a
`tsp_rate` share of the prompt. Separately every layer keeps its own `budget` of KV entries,
scored the same way, so the cache left for decoding does not depend on how much was propagated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from squeezegen.errors import SqueezegenError
from squeezegen.methods.selection import middle_layer
from squeezegen.methods.snapkv import SnapKV
from squeezegen.runtime.scoring import resolve_budget, topk_chunks_keep_window, topk_keep_window

TSP_DEPTH = 15 / 32  # the reference's layer 15 of 32 (also its 17/36 and 19/40)


@dataclass
class FastKV(SnapKV):
    """Defaults of the reference: window 8, max pooling with kernel 7, GQA heads summed,
    propagate 20% of the prompt, keep 10% of it in every layer's cache.

    budget / retain_rate: KV entries kept per layer as a fraction of the prompt ("proportional"
    mode; layers after the TSP layer keep the same count, out of their propagated tokens);
    max_capacity: the same as a token count ("constant" mode). tsp_rate / tsp_len: tokens
    propagated, as a fraction or a count; never fewer than the cache keeps. chunk > 0 keeps and
    propagates whole chunks of that many tokens (ChunkKV-style), an option of ours.
    """

    budget: int | float = 0.1
    window: int = 8
    kernel: int = 7
    pooling: str = "max"
    gqa: str = "sum"
    tsp_layer: int | None = None
    tsp_rate: float = 0.2
    tsp_len: int | None = None
    retain_rate: float | None = None
    max_capacity: int | None = None

    def __post_init__(self) -> None:
        if self.retain_rate is not None and self.max_capacity is not None:
            raise SqueezegenError("give retain_rate (proportional mode) or max_capacity (constant mode), not both")
        if self.retain_rate is not None:
            self.budget = float(self.retain_rate)
        if self.max_capacity is not None:
            self.budget = int(self.max_capacity)
        if not 0 < self.tsp_rate <= 1:
            raise SqueezegenError(f"tsp_rate must be in (0, 1], got {self.tsp_rate}")
        if self.tsp_len is not None and self.tsp_len < 1:
            raise SqueezegenError(f"tsp_len must be at least 1 token, got {self.tsp_len}")
        super().__post_init__()

    def tsp_at(self, engine) -> int:
        return middle_layer(engine, self.tsp_layer, TSP_DEPTH)

    def propagated(self, prompt: int) -> int:
        """How many of a `prompt`-token chunk go on past the TSP layer."""
        count = self.tsp_len if self.tsp_len is not None else int(prompt * self.tsp_rate)
        return min(prompt, max(count, resolve_budget(self.budget, prompt), self.window))

    def layer_budget(self, engine, layer, context):
        if layer > self.tsp_at(engine):  # the budget counts the prompt, not the propagated tokens
            return min(context, resolve_budget(self.budget, engine.state["prompt"]))
        return resolve_budget(self.budget, context)

    def select_cache(self, engine, layer, query, key, value):
        n = key.shape[2]
        tsp = self.tsp_at(engine)
        if layer <= tsp:
            engine.state["prompt"] = n
        if layer == tsp and self.propagated(query.shape[2]) < query.shape[2]:
            engine.state["tsp_scores"] = self.kv_scores(engine, layer, query, key)
        return super().select_cache(engine, layer, query, key, value)

    def propagate(self, engine, layer, hidden):
        scores = engine.state.pop("tsp_scores", None) if layer == self.tsp_at(engine) else None
        if scores is None:
            return None
        n = hidden.shape[1]
        return tsp_index(scores[..., -n:], self.propagated(n), self.window, self.chunk)


def tsp_index(scores: torch.Tensor, count: int, window: int, chunk: int = 0) -> torch.Tensor:
    """Tokens (B, count) that go on, ascending: the last `window` and the best of the rest by
    their scores (B, Hkv, n) summed over KV heads (by whole chunks of `chunk` tokens if > 0)."""
    total, window = scores.sum(dim=1, keepdim=True), min(window, count)
    if chunk:
        return topk_chunks_keep_window(total, count, window, chunk)[:, 0]
    return topk_keep_window(total, count, window)[:, 0]
