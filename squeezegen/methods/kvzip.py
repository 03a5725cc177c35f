"""KVzip: compress a context once, for questions it has not seen, by how much each KV entry helps
the model reconstruct the context.

After the context is prefilled, the model is teacher-forced on "Repeat the previous context"
followed by the context itself, chunk by chunk, each chunk a probe that leaves no trace in the
cache (`Engine.probe`). An entry's score is the most attention any reconstruction query of its
chunk gives it, over the query heads of its KV group; the softmax runs over the attention sinks,
the context chunk being repeated and the probe's own tokens (as in the reference). The entries
kept are the best over every global layer and KV head together, so heads and layers get the
budgets their scores earn (non-uniform), with an optional floor per head.

The reconstruction queries take the positions right after the context, where a repetition of it
would stand; near the model's context limit the chunks shrink so that no query passes the limit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from squeezegen.errors import SqueezegenError
from squeezegen.methods.scoring import check_budget, chunk_scores, keep_global, resolve_budget
from squeezegen.runtime.cache import compact_index
from squeezegen.runtime.hooks import Method

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
CARRY = 8  # tokens of the previous chunk that start the next chunk's prompt
QUERY_BLOCK = 128  # reconstruction queries scored at once (bounds the logits' memory)


@dataclass
class KVzip(Method):
    """budget: entries kept, a fraction of the context (or a token count) per layer and KV head on
    average; chunk_size: context tokens reconstructed per probe; sinks: first tokens always kept;
    floor: each KV head keeps at least this share of its even split (0 = KVzip's own, no floor);
    chunk > 0 keeps whole chunks of that many tokens (scored by their sum); score_every: probe
    only every n-th context chunk, the others scored by their neighbours' mean per head (cheaper,
    an option of ours); heads: "per-head" (each KV head its own entries) or "shared" (one set of
    positions per layer: what a paged cache can free).

    Configurations that differ only in how they choose from the scores (`CHOICE_FIELDS`) and
    compress forks of one prefill (an evaluation's budget sweep, evals/fanout.py) reconstruct
    once; separate prefills always pay for their own reconstruction."""

    CHOICE_FIELDS: ClassVar[frozenset[str]] = frozenset({"budget", "floor", "chunk", "heads"})

    budget: int | float = 0.25
    chunk_size: int = 2048
    sinks: int = 4
    floor: float = 0.0
    chunk: int = 0
    score_every: int = 1
    heads: str = "per-head"

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if self.chunk_size < 16 or self.sinks < 0 or self.chunk < 0 or self.score_every < 1:
            raise SqueezegenError("chunk_size must be >= 16, sinks and chunk >= 0, score_every >= 1")
        if not 0 <= self.floor <= 1:
            raise SqueezegenError(f"floor is a share of a head's even budget, in [0, 1]; got {self.floor}")
        if self.heads not in ("per-head", "shared"):
            raise SqueezegenError(f"heads must be 'per-head' or 'shared', got {self.heads!r}")

    def after_prefill(self, engine):
        tok = engine.tokenizer
        if tok is None:
            raise SqueezegenError(
                "kvzip writes a reconstruction prompt: pass the tokenizer (Engine(..., tokenizer=tok))"
            )
        parts = engine.parts
        global_layers = [i for i in range(len(parts.layers)) if not parts.is_sliding(i)]
        lengths = engine.chunk_lengths
        limit = engine.model.config.max_position_embeddings
        kept: dict[int, list[torch.Tensor]] = {i: [] for i in global_layers}
        for row, n in enumerate(lengths):
            scores = self.row_scores(engine, row, n, global_layers, limit)  # (G, Hkv, n)
            mask = self.choose(scores, n)  # (G, Hkv, n)
            for g, layer in enumerate(global_layers):
                kept[layer].append(mask[g])
        for layer in global_layers:
            cache = engine.cache.layers[layer]
            width = cache.used
            # each row's kept entries are at its real slots (the last n of the chunk's)
            full = torch.zeros(len(lengths), cache.pos.shape[1], width, dtype=torch.bool, device=cache.pos.device)
            for row, (n, mask) in enumerate(zip(lengths, kept[layer], strict=True)):
                full[row, :, width - n :] = mask
            cache.keep(compact_index(full))

    def row_scores(self, engine, row: int, n: int, layers: list[int], limit: int) -> torch.Tensor:
        """Reconstruction scores (G, Hkv, n) of one row's n context entries in each global layer,
        kept in the engine's `prefill_memo` under this configuration's scoring fields."""
        scoring = tuple((f.name, getattr(self, f.name)) for f in fields(self) if f.name not in self.CHOICE_FIELDS)
        key = (type(self), scoring, row, tuple(layers), limit)
        if key not in engine.prefill_memo:
            ids = engine.chunk_ids[row, engine.chunk_ids.shape[1] - n :]
            engine.prefill_memo[key] = self._reconstruct(engine, row, ids, layers, limit)
        out = engine.prefill_memo[key].clone()
        out[:, :, : self.sinks] = float("inf")
        return out

    def _reconstruct(self, engine, row: int, ids: torch.Tensor, layers: list[int], limit: int) -> torch.Tensor:
        n = len(ids)
        tok = engine.tokenizer
        kv_heads = engine.cache.layers[layers[0]].pos.shape[1]
        device = ids.device
        scores = {i: torch.zeros(kv_heads, n, device=device) for i in layers}
        first = tok(FIRST_PROMPT, add_special_tokens=False).input_ids
        after = tok(NEXT_PROMPT, add_special_tokens=False).input_ids
        suffix = assistant_prefix(tok)
        room = limit - int(engine.next_pos[row]) - max(len(first), len(after) + CARRY) - len(suffix)
        size = min(self.chunk_size, room)
        if size < 16:
            raise SqueezegenError(
                f"kvzip needs room after the context to reconstruct it: the prompt leaves {room} positions "
                f"before the model's {limit}-token limit; shorten the context"
            )
        starts = list(range(0, n, size))
        probed = starts[:: self.score_every]
        for start in probed:
            end = min(n, start + size)
            prompt = first if start == 0 else after + ids[max(0, start - CARRY) : start].tolist()
            probe = torch.tensor([prompt + suffix], device=device)
            probe = torch.cat([probe, ids[None, start:end]], dim=1)
            engine.probe(probe, row, self._observer(engine, row, n, start, end, scores))
        if self.score_every > 1:
            fill_unprobed(scores, starts, probed, size, n)
        return torch.stack([scores[i] for i in layers])

    def _observer(self, engine, row: int, n: int, start: int, end: int, scores: dict[int, torch.Tensor]):
        def observe(view, query, own_keys):
            if view.index not in scores:
                return
            held_k, _, held_pos = view.cache.held()
            base = held_k.shape[2] - n  # the row's first real slot
            sink = min(self.sinks, start)
            ctx = torch.cat([held_k[row, :, base : base + sink], held_k[row, :, base + start : base + end]], dim=1)
            span = reconstruction_scores(query, ctx[None], own_keys, view.scaling)  # (Hkv, sink + chunk)
            scores[view.index][:, start:end] = span[:, sink:]

        return observe

    def choose(self, scores: torch.Tensor, n: int) -> torch.Tensor:
        """Which entries (G, Hkv, n) stay: the best over all layers and heads together."""
        g, h, _ = scores.shape
        per_head = resolve_budget(self.budget, n)
        if self.chunk:  # the sinks (inf) stay out of their chunk's sum
            scores = chunk_scores(scores, torch.isfinite(scores), self.chunk)
        if self.heads == "shared":
            shared = scores.amax(dim=1, keepdim=True)  # (G, 1, n): a position's best head speaks for it
            real = torch.ones(1, g, n, dtype=torch.bool, device=scores.device)
            keep = keep_global(
                shared.view(1, g, n),
                real,
                torch.isinf(shared).view(1, g, n),
                [per_head * g],
                [round(self.floor * per_head)],
            )
            return keep.view(g, 1, n).expand(g, h, n)
        flat = scores.reshape(1, g * h, n)
        real = torch.ones_like(flat, dtype=torch.bool)
        keep = keep_global(flat, real, torch.isinf(flat), [per_head * g * h], [round(self.floor * per_head)])
        return keep.view(g, h, n)


def reconstruction_scores(
    query: torch.Tensor, context: torch.Tensor, own: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The most attention each context key (1, Hkv, m, D) receives from any query (1, H, L, D) of
    its KV group, softmax over the context keys and the queries' own keys (1, Hkv, L, D), causal
    among those: (Hkv, m), fp32.

    max_q softmax(l)_qk = exp(max_q (l_qk - lse_q)): the log-sum-exp of each query comes first (on
    the CPU from the fused flash-attention kernel, which returns it), then only the context's logits
    are formed, block by block, and no probability matrix is materialized."""
    _, h, length, d = query.shape
    h_kv, m = context.shape[1], context.shape[2]
    groups = h // h_kv
    q = query.float()
    keys = torch.cat([context, own], dim=2).float()  # (1, Hkv, m + L, D)
    lse = _logsumexp(q, keys, m, scaling)  # (H, L)
    best = torch.full((h_kv, m), float("-inf"), device=query.device)
    ctx_t = keys[0, :, :m].transpose(-1, -2)[:, None]  # (Hkv, 1, D, m)
    for first in range(0, length, QUERY_BLOCK):
        block = q[0, :, first : first + QUERY_BLOCK].view(h_kv, groups, -1, d)
        logits = torch.matmul(block * scaling, ctx_t)  # (Hkv, G, q, m)
        norm = lse[:, first : first + QUERY_BLOCK].reshape(h_kv, groups, -1, 1)
        best = torch.maximum(best, (logits - norm).amax(dim=(1, 2)))
    return best.exp()


def _logsumexp(q: torch.Tensor, keys: torch.Tensor, m: int, scaling: float, fused: bool | None = None) -> torch.Tensor:
    """log sum_k exp(q.k * scaling) (H, L) over the m context keys and the causal own keys; fused
    (the CPU's flash-attention kernel) by default on the CPU, blocked matmuls elsewhere."""
    _, h, length, d = q.shape
    groups = h // keys.shape[1]
    mask = torch.zeros(length, m + length, device=q.device)
    mask[:, m:] = torch.full((length, length), float("-inf"), device=q.device).triu(1)
    if q.device.type == "cpu" if fused is None else fused:
        expanded = keys.repeat_interleave(groups, dim=1)
        _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, expanded, expanded, 0.0, False, attn_mask=mask, scale=scaling
        )
        return lse[0]
    out = torch.empty(h, length, device=q.device)
    for first in range(0, length, QUERY_BLOCK):
        block = q[0, :, first : first + QUERY_BLOCK].view(keys.shape[1], groups, -1, d)
        logits = torch.matmul(block * scaling, keys[0].transpose(-1, -2)[:, None]) + mask[first : first + QUERY_BLOCK]
        out[:, first : first + QUERY_BLOCK] = torch.logsumexp(logits, dim=-1).reshape(h, -1)
    return out


def assistant_prefix(tokenizer) -> list[int]:
    """What the chat template puts before an answer (the reconstruction is the model's answer);
    a newline for a tokenizer without a template."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return tokenizer("\n", add_special_tokens=False).input_ids
    marker = "\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text.split(marker, 1)[1], add_special_tokens=False).input_ids


def fill_unprobed(scores: dict[int, torch.Tensor], starts: list[int], probed: list[int], size: int, n: int) -> None:
    """Chunks not probed take, per head, the mean score of the nearest probed chunk on each side."""
    for start in starts:
        if start in probed:
            continue
        sides = [
            max((s for s in probed if s < start), default=None),
            min((s for s in probed if s > start), default=None),
        ]
        for layer_scores in scores.values():
            means = [layer_scores[:, s : min(n, s + size)].mean(-1) for s in sides if s is not None]
            layer_scores[:, start : min(n, start + size)] = torch.stack(means).mean(0)[:, None]
