"""SnapKV: the last `window` prompt queries vote for the keys worth keeping (prefill only)."""

from dataclasses import dataclass

from squeezegen.methods.selection import ScoredSelection, query_key_positions
from squeezegen.runtime.scoring import window_scores


@dataclass
class SnapKV(ScoredSelection):
    """Defaults of the original paper: window 32, average pooling with kernel 5."""

    def score(self, engine, layer, query, key):
        q_pos, k_pos = query_key_positions(engine, layer)
        return window_scores(query, key, q_pos, k_pos, max(self.window, 1), engine.parts.scaling(layer))
