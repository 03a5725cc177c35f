"""Perplexity of held-out real text with a method's compression applied as during generation.

The first `context` tokens are prefilled (and compressed by the method); the next `continuation`
tokens are then teacher-forced as if the model had generated them: in one uncompressed chunk
for methods that compress only at prefill, token by token for methods that evict while decoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from squeezegen.errors import SqueezegenError
from squeezegen.evals.corpus import prose
from squeezegen.methods.base import Method
from squeezegen.runtime.engine import Engine

HELD_OUT_SEED = 10_000  # haystacks of the tasks use small seeds; this text starts elsewhere


def evicts_while_decoding(method: Method) -> bool:
    kind = type(method)
    return (
        kind.on_decode_attention is not Method.on_decode_attention or kind.on_decode_step is not Method.on_decode_step
    )


def held_out_ids(tokenizer, tokens: int, seed: int = HELD_OUT_SEED) -> list[int]:
    ids = tokenizer(prose(tokenizer, tokens + 512, seed)).input_ids
    if len(ids) < tokens:
        raise SqueezegenError(f"the corpus gave {len(ids)} tokens, fewer than the {tokens} asked for")
    return ids[:tokens]


@torch.inference_mode()
def continuation_nll(model, ids: list[int], context: int, method: Method | None = None) -> list[float]:
    """Negative log-likelihood (nats) of every token after the first `context` ones."""
    if not 0 < context < len(ids):
        raise SqueezegenError(f"context must be between 1 and {len(ids) - 1} tokens, got {context}")
    device = next(model.parameters()).device
    tokens = torch.tensor([ids], device=device)
    engine = Engine(model, method, reserve=len(ids) - context)
    logits = [engine.prefill(tokens[:, :context])[:, None]]  # predicts token `context`
    rest = tokens[:, context:-1]
    if evicts_while_decoding(engine.method):
        logits += [engine.decode(rest[:, i])[:, None] for i in range(rest.shape[1])]
    elif rest.shape[1]:
        logits.append(engine.prefill(rest, compress=False, all_logits=True))
    logits = torch.cat(logits, dim=1)[0].float()
    return F.cross_entropy(logits, tokens[0, context:], reduction="none").tolist()


def perplexity(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll))


def run_perplexity(
    model, tokenizer, methods: dict[str, Method], context: int, continuation: int, texts: int = 2
) -> dict:
    """Perplexity of `continuation` tokens after `context` tokens, per labelled method, over
    `texts` held-out passages (NLL pooled over all of them)."""
    passages = [held_out_ids(tokenizer, context + continuation, HELD_OUT_SEED + i) for i in range(texts)]
    return {
        label: perplexity([x for ids in passages for x in continuation_nll(model, ids, context, m)])
        for label, m in methods.items()
    }
