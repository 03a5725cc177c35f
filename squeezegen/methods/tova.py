"""TOVA: the current (last) query's attention, averaged over heads, decides what to keep; one
entry is evicted per decode step once the cache is full."""

from dataclasses import dataclass

from squeezegen.methods.scoring import window_scores
from squeezegen.methods.selection import EvictingSelection, decode_probs, protected


@dataclass
class TOVA(EvictingSelection):
    """The same entries for every head (mean over all query heads), no pooling, no kept window
    beyond the newest token."""

    window: int = 1
    kernel: int = 1

    def score(self, view, query, key):
        return window_scores(query, key, view.positions, view.key_pos, 1, view.scaling).mean(1, keepdim=True)

    def victim(self, view, query):
        scores = decode_probs(view, query).mean(1, keepdim=True)
        return protected(scores, view.cache.pos[:, :1], view.positions, 1).argmin(dim=-1)
