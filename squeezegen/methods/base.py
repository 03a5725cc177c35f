"""The contract between the engine and a KV-cache / attention method.

A method is a small config dataclass. The engine calls its hooks at fixed points of the loop; the
defaults below are the full cache, so a method overrides only what it changes:

- `prefill_attention`: the attention of one layer over a prefill chunk (TSA replaces it);
- `select_cache`: after a layer's prefill attention, which cached entries to keep per KV head
  (SnapKV, PyramidKV, FastKV...);
- `propagate`: after a layer, which token positions go on to the next layers (FastKV's TSP);
- `refill`: after a layer, which prompt tokens to run the whole prefill again with (GemFilter);
- `on_decode_attention` / `on_decode_step`: per layer inside a decode step, then once after it
  (RPC, H2O, TOVA evict here).

Per-generation state belongs in `engine.state`, never on the config object, so one config can be
reused across calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from squeezegen.runtime.attention import dense_attention

if TYPE_CHECKING:
    from squeezegen.runtime.engine import Engine


@dataclass
class Method:
    """The full KV cache: every hook keeps everything."""

    name: ClassVar[str] = "full"

    def prefill_attention(
        self,
        engine: Engine,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
        scaling: float,
    ) -> torch.Tensor:
        """Attention output (B, H, Lq, D) of a prefill chunk over the layer's whole cache."""
        return dense_attention(query, key, value, scaling, mask, causal)

    def select_cache(
        self, engine: Engine, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor | None:
        """Indices (B, Hkv or 1, T') of the cache entries to keep, ascending; None keeps all."""
        return None

    def propagate(self, engine: Engine, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Indices (B, T') of the tokens passed on to the next layer, ascending; None passes all."""
        return None

    def refill(self, engine: Engine, layer: int) -> torch.Tensor | None:
        """Indices (B, k) of prompt tokens to prefill again from the first layer, alone and
        renumbered 0..k-1, instead of finishing this pass; None finishes it."""
        return None

    def on_decode_attention(self, engine: Engine, layer: int, query: torch.Tensor) -> None:
        """Sees the post-RoPE query (B, H, 1, D) of each layer during a decode step."""

    def on_decode_step(self, engine: Engine, step: int) -> None:
        """Runs after each decode step, when every layer's cache holds the new token."""

    def compresses_while_decoding(self) -> bool:
        """Does the cache change between decode steps? Then forced text must go token by token,
        and a token budget may exceed the prompt: the cache grows to it while decoding."""
        kind = type(self)
        return (
            kind.on_decode_attention is not Method.on_decode_attention
            or kind.on_decode_step is not Method.on_decode_step
        )
