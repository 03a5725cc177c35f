"""FastKV and GemFilter: hand-built selections, original positions after propagation, refill.

The scoring tests use keys that carry a score `a_j` in dimension 0 and queries 1/scaling there,
so every query's attention over keys 0..i is softmax(a[0..i]) and its ranking is a's ranking.
The engine tests recompute FastKV's choices independently from the HF modules of a tiny model.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import squeezegen as sg
from squeezegen.errors import SqueezegenError
from squeezegen.evals.corpus import prose
from squeezegen.methods.fastkv import FastKV, tsp_index
from squeezegen.methods.gemfilter import GemFilter, filter_index
from squeezegen.runtime.engine import Engine

from .conftest import TINY, tiny
from .test_baselines import kept

H, HKV, D = 4, 2, 16  # tiny-llama


def token_ids(tok, n: int, seed: int = 0) -> torch.Tensor:
    """(1, n) ids of real prose."""
    return torch.tensor([tok(prose(tok, n + 400, seed=seed)).input_ids[:n]])


def tsp(scores, counts, window, chunk=0, real=None):
    real = torch.ones(scores.shape[0], scores.shape[-1], dtype=torch.bool) if real is None else real
    return tsp_index(scores, real, counts, window, chunk).tolist()


def test_tsp_sums_kv_heads_and_keeps_the_window():
    scores = torch.tensor([[[0, 5, 0, 0, 1, 0, 0, 0], [0, 0, 3, 2, 0, 0, 0, 0.0]]])
    # summed over KV heads: [0, 5, 3, 2, 1, 0, 0, 0]; 2 best of positions 0..5 plus window {6, 7}
    assert tsp(scores, [4], 2) == [[1, 2, 6, 7]]
    assert tsp(scores, [5], 2) == [[1, 2, 3, 6, 7]]
    # with chunk=2 the chunks {0,1}: 5, {2,3}: 5, {4,5}: 1 tie; whole chunks are taken
    chunked = torch.tensor([[[0, 5, 0, 0, 1, 0, 0, 0], [0, 0, 1, 4, 0, 0, 0, 0.0]]])
    assert tsp(chunked, [6], 2, chunk=2) == [[0, 1, 2, 3, 6, 7]]
    assert tsp(chunked, [4], 2) == [[1, 3, 6, 7]]
    # per row of a batch
    batch = torch.stack([scores[0], scores[0].flip(0)])
    assert tsp(batch, [3, 3], 1) == [[1, 2, 7], [1, 2, 7]]
    assert tsp(torch.stack([scores[0], scores[0] * 0 + torch.arange(8)]), [3, 3], 1) == [[1, 2, 7], [5, 6, 7]]
    # a row passing fewer tokens (a shorter prompt behind left padding) gets -1 first
    real = torch.tensor([[True] * 8, [False] * 3 + [True] * 5])
    assert tsp(torch.stack([scores[0], scores[0]]), [4, 2], 2, real=real) == [[1, 2, 6, 7], [-1, -1, 6, 7]]


def test_fastkv_keeps_its_own_entries_per_kv_head():
    a = [[0, 5, 0, 0, 3, 0, 0, 0], [0, 0, 5, 0, 0, 3, 0, 0]]
    assert kept(FastKV(budget=4, window=2, kernel=1), a) == [[1, 4, 6, 7], [2, 5, 6, 7]]
    # max pooling (kernel 3) spreads each peak over its neighbours, per KV head
    a = [[0, 5, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 4, 0, 0, 0, 0]]
    assert kept(FastKV(budget=5, window=2, kernel=3), a) == [[0, 1, 2, 8, 9], [4, 5, 6, 8, 9]]


def manual_window_scores(model, ids, layer, window, kernel):
    """FastKV's per-KV-head scores at `layer`, recomputed from the HF modules: (Hkv, n)."""
    n = ids.shape[1]
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[layer]
        block = model.model.layers[layer]
        x = block.input_layernorm(hidden)
        q = block.self_attn.q_proj(x).view(1, n, H, D).transpose(1, 2)
        k = block.self_attn.k_proj(x).view(1, n, HKV, D).transpose(1, 2)
        cos, sin = model.model.rotary_emb(hidden, torch.arange(n)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        logits = q[:, :, -window:] @ k.repeat_interleave(H // HKV, dim=1).transpose(-1, -2) * D**-0.5
        later = torch.arange(n)[None] > torch.arange(n - window, n)[:, None]
        probs = logits.masked_fill(later, float("-inf")).softmax(-1).sum(dim=2)  # (1, H, n)
        pooled = F.max_pool1d(probs, kernel, stride=1, padding=kernel // 2)
        return pooled.view(HKV, H // HKV, n).sum(dim=1)


class RecordingFastKV(FastKV):
    def propagate(self, view, hidden):
        keep = super().propagate(view, hidden)
        if keep is not None:
            view.state.propagated = keep
        return keep


def propagated(engine):
    return engine.state_of(engine.method).propagated


def best(scores, k):
    """The k best positions, ties to the earlier one."""
    return scores.sort(descending=True, stable=True).indices[:k].tolist()


def test_fastkv_propagates_and_keeps_what_the_scores_say():
    model, tok = tiny("tiny-llama")
    ids = token_ids(tok, 80)
    n = ids.shape[1]
    fastkv = RecordingFastKV(budget=12, tsp_len=24, tsp_layer=1, window=4, kernel=3)
    engine = Engine(model, fastkv)
    engine.prefill(ids)

    scores = manual_window_scores(model, ids, 1, window=4, kernel=3)
    recent = list(range(n - 4, n))
    total = scores.sum(0)[: n - 4]
    expected_tsp = sorted(best(total, 24 - 4) + recent)
    assert propagated(engine)[0].tolist() == expected_tsp
    for head in range(HKV):  # layer 1 keeps its own 12 entries per KV head, out of all n tokens
        expected = sorted(best(scores[head, : n - 4], 12 - 4) + recent)
        assert engine.cache.layers[1].held()[2][0, head].tolist() == expected
    # every layer keeps 12 (a count of the prompt); after TSP they come from the propagated tokens
    assert engine.cache.lengths() == [12] * 4
    for layer in (2, 3):
        pos = engine.cache.layers[layer].held()[2][0]
        assert set(pos.flatten().tolist()) <= set(expected_tsp)
        assert pos[:, -4:].tolist() == [recent] * HKV
    assert engine.next_pos.tolist() == [n]


def test_propagated_tokens_keep_their_original_positions():
    """FastKV's prefill logits equal HF layers run on the propagated hidden states at their
    original positions, and differ from the same tokens renumbered 0..T-1."""
    model, tok = tiny("tiny-llama")
    ids = token_ids(tok, 60, seed=3)
    fastkv = RecordingFastKV(budget=8, tsp_len=16, tsp_layer=1, window=4)
    engine = Engine(model, fastkv)
    logits = engine.prefill(ids)
    keep = propagated(engine)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[2][:, keep[0]]
        for positions, should_match in ((keep, True), (torch.arange(16)[None], False)):
            h = hidden
            for layer in model.model.layers[2:]:
                h = layer(h, position_ids=positions, position_embeddings=model.model.rotary_emb(h, positions))
            reference = model.lm_head(model.model.norm(h[:, -1]))
            assert torch.allclose(logits, reference, atol=1e-4) == should_match
    # decoding continues after the last original position
    engine.decode(logits.argmax(-1))
    assert engine.cache.layers[3].held()[2][0, :, -1].tolist() == [ids.shape[1]] * HKV


@pytest.mark.parametrize("name", TINY)
def test_fastkv_with_everything_kept_is_token_identical_to_full(name):
    model, tok = tiny(name)
    prompt = tok.decode(token_ids(tok, 120, seed=1)[0])
    full = sg.generate(model, tok, prompt, max_new_tokens=20, ignore_eos=True)
    fastkv = sg.method("fastkv", tsp_rate=1.0, retain_rate=1.0)
    same = sg.generate(model, tok, prompt, method=fastkv, max_new_tokens=20, ignore_eos=True)
    assert same.token_ids == full.token_ids
    # and a real setting on the same prompt changes the cache, so the test above can fail
    small = sg.generate(model, tok, prompt, method=sg.method("fastkv", tsp_rate=0.3, retain_rate=0.2), max_new_tokens=1)
    assert max(small.cache_lengths) < max(full.cache_lengths)


def test_fastkv_rows_of_a_batch_select_independently():
    model, tok = tiny("tiny-qwen3")
    rows = torch.cat([token_ids(tok, 50, seed=s) for s in (4, 5)])
    fastkv = RecordingFastKV(tsp_rate=0.5, retain_rate=0.25, window=4)
    batch = Engine(model, fastkv)
    logits = batch.prefill(rows)
    for i in range(2):
        single = Engine(model, fastkv)
        assert torch.allclose(logits[i], single.prefill(rows[i : i + 1])[0], atol=1e-5)
        assert propagated(batch)[i].tolist() == propagated(single)[0].tolist()
        for a, b in zip(batch.cache.layers, single.cache.layers, strict=True):
            assert a.held()[2][i].tolist() == b.held()[2][0].tolist()
    assert propagated(batch)[0].tolist() != propagated(batch)[1].tolist()


def test_padded_rows_spend_their_budget_on_their_own_tokens():
    model, tok = tiny("tiny-llama")
    texts = [tok.decode(token_ids(tok, n, seed=s)[0]) for n, s in ((70, 6), (40, 7))]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    lengths = enc.attention_mask.sum(-1).tolist()
    assert lengths[1] < lengths[0]
    for m, budgets in (
        (sg.method("fastkv", tsp_rate=0.5, retain_rate=0.25, window=4), [round(0.25 * n) for n in lengths]),
        (sg.method("streaming_llm", budget=8), [8, 8]),
    ):
        engine = Engine(model, m)
        engine.prefill(enc.input_ids, enc.attention_mask)
        for cache in engine.cache.layers:  # each row holds its own budget of real entries, per head
            assert cache.live().tolist() == [[b] * HKV for b in budgets]


def test_constant_mode_and_parameter_errors():
    model, tok = tiny("tiny-llama")
    ids = token_ids(tok, 60, seed=2)
    engine = Engine(model, RecordingFastKV(max_capacity=10, tsp_len=20, tsp_layer=2))
    engine.prefill(ids)
    assert propagated(engine).shape == (1, 20)
    assert engine.cache.lengths() == [10] * 4
    # proportional mode: every layer keeps retain_rate of the prompt, also after propagation
    engine = Engine(model, RecordingFastKV(tsp_rate=0.5, retain_rate=0.25, tsp_layer=1))
    engine.prefill(ids)
    assert propagated(engine).shape == (1, 30)
    assert engine.cache.lengths() == [15] * 4
    # constant mode as in the reference: 2048 tokens propagated unless told otherwise, and a
    # prompt shorter than the capacity keeps its whole cache
    assert sg.method("fastkv", max_capacity=16).tsp_len == 2048
    engine = Engine(model, RecordingFastKV(max_capacity=500))
    engine.prefill(ids)
    assert propagated(engine).shape == (1, 60) and engine.cache.lengths() == [60] * 4
    with pytest.raises(SqueezegenError, match="out of range for a 4-layer model"):
        Engine(model, sg.method("fastkv", tsp_layer=4)).prefill(ids)
    with pytest.raises(SqueezegenError, match="not both"):
        sg.method("fastkv", retain_rate=0.1, max_capacity=512)
    with pytest.raises(SqueezegenError, match="tsp_rate"):
        sg.method("fastkv", tsp_rate=1.5)


def test_default_layers_follow_the_reference_depths():
    def engine(layers, sliding=()):
        types = ["sliding_attention" if i in sliding else "full_attention" for i in range(layers)]
        return SimpleNamespace(num_layers=layers, layer_types=types)

    # the reference's TSP layers 15/32, 17/36, 19/40; GemFilter's 13/32
    assert [FastKV().tsp_at(engine(n)) for n in (32, 36, 40, 30)] == [15, 17, 19, 14]
    assert GemFilter().filter_at(engine(32)) == 13
    # Gemma-3 style: five sliding layers per global one; decide on the nearest global layer
    gemma = engine(18, sliding={i for i in range(18) if i % 6 != 5})
    assert FastKV().tsp_at(gemma) == 5 and GemFilter().filter_at(gemma) == 5


def test_gemfilter_scores_by_the_last_query_summed_over_heads():
    query = torch.zeros(1, H, 3, D)
    query[:, :, -1, 0] = 1.0
    query[:, :, :-1, 0] = -7.0  # earlier queries must not matter
    key = torch.zeros(1, HKV, 8, D)
    key[0, 0, :, 0] = torch.tensor([0, 4, 0, 0.5, 0, 1, 0, 0])
    key[0, 1, :, 0] = torch.tensor([0, -3, 2, 0, 0, 1, 0, 0.0])  # sum: [0, 1, 2, .5, 0, 2, 0, 0]
    pos = torch.arange(8)[None, None]
    assert filter_index(query, key, pos, [3], kernel=1).tolist() == [[1, 2, 5]]
    # averaging over 3 neighbours: [.33, 1, 1.17, .83, .83, .67, .67, 0] -> 1 and 2 lead
    assert filter_index(query, key, pos, [2], kernel=3).tolist() == [[1, 2]]
    assert filter_index(query, key, pos, [8], kernel=1).tolist() == [list(range(8))]
    # left padding is never chosen
    padded = torch.tensor([[[-1, -1, 2, 3, 4, 5, 6, 7]]])
    assert filter_index(query, key, padded, [3], kernel=1).tolist() == [[2, 3, 5]]


class RecordingGemFilter(GemFilter):
    def refill(self, view):
        keep = super().refill(view)
        if keep is not None:
            view.engine.recorded_refill = keep
        return keep


def test_gemfilter_prefills_the_selected_tokens_alone():
    model, tok = tiny("tiny-llama")
    ids = token_ids(tok, 60, seed=8)
    gem = RecordingGemFilter(budget=20, layer=1)
    engine = Engine(model, gem)
    logits = engine.prefill(ids)
    keep = engine.recorded_refill
    assert keep.shape == (1, 20) and engine.cache.lengths() == [20] * 4
    assert engine.next_pos.tolist() == [20]  # the short prompt is a new sequence 0..19
    alone = Engine(model)
    assert torch.allclose(logits, alone.prefill(ids[:, keep[0]]), atol=1e-5)
    ours = sg.generate(model, tok, tok.decode(ids[0]), method=gem, max_new_tokens=10, ignore_eos=True)
    assert ours.cache_lengths == [20 + 9] * 4


@pytest.mark.parametrize("name", TINY)
def test_gemfilter_equals_the_full_model_on_the_kept_tokens_for_every_architecture(name):
    model, tok = tiny(name)
    ids = token_ids(tok, 90, seed=10)
    engine = Engine(model, RecordingGemFilter(budget=0.5))
    logits = engine.prefill(ids)
    keep = engine.recorded_refill
    assert keep.shape == (1, 45)
    assert torch.allclose(logits, Engine(model).prefill(ids[:, keep[0]]), atol=1e-5)


def test_gemfilter_compresses_only_a_first_chunk():
    model, tok = tiny("tiny-llama")
    ids = token_ids(tok, 40, seed=9)
    engine = Engine(model, GemFilter(budget=10, layer=1))
    engine.prefill(ids[:, :20], compress=False)
    with pytest.raises(SqueezegenError, match="first prefill chunk"):
        engine.prefill(ids[:, 20:])
    # a context compressed first, the question appended after: fine
    context = tok.decode(token_ids(tok, 40)[0])
    res = sg.generate(model, tok, "What is it?", method=GemFilter(budget=10, layer=1), context=context)
    assert res.cache_lengths[0] >= 10
