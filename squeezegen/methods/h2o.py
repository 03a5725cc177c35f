"""H2O: heavy hitters, the keys that received the most attention from all queries so far, plus
the most recent tokens; the scores keep accumulating while decoding evicts the lightest entry."""

from dataclasses import dataclass, field

import torch

from squeezegen.methods.scoring import column_sums, reduce_gqa
from squeezegen.methods.selection import EvictingSelection, EvictionState, decode_probs, protected


@dataclass
class H2OState(EvictionState):
    """Also: each compressed layer's accumulated attention per cache slot (B, Hkv, slots)."""

    held: dict[int, torch.Tensor] = field(default_factory=dict)
    recent: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, 1) newest entries protected


@dataclass
class H2O(EvictingSelection):
    """As in the original, half of the budget holds the most recent tokens and half the heavy
    hitters; `window` sets the recent part to a fixed count instead."""

    window: int | None = None
    kernel: int = 1

    def new_state(self) -> H2OState:
        return H2OState()

    def recent(self, budget):
        return budget // 2 if self.window is None else min(self.window, budget)

    def score(self, view, query, key):
        return column_sums(query, key, view.positions, view.key_pos, view.scaling)

    def track(self, view, query, key, keep):
        super().track(view, query, key, keep)
        scores = self.kv_scores(view, query, key)  # carry the accumulated scores of the kept entries
        if keep is not None:
            scores = scores.gather(2, keep.clamp(min=0).expand(*scores.shape[:2], -1)).masked_fill(keep < 0, 0.0)
        view.state.held[view.index] = scores

    def start_decode(self, engine):
        super().start_decode(engine)
        state = engine.state_of(self)
        for layer, held in state.held.items():  # slots keep their places: pad to the decode buffer
            state.held[layer] = torch.nn.functional.pad(held, (0, engine.cache.layers[layer].used - held.shape[-1]))
            recent = [self.recent(b) for b in state.budgets[layer]]
            state.recent[layer] = torch.tensor(recent, device=held.device)[:, None]

    def after_decode_attention(self, view, query):
        held = view.state.held.get(view.index)
        if held is None:  # sliding-window layer, or a prefill without compression
            return
        cache = view.cache
        width = cache.pos.shape[-1]
        if held.shape[-1] < width:  # rows in a shared batch: its buffers are as wide as its widest row
            held = view.state.held[view.index] = torch.nn.functional.pad(held, (0, width - held.shape[-1]))
        held += reduce_gqa(decode_probs(view, query), cache.keys.shape[1], self.gqa)  # empty slots add 0
        slot = protected(held, cache.pos, view.positions, view.state.recent[view.index]).argmin(dim=-1)
        evict = cache.live() > view.state.caps[view.index]
        cache.evict(slot, evict)
        # the freed slot's score starts again from 0 for the token that will take it
        kept = held.gather(2, slot[..., None])
        held.scatter_(2, slot[..., None], torch.where(evict[..., None], torch.zeros_like(kept), kept))
