"""Answer one question under many methods from a single prefill.

A method that only selects cache entries (no token propagation, no attention of its own) leaves the
prefill computation exactly as the full cache computes it; only what each layer keeps differs. So
one prefill can record every such method's selection, and each method then continues from its own
fork of the engine — the same tokens as separate runs, at a fraction of the cost (tests check it).
"""

from __future__ import annotations

import time

import torch

from squeezegen.methods.base import Method
from squeezegen.runtime.engine import Engine
from squeezegen.runtime.generate import Decoding, GenerationResult, _left_pad, decode_loop, prefill_rows


def select_only(method: Method) -> bool:
    kind = type(method)
    hooks = ("propagate", "prefill_attention", "refill")
    return all(getattr(kind, hook) is getattr(Method, hook) for hook in hooks)


class _FanOut(Method):
    """Calls every branch's `select_cache` on the shared prefill; keeps everything itself."""

    def __init__(self, methods: dict[str, Method]) -> None:
        self.branches = {label: (m, {}, {}) for label, m in methods.items()}  # method, state, keep

    def select_cache(self, engine, layer, query, key, value):
        own = engine.state
        for method, state, keep in self.branches.values():
            engine.state = state
            keep[layer] = method.select_cache(engine, layer, query, key, value)
        engine.state = own
        return None


def answer_all(
    model: torch.nn.Module,
    tokenizer,
    chunks: list[list[int]],
    methods: dict[str, Method],
    decoding: Decoding,
    question_seen: bool,
) -> dict[str, GenerationResult]:
    """Generate after `chunks` = [context ids, question ids] with every method.

    question_seen: compression runs on context + question (the question is inside the prompt);
    otherwise it runs on the context alone and the question is appended uncompressed.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    row = [chunks[0] + chunks[1]] if question_seen else chunks
    reserve = decoding.max_new_tokens + (0 if question_seen else len(chunks[1]))
    results: dict[str, GenerationResult] = {}

    shared = {label: m for label, m in methods.items() if select_only(m)}
    if shared:
        fan = _FanOut(shared)
        engine = Engine(model, fan, reserve=reserve)
        start = time.perf_counter()
        logits = engine.prefill(*_left_pad([row[0]], pad_id, engine.parts.embed.weight.device))
        prefill_s = time.perf_counter() - start
        for label, (method, state, keep) in fan.branches.items():
            twin = engine.fork(method, state, keep)
            first = logits
            if not question_seen:
                first = twin.prefill(*_left_pad([chunks[1]], pad_id, logits.device), compress=False)
            results[label] = decode_loop(twin, tokenizer, first, decoding, prefill_s)

    for label, method in methods.items():
        if label in shared:
            continue
        engine = Engine(model, method, reserve=reserve)
        start = time.perf_counter()
        logits = prefill_rows(engine, [row], pad_id)
        results[label] = decode_loop(engine, tokenizer, logits, decoding, time.perf_counter() - start)
    return {label: results[label] for label in methods}
