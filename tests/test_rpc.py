"""RPC: the compression schedule on a hand-worked example, what it keeps, positions, c = 1."""

import pytest
import torch

import squeezegen as sg
from squeezegen.errors import SqueezegenError
from squeezegen.methods.rpc import RPC
from squeezegen.methods.scoring import window_scores
from squeezegen.runtime.engine import Engine

from .conftest import TINY, tiny
from .test_fastkv import token_ids

H, HKV, D = 4, 2, 16  # tiny-llama


def run(method, prompt_len=20, generated=0, model_name="tiny-llama", batch=1):
    """An engine after a prompt and `generated` decode steps, with the cache length after each."""
    model, tok = tiny(model_name)
    ids = torch.cat([token_ids(tok, prompt_len, seed=s) for s in range(batch)])
    engine = Engine(model, method, reserve=generated)
    token = engine.prefill(ids).argmax(-1)
    lengths = []
    for _ in range(generated):
        token = engine.decode(token).argmax(-1)
        lengths.append(engine.cache.lengths()[0])
    return engine, lengths


def test_schedule_by_hand():
    # P=8, R=2, c=4: first compression after 8 + 2 generated tokens, then every 8;
    # the m-th leaves the prompt (20) + m * 8 / 4 selected + the 2 newest
    _, lengths = run(RPC(P=8, R=2, c=4, kernel=1), generated=27)
    expected = []
    for g in range(1, 28):
        if g < 10:
            expected.append(20 + g)
        else:
            m = (g - 2) // 8
            expected.append(20 + 2 * m + 2 + (g - 2 - 8 * m))
    assert expected[9] == 20 + 2 + 2 and expected[17] == 20 + 4 + 2 and expected[25] == 20 + 6 + 2
    assert lengths == expected


def test_prompt_and_recent_window_kept_positions_true():
    engine, _ = run(RPC(P=8, R=3, c=4, kernel=1), generated=19, batch=2)
    for cache in engine.cache.layers:
        for row in range(2):
            for head in range(HKV):
                held = sorted(p for p in cache.pos[row, head].tolist() if p >= 0)
                assert len(held) == 20 + 4 + 3  # after the 2nd compression (at 19 generated) + 0 more
                assert held[:20] == list(range(20))  # the whole prompt
                assert held[-3:] == [36, 37, 38]  # the 3 newest
                assert all(20 <= p < 36 for p in held[20:-3])
    assert engine.next_pos.tolist() == [39, 39]  # positions count every token, not the cache


def test_selection_by_hand():
    # keys carry a_j in dim 0 and queries 1/scaling: every selector query's renormalised attention
    # over the span is softmax(a), so the best `kept` of the span are a's largest
    a = torch.tensor([[0.0, 3, 0, 1, 5, 0], [4, 0, 0, 0, 0, 2]])  # per KV head
    keys = torch.zeros(1, HKV, 6, D)
    keys[0, :, :, 0] = a
    queries = torch.zeros(1, H, 2, D)
    queries[..., 0] = D**0.5
    span_pos, query_pos = torch.arange(6)[None, None], torch.tensor([[6, 7]])
    scores = window_scores(queries, keys, query_pos, span_pos, 2, D**-0.5)
    assert torch.allclose(scores[0, 0], 2 * a[0].softmax(-1))
    # the cache as RPC sees it: the six span entries at positions 5..10, then the two newest
    pos = torch.arange(5, 13)[None, None].expand(1, HKV, 8)
    span = pos < 11
    full_scores = torch.cat([scores, torch.zeros(1, H, 2)], dim=-1)
    grouped = RPC(P=8, R=2, c=4, kernel=1, aggregation="group").chosen(full_scores, pos, span, 6, 2)
    assert [pos[0, h][grouped[0, h]].tolist() for h in range(HKV)] == [[6, 9], [5, 10]]  # each head's top 2
    shared = RPC(P=8, R=2, c=4, kernel=1).chosen(full_scores, pos, span, 6, 2)
    mean = (2 * a.softmax(-1)).mean(0)  # the same entries for every head, by the mean over heads
    expected = sorted((mean.topk(2).indices + 5).tolist())
    assert [pos[0, h][shared[0, h]].tolist() for h in range(HKV)] == [expected] * HKV


class Snapshot(RPC):
    """RPC that records, before each compression, the layer-0 cache and the ring of queries."""

    def after_decode_step(self, engine, step):
        state = engine.state_of(self)
        cache = engine.cache.layers[0]
        before = (cache.keys.clone(), cache.pos.clone(), state.queries[0].clone())
        super().after_decode_step(engine, step)
        if not torch.equal(cache.pos, before[1]):
            self.snapshots.append((*before, engine.next_pos.item(), cache.pos.clone()))


def test_compression_keeps_an_independently_computed_set():
    rpc = Snapshot(P=8, R=2, c=4, kernel=1)
    rpc.snapshots = []
    engine, _ = run(rpc, prompt_len=20, generated=19)
    assert len(rpc.snapshots) == 2  # after 10 and 18 generated tokens
    for keys, pos, queries, next_pos, after in rpc.snapshots:
        live = {p: slot for slot, p in enumerate(pos[0, 0].tolist()) if p >= 0}  # heads agree ("all")
        span = [p for p in sorted(live) if 20 <= p < next_pos - 2]
        m = (next_pos - 20 - 2) // 8
        # by the definition: each selector query's softmax over the span keys, summed over the R
        # queries, averaged over the heads; the best m * 8 / 4 of the span survive
        total = torch.zeros(len(span))
        for head in range(H):
            k = keys[0, head // (H // HKV), [live[p] for p in span]]
            total += (queries[0, head] @ k.T * D**-0.5).softmax(-1).sum(0)
        expected = {span[i] for i in total.topk(m * 2).indices.tolist()}
        kept = {p for p in after[0, 0].tolist() if p >= 0}
        assert kept == set(range(20)) | expected | set(range(next_pos - 2, next_pos))


@pytest.mark.parametrize("name", TINY)
def test_c_equal_one_is_token_identical_to_full(name):
    model, tok = tiny(name)
    prompt = tok.decode(token_ids(tok, 30, seed=3)[0])
    full = sg.generate(model, tok, prompt, max_new_tokens=40, ignore_eos=True)
    same = sg.generate(model, tok, prompt, method=sg.method("rpc", P=8, R=4, c=1), max_new_tokens=40, ignore_eos=True)
    assert same.token_ids == full.token_ids
    squeezed = sg.generate(model, tok, prompt, method=sg.method("rpc", P=8, R=4, c=4), max_new_tokens=40)
    assert max(squeezed.cache_lengths) < max(full.cache_lengths)


def test_bad_parameters():
    with pytest.raises(SqueezegenError, match="multiple of c"):
        sg.method("rpc", P=10, c=4)
    with pytest.raises(SqueezegenError, match="aggregation"):
        sg.method("rpc", aggregation="heads")


def test_fastkv_prefill_composes_with_rpc_decode():
    both = sg.Compose(prefill=sg.method("fastkv", max_capacity=8, tsp_len=12, window=4), decode=RPC(P=8, R=2))
    engine, lengths = run(both, prompt_len=30, generated=10)
    # FastKV leaves 8 prompt entries per layer; RPC then keeps them whole and compresses what follows
    assert lengths[:9] == [8 + g for g in range(1, 10)]
    assert lengths[9] == 8 + 2 + 2
    assert engine.cache.lengths() == [12] * 4
    assert engine.next_pos.tolist() == [40]


def test_reasoning_needle_forces_the_path_through_the_decode_schedule():
    from squeezegen.evals.reasoning import answer_after_path, make_reasoning_sample

    model, tok = tiny("tiny-llama")
    sample = make_reasoning_sample(tok, 120, seed=1)
    assert sample.answer in sample.path and sample.path.index(sample.answer) < len(sample.path) // 2
    assert make_reasoning_sample(tok, 120, seed=1) == sample and make_reasoning_sample(tok, 120, seed=2) != sample
    full, engine_full = answer_after_path(model, tok, sample, max_new_tokens=6)
    same, _ = answer_after_path(model, tok, sample, sg.method("rpc", P=16, R=4, c=1), max_new_tokens=6)
    assert same == full
    _, engine = answer_after_path(model, tok, sample, sg.method("rpc", P=16, R=4, c=4), max_new_tokens=6)
    pos = engine.cache.layers[0].pos[0, 0]
    generated = engine.decode_steps
    m = (generated - 4) // 16
    expected = engine_full.cache.lengths()[0] - generated + m * 4 + 4 + (generated - 4 - 16 * m)
    assert engine.cache.lengths() == [expected] * 4 and int(pos.max()) == engine.next_pos.item() - 1
