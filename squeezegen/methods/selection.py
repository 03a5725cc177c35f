"""What the score-and-keep methods share: per-row budgets, pooling, GQA reduction, top-k with a
kept window, chunked selection, and decode-time eviction to a fixed budget.

A method subclasses `ScoredSelection` (or `EvictingSelection`, which also evicts while decoding)
and writes one `score` function (kvpress style). Layers with a sliding window are left alone:
they already hold a bounded window. Every decision is per row, on the row's real entries, so a
row of a padded batch keeps what it would keep alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar

import torch

from squeezegen.errors import SqueezegenError
from squeezegen.methods.scoring import (
    attention_probs,
    check_budget,
    chunk_scores,
    keep_global,
    keep_top,
    pool1d,
    reduce_gqa,
    resolve_budget,
)
from squeezegen.runtime.cache import compact_index
from squeezegen.runtime.hooks import LayerView, Method

if TYPE_CHECKING:
    from squeezegen.runtime.engine import Engine


@dataclass
class SelectionState:
    """Per generation: each compressed layer's budget per row (what decoding may grow back to)."""

    budgets: dict[int, list[int]] = field(default_factory=dict)


@dataclass
class ScoredSelection(Method):
    """Keep, per KV head, the last `window` entries and the `budget` best-scored ones in all.

    budget: a token count (int) or a fraction of the context (float <= 1), counted per row at
    prefill; a prompt within the budget keeps everything. kernel/pooling: smoothing of the scores
    along the sequence; gqa: how the query heads of a KV group are combined ("mean", "sum",
    "max"); chunk > 0 keeps whole chunks of that many tokens; adaptive: the layer's budget goes
    to its KV heads by their pooled scores (AdaKV), each head keeping at least `floor` of its
    even share (uneven heads then get buffers of their own, so the memory saved is real);
    heads: "per-head" (each KV head its own entries) or "shared" (one set of positions per layer,
    a position scored by its best head: the head-uniform eviction a paged cache can free block by
    block).
    """

    SHARED_HEADS: ClassVar[bool] = True  # whether heads="shared" is offered
    # fields that steer the choice made from the scores, never the scores themselves: every other
    # field keys the scores shared by configurations of one prefill (`kv_scores`), so a new field is
    # safe by default (it splits the sharing) until it is named here
    CHOICE_FIELDS: ClassVar[frozenset[str]] = frozenset({"budget", "chunk", "adaptive", "floor", "heads"})

    budget: int | float = 0.25
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"
    gqa: str = "mean"
    chunk: int = 0
    adaptive: bool = False
    floor: float = 0.2
    heads: str = "per-head"

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if self.heads not in ("per-head", "shared"):
            raise SqueezegenError(f"heads must be 'per-head' or 'shared', got {self.heads!r}")
        if self.heads == "shared" and (self.adaptive or not self.SHARED_HEADS):
            raise SqueezegenError(
                "heads='shared' keeps one set of positions for all KV heads: it does not combine with "
                "adaptive=True, nor with methods that evict per head while decoding (h2o, tova, streaming_llm)"
            )
        if not 0 <= self.floor <= 1:
            raise SqueezegenError(f"floor is a share of a head's even budget, in [0, 1]; got {self.floor}")
        if (self.window is not None and self.window < 0) or self.chunk < 0:
            raise SqueezegenError("window and chunk must be >= 0")
        if self.kernel < 1 or (self.kernel > 1 and self.kernel % 2 == 0):
            raise SqueezegenError(f"pooling kernel must be 1 (off) or odd, got {self.kernel}")
        if self.pooling not in ("avg", "max"):
            raise SqueezegenError(f"pooling must be 'avg' or 'max', got {self.pooling!r}")
        if self.gqa not in ("mean", "sum", "max"):
            raise SqueezegenError(f"gqa must be 'mean', 'sum' or 'max', got {self.gqa!r}")

    def new_state(self) -> SelectionState:
        return SelectionState()

    # --- what a method defines --------------------------------------------------------------------
    def score(self, view: LayerView, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Importance of every cached entry: (B, H, n) per query head, (B, Hkv, n) or (B, 1, n)."""
        raise NotImplementedError

    def layer_budget(self, view: LayerView, context: int, prompt: int) -> int:
        """Entries a row keeps in this layer, holding `context` real entries of a `prompt`-token
        prompt (fewer than the prompt after a propagation)."""
        return resolve_budget(self.budget, context)

    def recent(self, budget: int) -> int:
        """How many of the newest entries are kept whatever their score."""
        return min(self.window, budget)

    # --- shared ------------------------------------------------------------------------------------
    def kv_scores(self, view: LayerView, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """`score`, pooled along the sequence and reduced to one row per KV head (or one shared).

        Scores do not depend on the budget or chunking: configurations that differ only there
        (an evaluation sweeping budgets over one prefill) compute them once per layer.
        """
        memo_key = (
            type(self),
            *((f.name, getattr(self, f.name)) for f in fields(self) if f.name not in self.CHOICE_FIELDS),
        )
        if memo_key not in view.memo:
            padding = view.key_pos < 0
            raw = self.score(view, query, key).float()
            # padding scores 0 before pooling: what the pooling's own zero padding gives a row alone
            raw = raw.masked_fill(padding if raw.shape[1] == padding.shape[1] else padding[:, :1], 0.0)
            scores = pool1d(raw, self.kernel, self.pooling)
            if scores.shape[1] not in (1, key.shape[1]):
                scores = reduce_gqa(scores, key.shape[1], self.gqa)
            view.memo[memo_key] = scores
        return view.memo[memo_key]

    def row_budgets(self, view: LayerView) -> list[int]:
        """Each row's budget in this layer, recorded in the state for decoding."""
        budgets = [self.layer_budget(view, n, p) for n, p in zip(view.row_tokens, view.prompt_lengths, strict=True)]
        view.state.budgets[view.index] = budgets
        return budgets

    def choose(self, view: LayerView, scores: torch.Tensor, budgets: list[int]) -> torch.Tensor:
        """Indices each row keeps given scores over the cached entries (every real entry when
        its budget holds them all: the same path runs, so budget 1.0 is the full cache by test)."""
        windows = [self.recent(b) for b in budgets]
        real = view.key_pos >= 0
        if self.heads == "shared" and scores.shape[1] > 1:
            scores = scores.amax(dim=1, keepdim=True)
        if not self.adaptive or scores.shape[1] == 1:
            return keep_top(scores, real, budgets, windows, self.chunk)
        return adaptive_keep(scores, real, budgets, windows, self.floor, self.chunk)

    def select_cache(self, view, query, key, value):
        if view.sliding:
            return None
        return self.choose(view, self.kv_scores(view, query, key), self.row_budgets(view))


def adaptive_keep(
    scores: torch.Tensor, real: torch.Tensor, budgets: list[int], windows: list[int], floor: float, chunk: int = 0
) -> torch.Tensor:
    """AdaKV: indices (B, Hkv, K) of the entries each row keeps when its `budgets[row]` per head
    are pooled over the layer's KV heads: the newest `windows[row]` of every head, at least
    `floor` of the even share per head, the rest to the best scores of any head."""
    b, h, n = scores.shape
    real = real.expand(b, h, n)
    newest_first = real.sum(-1, keepdim=True) - real.long().cumsum(-1)
    recent = real & (newest_first < torch.tensor(windows, device=scores.device)[:, None, None])
    if chunk:
        scores = chunk_scores(scores, real & ~recent, chunk)
    floors = [round(floor * budget) for budget in budgets]
    keep = keep_global(scores, real, recent, [budget * h for budget in budgets], floors)
    return compact_index(keep)


@dataclass
class EvictionState(SelectionState):
    """Also: each layer's cap per row (B, 1) while decoding."""

    caps: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class EvictingSelection(ScoredSelection):
    """A selection whose cache stays at its budget while decoding: once a row holds more than its
    cap, each step evicts the entry `victim` names. The cap is the row's budget, or what it held
    when decoding began if a question was appended uncompressed after the context. A token
    budget above a short prompt lets the cache grow to it while decoding."""

    SHARED_HEADS: ClassVar[bool] = False

    def new_state(self) -> EvictionState:
        return EvictionState()

    def layer_budget(self, view, context, prompt):
        return self.budget if isinstance(self.budget, int) else resolve_budget(self.budget, context)

    def select_cache(self, view, query, key, value):
        keep = super().select_cache(view, query, key, value)
        if not view.sliding:
            self.track(view, query, key, keep)
        return keep

    def track(self, view: LayerView, query: torch.Tensor, key: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Take charge of the entries `keep` (None = all) of this layer for decoding, whoever chose
        them: record each row's budget (and what a subclass accumulates)."""
        if view.index not in view.state.budgets:
            self.row_budgets(view)

    def victim(self, view: LayerView, query: torch.Tensor) -> torch.Tensor:
        """The slot (B, Hkv or 1) each row would evict at this decode step."""
        raise NotImplementedError

    def decode_capacity(self, view, live, new_tokens):
        budgets = view.state.budgets.get(view.index)
        if budgets is None:
            return live + new_tokens
        return min(live + new_tokens, max(max(budgets), live) + 1)

    def start_decode(self, engine: Engine) -> None:
        state = engine.state_of(self)
        for layer, budgets in state.budgets.items():
            live = engine.cache.layers[layer].live().amax(dim=1, keepdim=True)  # (B, 1)
            state.caps[layer] = torch.maximum(torch.tensor(budgets, device=live.device)[:, None], live)

    def after_decode_attention(self, view, query):
        cap = view.state.caps.get(view.index)
        if cap is None:  # sliding-window layer, or a prefill without compression
            return
        slot = self.victim(view, query)
        view.cache.evict(slot, view.cache.live() > cap)


def decode_probs(view: LayerView, query: torch.Tensor) -> torch.Tensor:
    """The new token's attention (B, H, C) over the layer's decode buffer, fp32 (empty slots 0)."""
    cache = view.cache
    return attention_probs(query, cache.keys, view.positions, cache.pos, view.scaling)[:, :, 0]


def protected(
    scores: torch.Tensor, key_pos: torch.Tensor, current: torch.Tensor, recent: int | torch.Tensor
) -> torch.Tensor:
    """Scores with the entries of the last `recent` positions (an int, or (B, 1) per row) and
    empty slots made unevictable; current (B, 1) is the position of the newest token."""
    if isinstance(recent, torch.Tensor):
        recent = recent[:, :, None]
    newest = current[:, :, None] - key_pos < recent
    return scores.masked_fill(newest | (key_pos < 0), float("inf"))


def middle_layer(view: LayerView, layer: int | None, fraction: float) -> int:
    """`layer` if given (checked), else the global-attention layer nearest `fraction` of the depth:
    a sliding-window layer's scores cannot see far back, so a whole-prompt decision avoids them."""
    count = view.num_layers
    if layer is not None:
        if not 0 <= layer < count:
            raise SqueezegenError(f"layer {layer} is out of range for a {count}-layer model (0..{count - 1})")
        return layer
    target = round(fraction * count)
    candidates = [i for i in range(count) if view.layer_types[i] != "sliding_attention"] or list(range(count))
    return min(candidates, key=lambda i: (abs(i - target), i))
