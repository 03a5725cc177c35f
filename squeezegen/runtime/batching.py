"""Rows that decode together although they were prefilled apart: continuous batching.

Every row of the engine is independent of the others (its own positions, entries and empty
slots), so decoding engines can be stacked into one batch at a step boundary and rows taken out
of it at another. Only caches the decode step merely appends to can share a batch: methods that
evict while decoding keep state per engine and decode on their own.
"""

from __future__ import annotations

import torch

from squeezegen.errors import SqueezegenError
from squeezegen.runtime.cache import EMPTY, HeadSplitCache, LayerCache
from squeezegen.runtime.engine import Engine
from squeezegen.runtime.hooks import DECODE_HOOKS, Method


def batchable(engine: Engine) -> bool:
    """Can this engine's rows decode in a shared batch (no decode-time method)?"""
    return not engine.hooks & DECODE_HOOKS


def _padded(cache: LayerCache | HeadSplitCache) -> LayerCache:
    """A decoding layer as one (B, Hkv, C, D) buffer (heads with buffers of their own, padded)."""
    if isinstance(cache, LayerCache):
        return cache
    out = LayerCache()
    out._set(*cache.held())
    out.static, out.window = True, cache.window
    return out


def stack(engines: list[Engine]) -> Engine:
    """One engine decoding the rows of `engines` (each already decoding) in that order."""
    if not engines:
        raise SqueezegenError("nothing to stack")
    if not all(batchable(e) for e in engines):
        raise SqueezegenError("a method that rewrites the cache while decoding cannot share a batch")
    first = engines[0]
    batch = Engine(first.model, Method(), tokenizer=first.tokenizer, native=first.native)
    for i, layer in enumerate(batch.cache.layers):
        parts = [_padded(e.cache.layers[i]) for e in engines]
        width = max(p.keys.shape[2] for p in parts)
        pad = torch.nn.functional.pad
        keys = torch.cat([pad(p.keys, (0, 0, 0, width - p.keys.shape[2])) for p in parts])
        values = torch.cat([pad(p.values, (0, 0, 0, width - p.values.shape[2])) for p in parts])
        pos = torch.cat([pad(p.pos, (0, width - p.pos.shape[2]), value=EMPTY) for p in parts])
        layer._set(keys, values, pos)
        layer.static, layer.window = True, parts[0].window
    batch.next_pos = torch.cat([e.next_pos for e in engines])
    batch.prompt_lengths = torch.cat([e.prompt_lengths for e in engines])
    batch._horizon = float("inf")  # each row came with the room for all of its own tokens
    batch.fused = first.fused  # the model's fused forward; its RoPE table covers every row's room
    batch.cache.note_peak()
    return batch


def take(engine: Engine, rows: list[int]) -> Engine | None:
    """The engine with only `rows` left, in that order (None when no row is). Buffers keep their
    width: every row still needs the room it came with."""
    if not rows:
        return None
    index = torch.tensor(rows, device=engine.next_pos.device)
    for layer in engine.cache.layers:
        layer._set(*(x.index_select(0, index) for x in (layer.keys, layer.values, layer.pos)))
        layer.static = True
    engine.next_pos = engine.next_pos.index_select(0, index)
    engine.prompt_lengths = engine.prompt_lengths.index_select(0, index)
    engine.cache.peak_bytes = engine.cache.nbytes()
    return engine
