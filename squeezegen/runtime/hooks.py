"""The contract between the engine and a KV-cache / attention method.

A method is a small config dataclass. The engine calls its hooks at fixed points of the loop; the
defaults below are the full cache, so a method overrides only what it changes. The hooks it
overrides are found from its class (`Method.hooks`): the engine skips the others, and `Compose`
routes them; nothing to list or keep in sync.

- `prefill_attention`: the attention of one layer over a prefill chunk (TSA replaces it);
- `select_cache`: after a layer's prefill attention, which cached entries each row keeps per KV
  head (SnapKV, PyramidKV, FastKV, ...);
- `propagate`: after a layer, which tokens of each row go on to the next layers (FastKV's TSP);
- `refill`: after a layer, which prompt tokens to run the whole prefill again with (GemFilter);
- `after_prefill`: once the compressed chunk has gone through every layer: may score it with
  extra passes that leave no trace (`engine.probe`) and select across layers and heads (KVzip);
- `start_decode`: once, after the prefill, when the cache becomes fixed-capacity buffers: size
  them (`decode_capacity`) and set up decode-time state;
- `after_decode_attention`: per layer inside a decode step, once the layer attended with the new
  token in its cache (H2O, TOVA, StreamingLLM evict here). It runs inside the (possibly compiled)
  step: tensor operations only, no host synchronisation, no Python branch on tensor values;
- `after_decode_step`: once after each step, outside the compiled step (RPC compresses here).

Rows of a batch are independent: every hook decides per row, from the row's real entries (left
padding and empty slots have position -1), so each row gets what it would get alone.

Per-generation state lives in `view.state` (an object from `new_state`), never on the config,
so one config can be reused across calls and shared by many generations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from squeezegen.errors import SqueezegenError
from squeezegen.runtime.attention import dense_attention

if TYPE_CHECKING:
    from squeezegen.runtime.cache import LayerCache
    from squeezegen.runtime.engine import Engine

PREFILL_HOOKS = frozenset({"prefill_attention", "select_cache", "propagate", "refill", "after_prefill"})
DECODE_HOOKS = frozenset({"start_decode", "after_decode_attention", "after_decode_step"})
STEP_HOOKS = frozenset({"after_decode_attention", "after_decode_step"})  # the ones run at every decode step
HOOKS = PREFILL_HOOKS | DECODE_HOOKS


@dataclass(eq=False)
class LayerView:
    """What a method sees of one layer while the engine runs it.

    positions (B, Lq): positions of the tokens being run (-1 = padding); cache: the layer's
    entries (`cache.pos` (B, Hkv, T), -1 = none); prompt_lengths: real tokens of each row in the
    prompt chunk being prefilled; row_tokens: real tokens of each row reaching this layer (fewer
    after a propagation); state: the method's own per-generation state; memo: scratch shared by
    every method scoring this layer in this forward (evaluations share one prefill); engine: for
    hooks that need the whole generation (use sparingly), None for a layer outside an engine
    (`outside_engine`).
    """

    index: int
    num_layers: int
    layer_types: list[str]
    scaling: float
    positions: torch.Tensor
    cache: LayerCache
    prompt_lengths: list[int]
    row_tokens: list[int]
    state: object
    memo: dict
    engine: Engine | None

    @classmethod
    def outside_engine(
        cls,
        index: int,
        num_layers: int,
        cache: LayerCache,
        queries: int = 0,
        scaling: float = 1.0,
        state: object = None,
    ) -> LayerView:
        """Layer `index` of `num_layers` full-attention layers holding one prompt in `cache`, run
        by the prompt's last `queries` tokens (a method's observation window), for code that keeps
        its own cache and asks a method to score and choose from it (the vLLM plugin). Hooks that
        need the engine cannot run on it; scoring, budgets and choosing can."""
        prompt = cache.used
        return cls(
            index=index,
            num_layers=num_layers,
            layer_types=["full_attention"] * num_layers,
            scaling=scaling,
            positions=torch.arange(prompt - queries, prompt)[None],
            cache=cache,
            prompt_lengths=[prompt],
            row_tokens=[prompt],
            state=state,
            memo={},
            engine=None,
        )

    def for_method(self, method: Method) -> LayerView:
        """The same layer as seen by another method (its own state): what `Compose` hands its parts."""
        if self.engine is None:
            raise SqueezegenError("a layer outside an engine has no other method's state: compose in an Engine")
        return dataclasses.replace(self, state=self.engine.state_of(method))

    @property
    def sliding(self) -> bool:
        return self.layer_types[self.index] == "sliding_attention"

    @property
    def key_pos(self) -> torch.Tensor:
        """Positions (B, Hkv, T) of the entries the layer holds, -1 for none."""
        return self.cache.held()[2]


@dataclass
class Method:
    """The full KV cache: every hook keeps everything."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "decode_attention" in vars(cls):  # the engine would never call it: say so at once
            raise TypeError(f"{cls.__name__}.decode_attention: the hook is named after_decode_attention now")

    def hooks(self) -> frozenset[str]:
        """The hooks this method's class overrides (its own or a parent's, not `Method`'s defaults):
        the engine calls only those. A method that routes hooks to others (`Compose`) says which."""
        return frozenset(h for h in HOOKS if getattr(type(self), h) is not getattr(Method, h))

    def new_state(self) -> object:
        """Per-generation state (a small dataclass); None for a stateless method."""
        return None

    # --- prefill -----------------------------------------------------------------------------------
    def prefill_attention(
        self,
        view: LayerView,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:
        """Attention output (B, H, Lq, D) of a prefill chunk over the layer's whole cache
        (key/value (B, Hkv, Lk, D)); `mask` (B, 1|Hkv, Lq, Lk) or, if None, `causal`."""
        return dense_attention(query, key, value, view.scaling, mask, causal)

    def select_cache(
        self, view: LayerView, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor | None:
        """Indices (B, Hkv or 1, T') of the entries each row keeps, -1 for none (a row keeping
        fewer than T'); None keeps all. Called after the layer's prefill attention."""
        return None

    def propagate(self, view: LayerView, hidden: torch.Tensor) -> torch.Tensor | None:
        """Indices (B, T') of the tokens passed on to the next layer, ascending, -1 first for a
        row passing fewer (it becomes left padding); None passes all. The last index of every row
        must be its last token (its logits are the prefill's output)."""
        return None

    def refill(self, view: LayerView) -> torch.Tensor | None:
        """Indices (B, k) of prompt tokens (-1 first for a row keeping fewer) to prefill again from
        the first layer, alone and renumbered from 0, instead of finishing this pass; None finishes."""
        return None

    def after_prefill(self, engine: Engine) -> None:
        """Once after a compressed prefill chunk has run through every layer (each holds all of
        its entries still, unless `select_cache` chose): may probe and rewrite the cache."""

    # --- decode ------------------------------------------------------------------------------------
    def decode_capacity(self, view: LayerView, live: int, new_tokens: int) -> int:
        """Slots the layer's decode buffer needs, given the most entries a row holds now (`live`)
        and the decode steps to come: by default room for every new token."""
        return live + new_tokens

    def start_decode(self, engine: Engine) -> None:
        """Once after the prefill, the cache already in its decode buffers: set up decode state."""

    def after_decode_attention(self, view: LayerView, query: torch.Tensor) -> None:
        """Sees the post-RoPE query (B, H, 1, D) of a decode step once the layer holds the new token;
        may evict (mark entries empty). Runs inside the compiled step: no host synchronisation."""

    def after_decode_step(self, engine: Engine, step: int) -> None:
        """Runs after decode step `step` (0-based), between compiled steps: may rewrite the cache."""

    def compresses_while_decoding(self) -> bool:
        """Does the cache change between decode steps? Then forced text must go token by token,
        and a token budget may exceed the prompt: the cache grows to it while decoding."""
        return bool(self.hooks() & STEP_HOOKS)
