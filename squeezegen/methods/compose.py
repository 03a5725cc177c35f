"""One method for the prompt, another for the generation (e.g. FastKV's prefill with RPC's
periodic compression of the generated path): the prefill hooks go to the first, the decode hooks
to the second, and the prefill attention itself to a third if given (Token Sparse Attention in
front of any cache method). They share `engine.state`, under their own keys."""

from __future__ import annotations

from dataclasses import dataclass

from squeezegen.methods.base import Method


@dataclass
class Compose(Method):
    prefill: Method
    decode: Method
    attention: Method | None = None

    def prefill_attention(self, engine, layer, query, key, value, mask, causal, scaling):
        attention = self.attention or self.prefill
        return attention.prefill_attention(engine, layer, query, key, value, mask, causal, scaling)

    def select_cache(self, engine, layer, query, key, value):
        return self.prefill.select_cache(engine, layer, query, key, value)

    def propagate(self, engine, layer, hidden):
        return self.prefill.propagate(engine, layer, hidden)

    def refill(self, engine, layer):
        return self.prefill.refill(engine, layer)

    def on_decode_attention(self, engine, layer, query):
        self.decode.on_decode_attention(engine, layer, query)

    def on_decode_step(self, engine, step):
        self.decode.on_decode_step(engine, step)

    def compresses_while_decoding(self) -> bool:
        return self.decode.compresses_while_decoding()
