"""One method for the prompt, another for the generation (e.g. FastKV's prefill with RPC's
periodic compression of the generated path): the prefill hooks go to the first, the decode hooks
to the second, and the prefill attention itself to a third if given (Token Sparse Attention in
front of any cache method). Each part keeps its own state.

A decode method that evicts to a budget (H2O, TOVA, StreamingLLM) takes over the cache the
prefill method kept and holds it at that size (or at its own budget, if larger) while decoding:
it records its caps (and H2O its accumulated scores) for those entries.
"""

from __future__ import annotations

from dataclasses import dataclass

from squeezegen.errors import SqueezegenError
from squeezegen.methods.selection import EvictingSelection
from squeezegen.runtime.hooks import DECODE_HOOKS, PREFILL_HOOKS, Method


@dataclass
class Compose(Method):
    """prefill: selects / propagates / refills at prefill; decode: acts while decoding;
    attention: replaces the prefill attention. Any two or three of them."""

    prefill: Method | None = None
    decode: Method | None = None
    attention: Method | None = None

    def __post_init__(self) -> None:
        parts = (("prefill", self.prefill), ("decode", self.decode), ("attention", self.attention))
        for role, part in parts:
            if part is not None and not isinstance(part, Method):
                raise SqueezegenError(f"Compose {role}= takes a method (sg.method(...)), got {type(part).__name__}")
        if sum(part is not None for _, part in parts) < 2:
            raise SqueezegenError("Compose takes two or three of prefill=, decode=, attention=; one method runs alone")
        if self.prefill is not None and not self.prefill.hooks() & PREFILL_HOOKS:
            raise SqueezegenError(f"{type(self.prefill).__name__} does nothing at prefill: it cannot be prefill=")
        if self.decode is not None and not self.decode.hooks() & DECODE_HOOKS:
            raise SqueezegenError(
                f"{type(self.decode).__name__} does nothing while decoding: it cannot be decode= "
                "(use it alone, or as prefill=)"
            )
        if self.attention is not None and "prefill_attention" not in self.attention.hooks():
            raise SqueezegenError(f"{type(self.attention).__name__} has no prefill attention: it cannot be attention=")

    def hooks(self) -> frozenset[str]:
        hooks = set()
        if self.prefill is not None:
            hooks |= self.prefill.hooks() & PREFILL_HOOKS
        if self.decode is not None:
            hooks |= self.decode.hooks() & DECODE_HOOKS
        if self.attention is not None:
            hooks |= {"prefill_attention"}
        if isinstance(self.decode, EvictingSelection):
            hooks |= {"select_cache"}
        return frozenset(hooks)

    def prefill_attention(self, view, query, key, value, mask, causal):
        part = self.attention or self.prefill
        return part.prefill_attention(view.for_method(part), query, key, value, mask, causal)

    def select_cache(self, view, query, key, value):
        keep = None
        if self.prefill is not None and "select_cache" in self.prefill.hooks():
            keep = self.prefill.select_cache(view.for_method(self.prefill), query, key, value)
        if isinstance(self.decode, EvictingSelection) and not view.sliding:
            self.decode.track(view.for_method(self.decode), query, key, keep)
        return keep

    def propagate(self, view, hidden):
        return self.prefill.propagate(view.for_method(self.prefill), hidden)

    def refill(self, view):
        return self.prefill.refill(view.for_method(self.prefill))

    def decode_capacity(self, view, live, new_tokens):
        if self.decode is None:
            return super().decode_capacity(view, live, new_tokens)
        return self.decode.decode_capacity(view.for_method(self.decode), live, new_tokens)

    def start_decode(self, engine):
        self.decode.start_decode(engine)

    def after_decode_attention(self, view, query):
        self.decode.after_decode_attention(view.for_method(self.decode), query)

    def after_decode_step(self, engine, step):
        self.decode.after_decode_step(engine, step)
