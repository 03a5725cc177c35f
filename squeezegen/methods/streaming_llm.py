"""StreamingLLM: attention sinks (the first tokens) plus the most recent ones; rolls while decoding."""

from dataclasses import dataclass

import torch

from squeezegen.methods.selection import ScoredSelection, over_budget, protect_recent


@dataclass
class StreamingLLM(ScoredSelection):
    """Keep `sinks` first tokens and the newest budget - sinks; the cache stays at the budget
    during decoding by evicting the oldest non-sink entry."""

    sinks: int = 4
    window: int = 0
    kernel: int = 1

    def score_params(self):
        return (self.sinks,)

    def score(self, engine, layer, query, key):
        pos = engine.cache.layers[layer].view()[2].float()
        return torch.where(pos < self.sinks, float("inf"), pos)  # newest score highest

    def on_decode_attention(self, engine, layer, query):
        if not over_budget(engine, layer):
            return
        cache = engine.cache.layers[layer]
        pos = cache.view()[2]
        scores = protect_recent(pos.float(), pos, engine.positions[:, -1], 1)
        scores = scores.masked_fill(pos < self.sinks, float("inf"))
        cache.evict(scores.argmin(dim=-1))
