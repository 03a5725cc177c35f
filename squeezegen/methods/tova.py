"""TOVA: the current (last) query's attention, averaged over heads, decides what to keep; one
entry is evicted per decode step once the cache is full."""

from dataclasses import dataclass

from squeezegen.methods.selection import ScoredSelection, decode_attention, over_budget, protect_recent
from squeezegen.runtime.scoring import window_scores


@dataclass
class TOVA(ScoredSelection):
    """The same entries for every head (mean over all query heads), no pooling, no kept window
    beyond the newest token."""

    window: int = 1
    kernel: int = 1

    def score(self, engine, layer, query, key):
        q_pos = engine.positions
        k_pos = engine.cache.layers[layer].view()[2]
        return window_scores(query, key, q_pos, k_pos, 1, engine.parts.scaling(layer)).mean(1, keepdim=True)

    def on_decode_attention(self, engine, layer, query):
        if not over_budget(engine, layer):
            return
        cache = engine.cache.layers[layer]
        scores = decode_attention(engine, layer, query).mean(1, keepdim=True)
        scores = protect_recent(scores, cache.view()[2][:, :1], engine.positions[:, -1], 1)
        cache.evict(scores.argmin(dim=-1))
