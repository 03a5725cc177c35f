"""FastKV: Token-Selective Propagation (TSP) at a middle layer, decoupled from per-layer KV selection.

Layers up to `tsp_layer` prefill the whole prompt; after it only the tokens its last `window`
queries attend to most go on, at their original positions, so the later layers prefill a
`tsp_rate` share of the prompt. Separately every layer keeps its own `budget` of KV entries,
scored the same way, so the cache left for decoding does not depend on how much was propagated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from squeezegen.errors import SqueezegenError
from squeezegen.methods.scoring import keep_top, resolve_budget
from squeezegen.methods.selection import SelectionState, middle_layer
from squeezegen.methods.snapkv import SnapKV

TSP_DEPTH = 15 / 32  # the reference's layer 15 of 32 (also its 17/36 and 19/40)
CONSTANT_MODE_TSP_LEN = 2048  # the reference's tokens propagated with max_capacity_prompt


@dataclass
class FastKVState(SelectionState):
    tsp_scores: torch.Tensor | None = None  # the TSP layer's scores, from its selection to its propagation


@dataclass
class FastKV(SnapKV):
    """Defaults of the reference: window 8, max pooling with kernel 7, GQA heads summed,
    propagate 20% of the prompt, keep 10% of it in every layer's cache.

    budget / retain_rate: KV entries kept per layer as a fraction of the prompt ("proportional"
    mode; layers after the TSP layer keep the same count, out of their propagated tokens);
    max_capacity: the same as a token count ("constant" mode, where the reference propagates
    tsp_len = 2048 tokens unless told otherwise). tsp_rate / tsp_len: tokens propagated, as a
    fraction or a count; never fewer than the cache keeps. A prompt within the budget keeps its
    whole cache. chunk > 0 keeps and propagates whole chunks of that many tokens (ChunkKV-style),
    an option of ours.
    """

    budget: int | float = 0.1
    window: int = 8
    kernel: int = 7
    pooling: str = "max"
    gqa: str = "sum"
    tsp_layer: int | None = None
    tsp_rate: float = 0.2
    tsp_len: int | None = None
    retain_rate: float | None = None
    max_capacity: int | None = None

    # what propagates and how much each layer keeps: the same scores choose either way
    CHOICE_FIELDS = SnapKV.CHOICE_FIELDS | {"tsp_layer", "tsp_rate", "tsp_len", "retain_rate", "max_capacity"}

    def __post_init__(self) -> None:
        if self.retain_rate is not None and self.max_capacity is not None:
            raise SqueezegenError("give retain_rate (proportional mode) or max_capacity (constant mode), not both")
        if self.retain_rate is not None:
            self.budget = float(self.retain_rate)
        if self.max_capacity is not None:
            self.budget = int(self.max_capacity)
            if self.tsp_len is None:
                self.tsp_len = CONSTANT_MODE_TSP_LEN
        if not 0 < self.tsp_rate <= 1:
            raise SqueezegenError(f"tsp_rate must be in (0, 1], got {self.tsp_rate}")
        if self.tsp_len is not None and self.tsp_len < 1:
            raise SqueezegenError(f"tsp_len must be at least 1 token, got {self.tsp_len}")
        super().__post_init__()

    def new_state(self) -> FastKVState:
        return FastKVState()

    def tsp_at(self, view) -> int:
        return middle_layer(view, self.tsp_layer, TSP_DEPTH)

    def propagated(self, prompt: int) -> int:
        """How many of a `prompt`-token row go on past the TSP layer."""
        count = self.tsp_len if self.tsp_len is not None else int(prompt * self.tsp_rate)
        return min(prompt, max(count, resolve_budget(self.budget, prompt), self.window, 1))

    def layer_budget(self, view, context, prompt):
        if view.index > self.tsp_at(view):  # the budget counts the prompt, not the propagated tokens
            return min(context, resolve_budget(self.budget, prompt))
        return resolve_budget(self.budget, context)

    def select_cache(self, view, query, key, value):
        if view.index == self.tsp_at(view):
            view.state.tsp_scores = self.kv_scores(view, query, key)
        return super().select_cache(view, query, key, value)

    def propagate(self, view, hidden):
        scores, view.state.tsp_scores = view.state.tsp_scores, None
        if scores is None or view.index != self.tsp_at(view):
            return None
        counts = [self.propagated(n) for n in view.row_tokens]
        return tsp_index(scores, view.positions >= 0, counts, self.window, self.chunk)


def tsp_index(scores: torch.Tensor, real: torch.Tensor, counts: list[int], window: int, chunk: int = 0) -> torch.Tensor:
    """Tokens (B, K) each row passes on, ascending with -1 first for a row passing fewer: its last
    `window` and the best of the rest by their scores (B, Hkv, n) summed over KV heads (by whole
    chunks of `chunk` tokens if > 0); real (B, n) marks the row's tokens."""
    windows = [max(1, min(window, c)) for c in counts]
    index = keep_top(scores.sum(dim=1, keepdim=True), real[:, None], counts, windows, chunk)[:, 0]
    return index.sort(dim=-1).values
