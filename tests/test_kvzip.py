"""KVzip and the global selection by hand: reconstruction scores on small tensors, budgets shared
across layers and heads, the per-head floor, probes that leave no trace."""

import math

import pytest
import torch

import squeezegen as sg
from squeezegen.methods.kvzip import KVzip, _logsumexp, reconstruction_scores
from squeezegen.methods.scoring import chunk_scores, keep_global
from squeezegen.runtime.cache import HeadSplitCache
from squeezegen.runtime.engine import Engine

from .conftest import tiny
from .test_fastkv import token_ids


def test_reconstruction_scores_by_hand():
    # one KV head read by two query heads, D = 1, scaling 1: logits are query * key
    context = torch.tensor([0.0, math.log(2), math.log(4)]).view(1, 1, 3, 1)
    own = torch.tensor([0.0, 0.0]).view(1, 1, 2, 1)
    query = torch.tensor([[1.0, 1.0], [0.0, 2.0]]).view(1, 2, 2, 1)  # head 0: 1, 1; head 1: 0, 2
    scores = reconstruction_scores(query, context, own, scaling=1.0)
    # head 0 query 0 sees keys e^0, 2, 4 and its own first key (1): weights 1/8, 2/8, 4/8, 1/8
    # head 1 query 1 (logit 2 x key): 1, 4, 16 and two own keys of 1 each: total 23
    # head 1 query 0 (logit 0): everything equal, 1/4 each over 3 context keys + 1 own key
    expected = torch.tensor([[max(1 / 8, 1 / 4, 1 / 23), max(2 / 8, 1 / 4, 4 / 23), max(4 / 8, 1 / 4, 16 / 23)]])
    # head 0 query 1 sees both own keys: 1, 2, 4, 1, 1 -> 1/9, 2/9, 4/9 (below the others)
    assert torch.allclose(scores, expected, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_log_sum_exp_fused_and_blocked_agree_with_softmax(fused):
    torch.manual_seed(0)
    q, ctx, own = torch.randn(1, 6, 150, 16), torch.randn(1, 2, 90, 16), torch.randn(1, 2, 150, 16)
    keys = torch.cat([ctx, own], dim=2)
    logits = (q @ keys.repeat_interleave(3, dim=1).transpose(-1, -2))[0] * 0.25
    logits[..., 90:] = logits[..., 90:].masked_fill(torch.ones(150, 150, dtype=torch.bool).triu(1), float("-inf"))
    lse = _logsumexp(q, keys, 90, 0.25, fused=fused)
    assert torch.allclose(lse, torch.logsumexp(logits, dim=-1), atol=1e-5)


def test_global_selection_shares_the_budget_and_keeps_a_floor():
    # two units (heads), eight entries each; unit 0 scores high everywhere
    scores = torch.tensor([[[9.0, 8, 7, 6, 5, 4, 3, 2], [1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0]]])
    real = torch.ones_like(scores, dtype=torch.bool)
    none = torch.zeros_like(real)
    keep = keep_global(scores, real, none, [8], [0])
    assert keep.sum(-1).tolist() == [[8, 0]]  # the budget of both goes where the scores are
    keep = keep_global(scores, real, none, [8], [2])
    assert keep[0, 1].nonzero().flatten().tolist() == [0, 1] and keep[0, 0].sum() == 6  # a floor of 2 for unit 1
    must = none.clone()
    must[0, 1, 7] = True  # an always-kept entry (a sink) counts first
    keep = keep_global(scores, real, must, [4], [0])
    assert keep[0, 1].nonzero().flatten().tolist() == [7] and keep[0, 0].nonzero().flatten().tolist() == [0, 1, 2]
    # per row: another row with padding in front and its own total
    rows = torch.cat([scores, scores])
    real = torch.ones_like(rows, dtype=torch.bool)
    real[1, :, :3] = False
    keep = keep_global(rows, real, torch.zeros_like(real), [8, 3], [0, 0])
    assert keep[1].nonzero().tolist() == [[0, 3], [0, 4], [0, 5]]


def test_chunk_scores_by_hand():
    s = torch.tensor([[float("inf"), 2.0, 4.0, 0.0, 1.0]])
    # the sink is not in any chunk: chunks of 2 from the first other entry: [2, 4] -> 6, [0, 1] -> 1
    assert chunk_scores(s, torch.isfinite(s), 2).tolist() == [[float("inf"), 6.0, 6.0, 1.0, 1.0]]


def prompt(tok, n=160):
    return tok.decode(token_ids(tok, n, seed=41)[0])


def test_the_reconstruction_leaves_no_trace_in_the_cache():
    model, tok = tiny("tiny-llama")
    ids = tok(prompt(tok), return_tensors="pt").input_ids
    engine = Engine(model, tokenizer=tok)
    engine.prefill(ids)
    before = [tuple(t.clone() for t in c.held()) for c in engine.cache.layers]
    seen = []
    engine.probe(ids[:, :20], 0, lambda view, query, key: seen.append((view.index, tuple(query.shape))))
    assert seen == [(i, (1, 4, 20, 16)) for i in range(4)]
    for (k, v, p), cache in zip(before, engine.cache.layers, strict=True):
        assert all(torch.equal(a, b) for a, b in zip((k, v, p), cache.held(), strict=True))
    assert engine.next_pos.tolist() == [ids.shape[1]]


def test_forks_of_one_prefill_share_the_reconstruction(monkeypatch):
    model, tok = tiny("tiny-llama")
    ids = tok(prompt(tok), return_tensors="pt").input_ids
    calls = []
    reconstruct = KVzip._reconstruct
    monkeypatch.setattr(KVzip, "_reconstruct", lambda self, *a: calls.append(1) or reconstruct(self, *a))

    def alone(method):
        engine = Engine(model, method, tokenizer=tok)
        engine.prefill(ids)
        return [c.held()[2].clone() for c in engine.cache.layers]

    def forked(parent, method):
        return [c.held()[2].clone() for c in parent.fork(method, {}).cache.layers]

    parent = Engine(model, None, tokenizer=tok)
    parent.prefill(ids)
    sweep = [forked(parent, KVzip(budget=b, chunk_size=64, heads=h)) for b, h in ((0.1, "per-head"), (0.3, "shared"))]
    assert len(calls) == 1  # budgets and head layouts choose from one reconstruction
    assert all(torch.equal(a, b) for a, b in zip(sweep[0], alone(KVzip(budget=0.1, chunk_size=64)), strict=True))
    assert len(calls) == 2  # a prefill of its own reconstructs again: no state outlives a prefill
    forked(parent, KVzip(budget=0.1, chunk_size=64, sinks=2))  # a scoring field: reconstructed again
    forked(parent, KVzip(budget=0.1, chunk_size=32))
    assert len(calls) == 4
    parent.prefill(tok(" and more", add_special_tokens=False, return_tensors="pt").input_ids, compress=False)
    forked(parent, KVzip(budget=0.1, chunk_size=64))  # a new prefill: a new memo
    assert len(calls) == 5


def test_kvzip_keeps_its_budget_over_all_layers_and_heads_non_uniformly():
    model, tok = tiny("tiny-llama")
    ids = tok(prompt(tok), return_tensors="pt").input_ids
    n = ids.shape[1]
    engine = Engine(model, KVzip(budget=0.25, chunk_size=64), tokenizer=tok)
    engine.prefill(ids)
    counts = torch.stack([c.live()[0] for c in engine.cache.layers])  # (layers, Hkv)
    assert int(counts.sum()) == round(0.25 * n) * 4 * 2
    assert len(set(counts.flatten().tolist())) > 1  # layers and heads get different shares
    for cache in engine.cache.layers:  # the sinks are always kept
        assert all(set(range(4)) <= set(cache.held()[2][0, h].tolist()) for h in range(2))
    # with a floor of 1, every head keeps exactly its even share
    engine = Engine(model, KVzip(budget=0.25, chunk_size=64, floor=1.0), tokenizer=tok)
    engine.prefill(ids)
    assert {int(c) for cache in engine.cache.layers for c in cache.live()[0]} == {round(0.25 * n)}


def test_shared_heads_and_whole_chunks():
    model, tok = tiny("tiny-llama")
    ids = tok(prompt(tok), return_tensors="pt").input_ids
    engine = Engine(model, KVzip(budget=0.25, chunk_size=64, heads="shared"), tokenizer=tok)
    engine.prefill(ids)
    for cache in engine.cache.layers:
        pos = cache.held()[2][0]
        assert torch.equal(pos[0], pos[1])  # one set of positions per layer
    engine = Engine(model, KVzip(budget=0.25, chunk_size=64, chunk=8, sinks=0), tokenizer=tok)
    engine.prefill(ids)
    n = ids.shape[1]
    partial = 0
    for cache in engine.cache.layers:
        for head in range(2):
            held = [p for p in cache.held()[2][0, head].tolist() if p >= 0]
            for c in {p // 8 for p in held}:
                partial += sum(p // 8 == c for p in held) < min(8, n - 8 * c)
    assert partial <= 1  # whole chunks everywhere, one possibly cut to the exact count


@pytest.mark.parametrize("kwargs", [{}, {"score_every": 2}, {"heads": "shared"}])
def test_kvzip_through_generate_with_context(kwargs):
    model, tok = tiny("tiny-llama")
    question = "What is described above?"
    res = sg.generate(
        model,
        tok,
        question,
        method=sg.method("kvzip", budget=0.3, chunk_size=48, **kwargs),
        context=prompt(tok),
        max_new_tokens=8,
        ignore_eos=True,
    )
    assert len(res.token_ids[0]) == 8 and res.kv_bytes_decode < res.kv_bytes


def test_kvzip_refuses_bad_settings_and_needs_room_to_reconstruct():
    with pytest.raises(sg.SqueezegenError, match="heads"):
        sg.method("kvzip", heads="some")
    with pytest.raises(sg.SqueezegenError, match="floor"):
        sg.method("kvzip", floor=2.0)
    model, tok = tiny("tiny-llama")
    engine = Engine(model, KVzip(budget=0.5))
    with pytest.raises(sg.SqueezegenError, match="tokenizer"):
        engine.prefill(tok(prompt(tok), return_tensors="pt").input_ids)


@pytest.mark.parametrize(
    "method",
    [
        lambda: sg.method("snapkv", budget=0.25, window=8, adaptive=True),
        lambda: sg.method("kvzip", budget=0.25, chunk_size=64),
    ],
)
def test_uneven_heads_get_buffers_of_their_own(monkeypatch, method):
    """Head-adaptive budgets save memory for real: each head holds its own count (+ the decode
    room), and attention head by head gives the tokens of the padded layout."""
    model, tok = tiny("tiny-llama")
    texts = [prompt(tok, 160), prompt(tok, 90)]
    split = sg.generate(model, tok, texts, method=method(), max_new_tokens=6, ignore_eos=True)
    engine = Engine(model, method(), reserve=5, tokenizer=tok)
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    engine.prefill(enc.input_ids, enc.attention_mask)
    layers = [(isinstance(c, HeadSplitCache), c.live().amax(0).tolist()) for c in engine.cache.layers]
    assert any(split for split, _ in layers)
    engine.decode(torch.tensor([5, 5]))
    per_slot = 2 * 2 * 16 * 4  # keys + values, two rows, head_dim 16, fp32
    # a split layer holds each head's most (over rows) + the room for 5 steps; another, its largest
    # head's count for every head
    slots = sum(sum(n + 5 for n in heads) if split else len(heads) * (max(heads) + 5) for split, heads in layers)
    assert engine.cache.decode_bytes == slots * per_slot
    monkeypatch.setattr("squeezegen.runtime.engine.SPLIT_PADDING", 1.0)
    padded = sg.generate(model, tok, texts, method=method(), max_new_tokens=6, ignore_eos=True)
    assert split.token_ids == padded.token_ids
    assert split.kv_bytes_decode < padded.kv_bytes_decode


def test_adaptive_budgets_by_hand():
    from squeezegen.methods.selection import adaptive_keep

    # KV head 0's scores dwarf head 1's: beyond the window (1) and a floor of half the even share
    # (2 of 4), head 0 takes the pooled budget of 2 x 4
    s = torch.tensor([[[9.0, 8, 7, 6, 5, 4, 3, 0], [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0]]])
    real = torch.ones_like(s, dtype=torch.bool)
    index = adaptive_keep(s, real, [4], [1], floor=0.5)
    kept = [[i for i in head if i >= 0] for head in index[0].tolist()]
    assert kept == [[0, 1, 2, 3, 4, 7], [0, 7]]
