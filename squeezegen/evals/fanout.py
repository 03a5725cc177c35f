"""Answer one question under many methods from a single prefill.

A method that only selects cache entries (no token propagation, no attention of its own) leaves the
prefill computation exactly as the full cache computes it; only what each layer keeps differs. So
one prefill can record every such method's selection (or, for KVzip, hand its full cache to the
method's scoring), and each method then continues from its own fork of the engine: the same tokens
as separate runs, at a fraction of the cost (tests check it).
"""

from __future__ import annotations

import time

import torch

from squeezegen.runtime.engine import Engine
from squeezegen.runtime.generate import Decoding, GenerationResult, decode_loop, left_pad, prefill_rows
from squeezegen.runtime.hooks import Method


def shares_the_prefill(method: Method) -> bool:
    """Does the method leave the prefill's computation alone, choosing what to keep while it runs
    or once it is done (KVzip's reconstruction runs on the fork, over the full prefill's cache)?"""
    return not method.hooks() & {"propagate", "prefill_attention", "refill"}


class _FanOut(Method):
    """Calls every branch's `select_cache` on the shared prefill; keeps everything itself."""

    def __init__(self, methods: dict[str, Method]) -> None:
        self.branches = {label: (m, {}) for label, m in methods.items()}  # method, kept per layer

    def select_cache(self, view, query, key, value):
        for method, keep in self.branches.values():
            if "select_cache" in method.hooks():
                keep[view.index] = method.select_cache(view.for_method(method), query, key, value)
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
    reserve = decoding.max_new_tokens - 1
    results: dict[str, GenerationResult] = {}

    shared = {label: m for label, m in methods.items() if shares_the_prefill(m)}
    if shared:
        fan = _FanOut(shared)
        engine = Engine(model, fan, reserve=reserve, tokenizer=tokenizer)
        start = time.perf_counter()
        logits = engine.prefill(*left_pad([row[0]], pad_id, engine.parts.embed.weight.device))
        prefill_s = time.perf_counter() - start
        for label, (method, keep) in fan.branches.items():
            twin = engine.fork(method, keep)
            first = logits
            if not question_seen:
                first = twin.prefill(*left_pad([chunks[1]], pad_id, logits.device), compress=False)
            results[label] = decode_loop(twin, tokenizer, first, decoding, prefill_s)

    for label, method in methods.items():
        if label in shared:
            continue
        engine = Engine(model, method, reserve=reserve, tokenizer=tokenizer)
        start = time.perf_counter()
        logits = prefill_rows(engine, [row], pad_id)
        results[label] = decode_loop(engine, tokenizer, logits, decoding, time.perf_counter() - start)
    return {label: results[label] for label in methods}
