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
from squeezegen.methods.scoring import check_budget, keep_top, pool1d, resolve_budget
from squeezegen.methods.selection import middle_layer
from squeezegen.runtime.hooks import Method

FILTER_DEPTH = 13 / 32  # the paper's layer 13 of Llama-3.1-8B's 32


@dataclass
class GemFilterState:
    refill: torch.Tensor | None = None  # the filter layer's choice, until the pass stops


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

    def new_state(self) -> GemFilterState:
        return GemFilterState()

    def filter_at(self, view) -> int:
        return middle_layer(view, self.layer, FILTER_DEPTH)

    def select_cache(self, view, query, key, value):
        if view.index == self.filter_at(view):
            counts = [resolve_budget(self.budget, n) for n in view.row_tokens]
            view.state.refill = filter_index(query, key, view.key_pos, counts, self.kernel)
        return None

    def refill(self, view):
        keep, view.state.refill = view.state.refill, None
        return keep


def filter_index(
    query: torch.Tensor, key: torch.Tensor, key_pos: torch.Tensor, counts: list[int], kernel: int
) -> torch.Tensor:
    """Tokens (B, K) each row keeps, ascending, -1 first for a row keeping fewer than K: its
    `counts[row]` best, scored by the last query's raw dot product summed over heads, pooled."""
    b, h, _, d = query.shape
    h_kv = key.shape[1]
    last = query[:, :, -1].float().reshape(b, h_kv, h // h_kv, d)
    real = key_pos[:, :1] >= 0  # (B, 1, n)
    scores = (last @ key.float().transpose(-1, -2)).sum(dim=(1, 2))[:, None]  # (B, 1, n)
    scores = pool1d(scores.masked_fill(~real, 0.0), kernel, "avg")
    return keep_top(scores, real, counts, [0] * b)[:, 0].sort(dim=-1).values
