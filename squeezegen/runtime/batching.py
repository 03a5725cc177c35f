"""Rows that decode together although they were prefilled apart: continuous batching.

Every row of the engine is independent of the others (its own positions, entries and empty
slots), so decoding engines can be stacked into one batch at a step boundary and rows taken out
of it at another. Rows of a method that rewrites the cache while decoding (H2O, TOVA,
StreamingLLM, RPC) join too: the engine that prefilled them keeps the method, its state and its
own step count, and its caches become windows on its rows of the batch's buffers, so the batch's
decode hooks reach each method with only its rows (`RowGroups`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from squeezegen.errors import SqueezegenError
from squeezegen.runtime.cache import EMPTY, HeadSplitCache, LayerCache
from squeezegen.runtime.engine import Engine
from squeezegen.runtime.hooks import DECODE_HOOKS, STEP_HOOKS, LayerView, Method


@dataclass
class RowGroup:
    """Rows [start, stop) of a shared batch decoded under a decode-time method; `engine` is the
    one that prefilled them, holding the method, its state and its decode step count."""

    engine: Engine
    start: int
    stop: int

    def bind(self, batch: Engine) -> None:
        """Make the group's caches views of its rows of the batch's buffers (after a stack or a
        take): what its method evicts there, the batch no longer attends to."""
        rows = slice(self.start, self.stop)
        for i, shared in enumerate(batch.cache.layers):
            own = LayerCache()
            own._set(shared.keys[rows], shared.values[rows], shared.pos[rows])
            own.static, own.window = True, shared.window
            self.engine.cache.layers[i] = own
        self.engine.next_pos = batch.next_pos[rows]


class RowGroups(Method):
    """The method of a batch holding rows of decode-time methods: each hook goes to every group
    whose method has it, with that group's rows of the query and the group's own state."""

    def __init__(self, groups: list[RowGroup]) -> None:
        self.groups = groups

    def hooks(self) -> frozenset[str]:
        return frozenset().union(*(g.engine.hooks for g in self.groups)) & STEP_HOOKS

    def after_decode_attention(self, view: LayerView, query: torch.Tensor) -> None:
        for g in self.groups:
            if "after_decode_attention" in g.engine.hooks:
                g.engine.positions = view.positions[g.start : g.stop]
                g.engine.method.after_decode_attention(g.engine.view(view.index), query[g.start : g.stop])

    def after_decode_step(self, engine: Engine, step: int) -> None:
        for g in self.groups:  # each group counts its own steps: rows joined the batch at different ones
            g.engine.next_pos = engine.next_pos[g.start : g.stop]
            if "after_decode_step" in g.engine.hooks:
                g.engine.method.after_decode_step(g.engine, g.engine.decode_steps)
            g.engine.decode_steps += 1


def _padded(cache: LayerCache | HeadSplitCache) -> LayerCache:
    """A decoding layer as one (B, Hkv, C, D) buffer (heads with buffers of their own, padded)."""
    if isinstance(cache, LayerCache):
        return cache
    out = LayerCache()
    out._set(*cache.held())
    out.static, out.window = True, cache.window
    return out


def _groups(engines: list[Engine]) -> list[RowGroup]:
    """The decode-time row groups of `engines` stacked in that order."""
    groups, offset = [], 0
    for e in engines:
        if isinstance(e.method, RowGroups):  # a batch stacked again
            groups += [RowGroup(g.engine, g.start + offset, g.stop + offset) for g in e.method.groups]
        elif e.hooks & DECODE_HOOKS:
            groups.append(RowGroup(e, offset, offset + e.next_pos.shape[0]))
        offset += e.next_pos.shape[0]
    return groups


def stack(engines: list[Engine]) -> Engine:
    """One engine decoding the rows of `engines` (each already decoding) in that order."""
    if not engines:
        raise SqueezegenError("nothing to stack")
    if not all(e._horizon for e in engines):
        raise SqueezegenError("stack engines that are decoding: call engine.start_decoding() first")
    first, groups = engines[0], _groups(engines)
    method = RowGroups(groups) if groups else Method()
    batch = Engine(first.model, method, tokenizer=first.tokenizer, native=first.native)
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
    for g in groups:
        g.bind(batch)
    return batch


def take(engine: Engine, rows: list[int]) -> Engine | None:
    """The engine with only `rows` left, in that order (None when no row is). Buffers keep their
    width: every row still needs the room it came with. Rows decoded under one method's state
    leave together."""
    if not rows:
        return None
    grouped = isinstance(engine.method, RowGroups)
    if not grouped and engine.hooks & DECODE_HOOKS and rows != list(range(engine.next_pos.shape[0])):
        raise SqueezegenError("an engine's decode-time method keeps state for all its rows: they leave together")
    kept = []
    for g in engine.method.groups if grouped else []:
        moved = [rows.index(r) for r in range(g.start, g.stop) if r in rows]
        if not moved:
            continue
        if moved != list(range(moved[0], moved[0] + g.stop - g.start)):
            raise SqueezegenError("rows decoded under one method's state leave the batch together and keep their order")
        kept.append(RowGroup(g.engine, moved[0], moved[0] + len(moved)))
    index = torch.tensor(rows, device=engine.next_pos.device)
    for layer in engine.cache.layers:
        layer._set(*(x.index_select(0, index) for x in (layer.keys, layer.values, layer.pos)))
        layer.static = True
    engine.next_pos = engine.next_pos.index_select(0, index)
    engine.prompt_lengths = engine.prompt_lengths.index_select(0, index)
    engine.cache.peak_bytes = engine.cache.nbytes()
    if grouped:
        engine.method.groups = kept
        engine.hooks = engine.method.hooks()
        for g in kept:
            g.bind(engine)
    return engine
