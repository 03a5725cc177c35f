"""Perplexity of held-out real text with a method's compression applied as during generation.

The first `context` tokens are prefilled (and compressed by the method); the next `continuation`
tokens are then teacher-forced as if the model had generated them: in one uncompressed chunk
for methods that compress only at prefill, token by token for methods that evict while decoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from squeezegen.errors import SqueezegenError
from squeezegen.evals.corpus import prose
from squeezegen.methods.spec import MethodSpec, expand
from squeezegen.runtime.engine import Engine
from squeezegen.runtime.hooks import Method

HELD_OUT_SEED = 10_000  # haystacks of the tasks use small seeds; this text starts elsewhere


def held_out_ids(tokenizer, tokens: int, seed: int = HELD_OUT_SEED) -> list[int]:
    ids = tokenizer(prose(tokenizer, tokens + 512, seed)).input_ids
    if len(ids) < tokens:
        raise SqueezegenError(f"the corpus gave {len(ids)} tokens, fewer than the {tokens} asked for")
    return ids[:tokens]


@torch.inference_mode()
def continuation_nll(model, ids: list[int], context: int, method: Method | None = None) -> list[float]:
    """Negative log-likelihood (nats) of every token after the first `context` ones."""
    if context < 1:
        raise SqueezegenError(f"context must be at least 1 token, got {context}")
    if context >= len(ids):
        raise SqueezegenError(f"no tokens to score after a context of {context}: give {context + 1} or more ids")
    device = next(model.parameters()).device
    tokens = torch.tensor([ids], device=device)
    engine = Engine(model, method, reserve=len(ids) - context)
    logits = [engine.prefill(tokens[:, :context])[:, None]]  # predicts token `context`
    rest = tokens[:, context:-1]
    if engine.method.compresses_while_decoding():
        steps = tqdm(range(rest.shape[1]), desc=f"forcing ({type(engine.method).__name__})", unit="tok", leave=False)
        logits += [engine.decode(rest[:, i])[:, None] for i in steps]
    elif rest.shape[1]:
        logits.append(engine.prefill(rest, compress=False, all_logits=True))
    logits = torch.cat(logits, dim=1)[0].float()
    return F.cross_entropy(logits, tokens[0, context:], reduction="none").tolist()


def perplexity(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll))


def run_nll(
    model, tokenizer, methods: dict[str, Method], context: int, continuation: int, texts: int = 2
) -> dict[str, list[list[float]]]:
    """Per-token NLL of `continuation` tokens after `context` tokens, per labelled method, for each
    of `texts` held-out passages."""
    for name, value in (("context", context), ("continuation", continuation), ("texts", texts)):
        if value < 1:
            raise SqueezegenError(f"{name} must be at least 1, got {value}")
    limit = model.config.max_position_embeddings
    if context + continuation > limit:
        raise SqueezegenError(
            f"context {context} + continuation {continuation} tokens exceed the model's {limit}: shorten either"
        )
    passages = [held_out_ids(tokenizer, context + continuation, HELD_OUT_SEED + i) for i in range(texts)]
    return {label: [continuation_nll(model, ids, context, m) for ids in passages] for label, m in methods.items()}


def labelled(specs: list[MethodSpec], budgets: list[float | int]) -> dict[str, Method]:
    """Every method to score by its label, `name@budget` (`name` alone without a budget, full first),
    as `markdown_table` reads them back."""
    methods = expand(specs, budgets)
    return {label if budget is None else f"{label}@{budget}": m for (label, budget), m in methods.items()}


def pooled_perplexity(nll: dict[str, list[list[float]]]) -> dict[str, float]:
    """Perplexity per labelled method, NLL pooled over the passages of `run_nll`."""
    return {label: perplexity([x for text in per_text for x in text]) for label, per_text in nll.items()}


def markdown_table(ppl: dict[str, float], context: int, continuation: int, texts: int) -> str:
    """A row per labelled method (see `labelled`): mean NLL, perplexity and its ratio to the full cache's."""
    lines = [
        f"perplexity of {continuation} tokens after {context} ({texts} held-out passages)",
        "",
        "| method | budget | mean NLL | perplexity | vs full |",
        "|---|---|---|---|---|",
    ]
    for label, value in ppl.items():
        name, _, budget = label.partition("@")
        budget = budget or ("all" if name == "full" else "own")  # RPC sizes its cache itself
        lines.append(f"| {name} | {budget} | {math.log(value):.4f} | {value:.2f} | {value / ppl['full']:.3f}x |")
    return "\n".join(lines)


def plot_nll(nll: dict[str, list[list[float]]], context: int, path, window: int = 256) -> None:
    """Mean NLL per window of `window` forced tokens against the position, one line per method:
    where along a long generation a compressor starts to lose what it needs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for label, per_text in nll.items():
        per_token = torch.tensor(per_text).mean(dim=0)
        means = per_token[: len(per_token) // window * window].view(-1, window).mean(dim=1)
        ax.plot([context + window * (i + 0.5) for i in range(len(means))], means.tolist(), label=label)
    ax.set(xlabel="position of the forced token", ylabel=f"mean NLL per {window} tokens (nats)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
