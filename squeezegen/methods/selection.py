"""What the score-and-keep methods share: budgets, pooling, GQA reduction, top-k with a kept
window, chunked selection, and decode-time eviction to a fixed budget.

A method subclasses `ScoredSelection` and writes one `score` function (kvpress style). Layers
with a sliding window are left alone: they already hold a bounded window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from squeezegen.errors import SqueezegenError
from squeezegen.methods.base import Method
from squeezegen.runtime.scoring import (
    attention_probs,
    check_budget,
    pool1d,
    reduce_gqa,
    resolve_budget,
    topk_chunks_keep_window,
    topk_keep_window,
)

if TYPE_CHECKING:
    from squeezegen.runtime.engine import Engine


@dataclass
class ScoredSelection(Method):
    """Keep, per KV head, the last `window` entries and the `budget` best-scored ones in all.

    budget: a token count (int) or a fraction of the context (float <= 1), counted at prefill;
    methods that evict while decoding take a token count above the prompt's length as a cap.
    kernel/pooling: smoothing of the scores along the sequence; gqa: how the query heads of a KV
    group are combined ("mean", "sum", "max"); chunk > 0 keeps whole chunks of that many tokens.
    """

    budget: int | float = 0.25
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"
    gqa: str = "mean"
    chunk: int = 0

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if (self.window is not None and self.window < 0) or self.chunk < 0:
            raise SqueezegenError("window and chunk must be >= 0")
        if self.kernel < 1 or (self.kernel > 1 and self.kernel % 2 == 0):
            raise SqueezegenError(f"pooling kernel must be 1 (off) or odd, got {self.kernel}")
        if self.pooling not in ("avg", "max"):
            raise SqueezegenError(f"pooling must be 'avg' or 'max', got {self.pooling!r}")
        if self.gqa not in ("mean", "sum", "max"):
            raise SqueezegenError(f"gqa must be 'mean', 'sum' or 'max', got {self.gqa!r}")

    # --- what a method defines --------------------------------------------------------------------
    def score(self, engine: Engine, layer: int, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Importance of every cached entry: (B, H, n) per query head, (B, Hkv, n) or (B, 1, n)."""
        raise NotImplementedError

    def layer_budget(self, engine: Engine, layer: int, context: int) -> int:
        if isinstance(self.budget, int) and self.budget >= context and self.compresses_while_decoding():
            return self.budget  # the prompt fits: decoding fills the cache up to the budget
        return resolve_budget(self.budget, context)

    def recent(self, budget: int) -> int:
        """How many of the newest entries are kept whatever their score."""
        return min(self.window, budget)

    # --- shared ------------------------------------------------------------------------------------
    def kv_scores(self, engine: Engine, layer: int, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """`score`, pooled along the sequence and reduced to one row per KV head (or one shared).

        Left padding scores -inf. Scores do not depend on the budget or chunking: configurations
        that differ only there (an evaluation sweeping budgets over one prefill) compute them once
        per layer.
        """
        memo_key = (type(self), self.window, self.kernel, self.pooling, self.gqa, *self.score_params())
        memo = engine.layer_memo(layer)
        if memo_key not in memo:
            scores = pool1d(self.score(engine, layer, query, key), self.kernel, self.pooling)
            if scores.shape[1] not in (1, key.shape[1]):
                scores = reduce_gqa(scores, key.shape[1], self.gqa)
            padding = engine.cache.layers[layer].view()[2] < 0  # never spend the budget on padding
            memo[memo_key] = torch.where(padding, float("-inf"), scores) if padding.any() else scores
        return memo[memo_key]

    def score_params(self) -> tuple:
        """Parameters besides the shared ones that change `score` (none for most methods)."""
        return ()

    def choose(self, engine: Engine, layer: int, scores: torch.Tensor) -> torch.Tensor | None:
        """Indices to keep given scores over the n cached entries; None when the budget holds all."""
        n = scores.shape[-1]
        budget = self.layer_budget(engine, layer, n)
        engine.state.setdefault("budget", {})[layer] = budget
        if budget >= n:
            return None
        window = self.recent(budget)
        if self.chunk:
            return topk_chunks_keep_window(scores, budget, window, self.chunk)
        return topk_keep_window(scores, budget, window)

    def select_cache(self, engine, layer, query, key, value):
        if engine.parts.is_sliding(layer):
            return None
        budget = self.layer_budget(engine, layer, key.shape[2])
        if budget >= key.shape[2]:
            engine.state.setdefault("budget", {})[layer] = budget
            return None
        return self.choose(engine, layer, self.kv_scores(engine, layer, query, key))


def query_key_positions(engine: Engine, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the queries being run and of the layer's cached keys."""
    return engine.positions, engine.cache.layers[layer].view()[2]


def decode_attention(engine: Engine, layer: int, query: torch.Tensor) -> torch.Tensor:
    """The new token's attention (B, H, n) over the layer's whole cache, fp32."""
    cache = engine.cache.layers[layer]
    keys, _, k_pos = cache.view()
    if cache.padded or cache.window is not None:
        return attention_probs(query, keys, engine.positions, k_pos, engine.parts.scaling(layer))[:, :, 0]
    # every cached entry is visible to the newest token: no mask needed
    b, h, _, d = query.shape
    grouped = query.float().reshape(b, keys.shape[1], h // keys.shape[1], d)
    scores = grouped @ keys.float().transpose(-1, -2) * engine.parts.scaling(layer)
    return scores.softmax(dim=-1).reshape(b, h, -1)


def over_budget(engine: Engine, layer: int) -> bool:
    """Has decoding grown this layer past its cap? The cap is the prefill budget, or the length
    the layer had when decoding began if a question was appended uncompressed after the context."""
    budget = engine.state.get("budget", {}).get(layer)
    if budget is None:
        return False
    length = engine.cache.layers[layer].length
    cap = engine.state.setdefault("decode_cap", {}).setdefault(layer, max(budget, length - 1))
    return length > cap


def protect_recent(scores: torch.Tensor, key_pos: torch.Tensor, current: torch.Tensor, recent: int) -> torch.Tensor:
    """Scores with the entries of the last `recent` positions (and padding) made unevictable."""
    newest = current[:, None, None] - key_pos < recent
    return scores.masked_fill(newest | (key_pos < 0), float("inf"))


def middle_layer(engine: Engine, layer: int | None, fraction: float) -> int:
    """`layer` if given (checked), else the global-attention layer nearest `fraction` of the depth:
    a sliding-window layer's scores cannot see far back, so a whole-prompt decision avoids them."""
    count = len(engine.parts.layers)
    if layer is not None:
        if not 0 <= layer < count:
            raise SqueezegenError(f"layer {layer} is out of range for a {count}-layer model (0..{count - 1})")
        return layer
    target = round(fraction * count)
    candidates = [i for i in range(count) if not engine.parts.is_sliding(i)] or list(range(count))
    return min(candidates, key=lambda i: (abs(i - target), i))
