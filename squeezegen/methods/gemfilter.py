"""GemFilter: an early layer picks the prompt tokens that matter, then only those are prefilled.

The prefill runs up to the filter layer; there the last token's query scores every key by its
raw dot product summed over heads (no softmax), smoothed by average pooling. The `budget` best
tokens, in their original order, become a new, shorter prompt that is prefilled through the
whole model from position 0; the cache holds only them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from squeezegen.errors import SqueezegenError
from squeezegen.methods.base import Method
from squeezegen.methods.selection import middle_layer
from squeezegen.runtime.scoring import check_budget, pool1d, resolve_budget

FILTER_DEPTH = 13 / 32  # the paper's layer 13 of Llama-3.1-8B's 32


@dataclass
class GemFilter(Method):
    """budget: tokens kept, a fraction of the prompt or a count; layer: the filter layer
    (default the global layer nearest 13/32 of the depth); kernel: average pooling width."""

    budget: int | float = 0.1
    layer: int | None = None
    kernel: int = 5

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if self.kernel < 1 or (self.kernel > 1 and self.kernel % 2 == 0):
            raise SqueezegenError(f"pooling kernel must be 1 (off) or odd, got {self.kernel}")

    def filter_at(self, engine) -> int:
        return middle_layer(engine, self.layer, FILTER_DEPTH)

    def select_cache(self, engine, layer, query, key, value):
        if layer == self.filter_at(engine):
            keep = filter_index(query, key, engine.cache.layers[layer].view()[2], self.budget, self.kernel)
            if keep is not None:
                engine.state["refill"] = keep
        return None

    def refill(self, engine, layer):
        return engine.state.pop("refill", None)


def filter_index(
    query: torch.Tensor, key: torch.Tensor, key_pos: torch.Tensor, budget: int | float, kernel: int
) -> torch.Tensor | None:
    """Tokens (B, k) to keep, ascending, scored by the last query; None when the budget holds all."""
    b, h, _, d = query.shape
    h_kv, n = key.shape[1], key.shape[2]
    count = resolve_budget(budget, n)
    if count >= n:
        return None
    last = query[:, :, -1].float().reshape(b, h_kv, h // h_kv, d)
    scores = (last @ key.float().transpose(-1, -2)).sum(dim=(1, 2))  # (B, n)
    scores = pool1d(scores[:, None], kernel, "avg")[:, 0]
    padding = (key_pos < 0).any(dim=1)
    scores = scores.masked_fill(padding, float("-inf"))
    return scores.topk(count, dim=-1).indices.sort(dim=-1).values
