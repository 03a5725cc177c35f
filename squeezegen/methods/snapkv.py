"""SnapKV: the last `window` prompt queries vote for the keys worth keeping (prefill only)."""

from dataclasses import dataclass

from squeezegen.methods.scoring import window_scores
from squeezegen.methods.selection import ScoredSelection


@dataclass
class SnapKV(ScoredSelection):
    """Defaults of the original paper: window 32, average pooling with kernel 5."""

    def score(self, view, query, key):
        return window_scores(query, key, view.positions, view.key_pos, max(self.window, 1), view.scaling)
