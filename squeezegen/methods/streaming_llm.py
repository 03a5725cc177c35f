"""StreamingLLM: attention sinks (the first tokens) plus the most recent ones; rolls while decoding."""

from dataclasses import dataclass

import torch

from squeezegen.methods.selection import EvictingSelection, protected


@dataclass
class StreamingLLM(EvictingSelection):
    """Keep `sinks` first tokens and the newest budget - sinks; the cache stays at the budget
    during decoding by evicting the oldest non-sink entry."""

    sinks: int = 4
    window: int = 0
    kernel: int = 1

    def score(self, view, query, key):
        pos = view.key_pos.float()
        return torch.where(pos < self.sinks, float("inf"), pos)  # newest score highest

    def victim(self, view, query):
        pos = view.cache.pos
        oldest = protected(pos.float(), pos, view.positions, 1).masked_fill(pos < self.sinks, float("inf"))
        return oldest.argmin(dim=-1)
