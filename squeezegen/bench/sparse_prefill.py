"""`squeezegen bench-tsa`: prefill attention time in the sparse layers and end to end, Token Sparse
Attention vs dense, with the tokens dropped per layer and TSA's own overhead.

Dense and TSA prefills of the same prompt alternate (the order rotates each repeat); medians are
reported and each ratio divides two numbers of the same run.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from squeezegen.evals.corpus import prose
from squeezegen.methods.token_sparse import TokenSparse
from squeezegen.runtime.engine import Engine
from squeezegen.runtime.hooks import Method
from squeezegen.runtime.timing import synchronize

PHASES = ("score_s", "gather_s", "attend_s", "scatter_s")


@dataclass
class TimedDense(Method):
    """The full cache, timing the prefill attention of the given layers (its state: seconds per layer)."""

    layers: frozenset = frozenset()

    def new_state(self) -> dict[int, float]:
        return {}

    def prefill_attention(self, view, query, key, value, mask, causal):
        start = time.perf_counter()
        out = super().prefill_attention(view, query, key, value, mask, causal)
        if view.index in self.layers:
            synchronize(out.device)
            view.state[view.index] = time.perf_counter() - start
        return out


def _prefill(model, ids: torch.Tensor, method: Method) -> tuple[float, object]:
    """Seconds of one prefill, and the method's state after it."""
    engine = Engine(model, method)
    start = time.perf_counter()
    engine.prefill(ids)
    synchronize(ids.device)
    return time.perf_counter() - start, engine.state_of(method)


def run_sparse_prefill(model, tokenizer, context: int, tsa: TokenSparse, repeats: int = 1) -> dict:
    """Per sparse layer: dense attention seconds, TSA phase seconds and kept share; end-to-end
    prefill seconds of both; the ratios."""
    ids = torch.tensor([tokenizer(prose(tokenizer, context + 2048)).input_ids[:context]])
    ids = ids.to(next(model.parameters()).device)
    tsa = dataclasses.replace(tsa, timings=True)
    layers = tsa.sparse_layers(Engine(model, tsa).view(0))
    dense_method = TimedDense(layers=frozenset(layers))
    for method in (dense_method, tsa):  # warm-up: first calls into each kernel are slow
        _prefill(model, ids[:, : min(context, 512)], method)
    runs: dict[str, list] = {"dense": [], "tsa": []}
    for repeat in tqdm(range(repeats), desc=f"bench-tsa {context}", unit="repeat"):
        order = [("dense", dense_method), ("tsa", tsa)]
        for label, method in order[repeat % 2 :] + order[: repeat % 2]:
            runs[label].append(_prefill(model, ids, method))
    per_layer = []
    for layer in sorted(layers):
        dense = statistics.median(state[layer] for _, state in runs["dense"])
        phases = {p: statistics.median(state.stats[layer].get(p, 0.0) for _, state in runs["tsa"]) for p in PHASES}
        sparse = sum(phases.values())
        overhead = phases["score_s"] + phases["gather_s"] + phases["scatter_s"]
        per_layer.append(
            {
                "layer": layer,
                "dropped": 1 - runs["tsa"][0][1].stats[layer]["kept"],
                "dense_s": dense,
                "tsa_s": sparse,
                **phases,
                "speedup": dense / sparse,
                "overhead_share": overhead / sparse,
            }
        )
    dense_total = statistics.median(s for s, _ in runs["dense"])
    tsa_total = statistics.median(s for s, _ in runs["tsa"])
    attention_dense = sum(r["dense_s"] for r in per_layer)
    attention_tsa = sum(r["tsa_s"] for r in per_layer)
    return {
        "context": context,
        "tau": tsa.tau,
        "layers": per_layer,
        "attention_dense_s": attention_dense,
        "attention_tsa_s": attention_tsa,
        "attention_speedup": attention_dense / attention_tsa,
        "overhead_share": sum(r["overhead_share"] * r["tsa_s"] for r in per_layer) / attention_tsa,
        "prefill_dense_s": dense_total,
        "prefill_tsa_s": tsa_total,
        "prefill_speedup": dense_total / tsa_total,
    }


def markdown_report(result: dict) -> str:
    r = result
    lines = [
        f"context {r['context']}, tau {r['tau']}: attention in the sparse layers {r['attention_dense_s']:.2f} s dense "
        f"vs {r['attention_tsa_s']:.2f} s TSA (**{r['attention_speedup']:.2f}x**, TSA overhead "
        f"{r['overhead_share']:.1%} of its attention time); prefill {r['prefill_dense_s']:.1f} s vs "
        f"{r['prefill_tsa_s']:.1f} s ({r['prefill_speedup']:.2f}x)",
        "",
        "| layer | tokens dropped | dense attention s | TSA s | score | gather | attend | scatter | speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["layers"]:
        lines.append(
            f"| {x['layer']} | {x['dropped']:.1%} | {x['dense_s']:.3f} | {x['tsa_s']:.3f} | {x['score_s']:.3f} "
            f"| {x['gather_s']:.3f} | {x['attend_s']:.3f} | {x['scatter_s']:.3f} | {x['speedup']:.2f}x |"
        )
    return "\n".join(lines)
