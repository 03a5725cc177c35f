"""H2O: heavy hitters, the keys that received the most attention from all queries so far, plus
the most recent tokens; the scores keep accumulating while decoding evicts the lightest entry."""

from dataclasses import dataclass

import torch

from squeezegen.methods.selection import (
    ScoredSelection,
    decode_attention,
    over_budget,
    protect_recent,
    query_key_positions,
)
from squeezegen.runtime.scoring import column_sums, reduce_gqa


@dataclass
class H2O(ScoredSelection):
    """As in the original, half of the budget holds the most recent tokens and half the heavy
    hitters; `window` sets the recent part to a fixed count instead."""

    window: int | None = None
    kernel: int = 1

    def recent(self, budget):
        return budget // 2 if self.window is None else min(self.window, budget)

    def score(self, engine, layer, query, key):
        q_pos, k_pos = query_key_positions(engine, layer)
        return column_sums(query, key, q_pos, k_pos, engine.parts.scaling(layer))

    def select_cache(self, engine, layer, query, key, value):
        if engine.parts.is_sliding(layer):
            return None
        scores = self.kv_scores(engine, layer, query, key)
        keep = self.choose(engine, layer, scores)
        if keep is not None:  # carry the accumulated scores of the kept entries into decoding
            scores = scores.gather(2, keep.expand(*scores.shape[:2], -1))
        engine.state.setdefault("h2o", {})[layer] = scores
        return keep

    def on_decode_attention(self, engine, layer, query):
        held = engine.state.get("h2o", {}).get(layer)
        if held is None:  # sliding-window layer, or prefill without compression
            return
        cache = engine.cache.layers[layer]
        new = reduce_gqa(decode_attention(engine, layer, query), cache.keys.shape[1], self.gqa)
        held = torch.cat([held, new.new_zeros(*new.shape[:2], new.shape[2] - held.shape[2])], dim=-1)
        held = held.expand_as(new) + new
        if over_budget(engine, layer):
            recent = self.recent(engine.state["budget"][layer])
            slot = protect_recent(held, cache.view()[2], engine.positions[:, -1], recent).argmin(dim=-1)
            cache.evict(slot)
            # mirror the cache: the newest entry's score moves into the freed slot
            held = held.scatter(2, slot[..., None], held[..., -1:])[..., :-1]
        engine.state["h2o"][layer] = held
