"""RPC: the compression schedule on a hand-worked example, what it keeps, positions, c = 1."""

import pytest
import torch

import squeezegen as sg
from squeezegen.errors import SqueezegenError
from squeezegen.methods.rpc import RPC
from squeezegen.runtime.engine import Engine
from squeezegen.runtime.scoring import window_scores

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
        lengths.append(engine.cache.layers[0].length)
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
        pos = cache.view()[2]
        assert pos.shape[-1] == 20 + 4 + 3  # after the 2nd compression (at 19 generated) + 0 more
        assert (pos[..., :20] == torch.arange(20)).all()  # the whole prompt
        assert (pos[..., -3:] == torch.arange(36, 39)).all()  # the 3 newest: positions 36..38
        kept = pos[..., 20:-3]
        assert ((kept >= 20) & (kept < 36)).all() and (kept.diff(dim=-1) > 0).all()
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
    grouped = RPC(P=8, R=2, c=4, kernel=1, aggregation="group").index(scores, HKV, 5, 11, 13, 2)
    assert grouped.tolist() == [[[0, 1, 2, 3, 4, 6, 9, 11, 12], [0, 1, 2, 3, 4, 5, 10, 11, 12]]]
    shared = RPC(P=8, R=2, c=4, kernel=1).index(scores, HKV, 5, 11, 13, 2)
    assert shared.shape == (1, 1, 9)  # the same entries for every head
    mean = (2 * a.softmax(-1)).mean(0)  # [.., head 0's 5 and head 1's 4 lead]
    assert shared[0, 0, 5:7].tolist() == sorted((mean.topk(2).indices + 5).tolist())


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
    pos = engine.cache.layers[0].view()[2][0, 0]
    generated = engine.decode_steps
    m = (generated - 4) // 16
    expected = engine_full.cache.lengths()[0] - generated + m * 4 + 4 + (generated - 4 - 16 * m)
    assert engine.cache.lengths() == [expected] * 4 and int(pos.max()) == engine.next_pos.item() - 1
