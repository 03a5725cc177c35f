"""Each baseline's selection on small hand-built tensors: which entries survive, per KV head.

Keys carry a score `a_j` in dimension 0 and queries 1/scaling there, so q.k * scaling = a_j for
every query: the attention of any query over keys 0..i is softmax(a[0..i]).
"""

import pytest
import torch

from squeezegen.errors import SqueezegenError
from squeezegen.methods import method
from squeezegen.runtime.engine import Engine

from .conftest import tiny

H, HKV, D = 4, 2, 16  # tiny-llama
SCALE = D**-0.5


def setup(a_per_kv_head, method_obj, n_queries=None):
    """An engine whose layer 0 holds keys with the given scores; returns (engine, q, k, v)."""
    model, _ = tiny("tiny-llama")
    engine = Engine(model, method_obj)
    a = torch.tensor(a_per_kv_head, dtype=torch.float32)  # (Hkv, n)
    n = a.shape[1]
    k = torch.zeros(1, HKV, n, D)
    k[0, :, :, 0] = a
    v = torch.randn(1, HKV, n, D)
    q = torch.zeros(1, H, n_queries or n, D)
    q[..., 0] = 1 / SCALE
    engine.positions = torch.arange(n)[None]
    engine.cache.layers[0].append(k, v, engine.positions)
    return engine, q, k, v


def kept(method_obj, a, layer=0):
    engine, q, k, v = setup(a, method_obj)
    idx = method_obj.select_cache(engine, layer, q, k, v)
    return None if idx is None else idx[0].tolist()


def test_snapkv_keeps_window_plus_what_the_window_attends_per_kv_head():
    a = [[0, 5, 0, 0, 3, 0, 0, 0], [0, 0, 5, 0, 0, 3, 0, 0]]
    snap = method("snapkv", budget=4, window=2, kernel=1)
    assert kept(snap, a) == [[1, 4, 6, 7], [2, 5, 6, 7]]
    # pooling spreads a peak to its neighbours: avg kernel 3 makes 0 and 2 tie-break against 4
    assert kept(method("snapkv", budget=5, window=2, kernel=3), a)[0][:3] == [0, 1, 2]


def test_snapkv_with_chunks_keeps_whole_chunks():
    a = [[0, 5, 0, 0, 2, 2, 0, 0], [0, 5, 0, 0, 2, 2, 0, 0]]
    # chunks of 2 over positions 0..5: {0,1} holds the 5, {4,5} the two 2s
    chunked = method("snapkv", budget=6, window=2, kernel=1, chunk=2)
    assert kept(chunked, a) == [[0, 1, 4, 5, 6, 7]] * 2
    plain = method("snapkv", budget=4, window=2, kernel=1)
    assert kept(plain, a)[0] in ([1, 4, 6, 7], [1, 5, 6, 7])


def test_streaming_llm_keeps_sinks_and_recent():
    a = [[9, 9, 9, 9, 9, 9, 9, 9]] * 2
    assert kept(method("streaming_llm", budget=4, sinks=2), a) == [[0, 1, 6, 7]] * 2


def test_pyramidkv_budgets_fall_linearly_and_average_to_the_flat_budget():
    pyramid = method("pyramidkv", budget=20, window=4, beta=4)
    model, _ = tiny("tiny-llama")
    engine = Engine(model, pyramid)
    budgets = [pyramid.layer_budget(engine, layer, 100) for layer in range(4)]
    # non-window part 16: low 16/4 = 4, high 2*16 - 4 = 28, step 8 -> 28, 20, 12, 4 (+ window 4)
    assert budgets == [32, 24, 16, 8]
    assert sum(budgets) == 4 * 20


def naive_column_sums(a):
    n = len(a)
    sums = [0.0] * n
    for i in range(n):
        weights = torch.tensor(a[: i + 1]).softmax(0)
        for j in range(i + 1):
            sums[j] += weights[j].item()
    return sums


def test_h2o_keeps_heavy_hitters_and_recent():
    a = [[2.0, 0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0, 0.0, 0.0]]
    h2o = method("h2o", budget=3, window=1)
    sums = naive_column_sums(a[0])
    # head 0: key 0 is seen by every query with the biggest weight, key 3 next among 0..4;
    # head 1: key 0 still collects the early queries' whole weight, then key 2
    assert sorted(range(5), key=lambda j: -sums[j])[:2] == [0, 3]
    assert sorted(range(5), key=lambda j: -naive_column_sums(a[1])[j])[:2] == [2, 0]
    assert kept(h2o, a) == [[0, 3, 5], [0, 2, 5]]
    engine, q, k, v = setup(a, h2o)
    h2o.select_cache(engine, 0, q, k, v)
    held = engine.state["h2o"][0]  # scores of the kept entries, carried into decoding
    assert torch.allclose(held[0, 0], torch.tensor([sums[0], sums[3], sums[5]]), atol=1e-5)


def test_tova_uses_the_last_query_only_shared_by_all_heads():
    # last query: KV head 0 prefers key 1, KV head 1 prefers key 2 more strongly -> mean picks 2 first
    a = [[0.0, 3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 1.0, 0.0]]
    assert kept(method("tova", budget=3), a) == [[1, 2, 4]]


def test_tova_evicts_the_least_attended_entry_each_decode_step():
    model, tok = tiny("tiny-llama")
    ids = tok("one two three four five six seven eight nine ten eleven twelve", return_tensors="pt").input_ids
    tova = method("tova", budget=6)
    engine = Engine(model, tova, reserve=4)
    engine.prefill(ids)
    assert engine.cache.lengths() == [6] * 4
    before = engine.cache.layers[1].view()[2][0, 0].tolist()
    engine.decode(torch.tensor([42]))
    after = engine.cache.layers[1].view()[2][0, 0].tolist()
    assert len(after) == 6 and ids.shape[1] in after  # the new token is in, one old entry is out
    assert len(set(before) - set(after)) == 1


def test_h2o_and_streaming_stay_at_budget_while_decoding():
    model, tok = tiny("tiny-llama")
    prompt = "A river carries water, sand and stories from the hills down to the wide grey sea. " * 2
    for name in ("h2o", "streaming_llm"):
        res = __import__("squeezegen").generate(
            model, tok, prompt, method=method(name, budget=10), max_new_tokens=12, ignore_eos=True
        )
        assert res.cache_lengths == [10] * 4, name


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "streaming_llm", "h2o", "tova"])
def test_full_budget_prefill_keeps_everything(name):
    a = [[float(x % 3) for x in range(12)]] * 2
    assert kept(method(name, budget=1.0), a) is None  # (PyramidKV: layer 0; deeper layers keep less)


def test_bad_parameters_are_named():
    with pytest.raises(SqueezegenError, match="no parameter bogus"):
        method("snapkv", bogus=1)
    with pytest.raises(SqueezegenError, match="pooling"):
        method("snapkv", pooling="median")
    with pytest.raises(SqueezegenError, match=r"\(0, 1\]"):
        method("snapkv", budget=2.5)
    model, tok = tiny("tiny-llama")
    with pytest.raises(SqueezegenError, match="larger than the"):
        __import__("squeezegen").generate(model, tok, "short prompt", method=method("snapkv", budget=4096))


def test_public_method_api():
    import squeezegen as sg

    listing = sg.methods()
    assert set(listing) == {
        "full",
        "streaming_llm",
        "snapkv",
        "pyramidkv",
        "h2o",
        "tova",
        "fastkv",
        "gemfilter",
        "rpc",
        "token_sparse",
    }
    assert "kernel_fn" not in listing["token_sparse"] and listing["token_sparse"]["tau"] == 0.005
    assert listing["fastkv"]["tsp_rate"] == 0.2 and listing["fastkv"]["window"] == 8
    assert listing["snapkv"]["window"] == 32 and listing["pyramidkv"]["beta"] == 20
    model, tok = tiny("tiny-llama")
    res = sg.generate(model, tok, "word " * 200, method=sg.method("snapkv", budget=0.25), max_new_tokens=3)
    n = res.prompt_lengths[0]
    assert res.cache_lengths == [round(0.25 * n) + 2] * 4
    counted = sg.generate(model, tok, "word " * 200, method=sg.method("snapkv", budget=64), max_new_tokens=3)
    assert counted.cache_lengths == [64 + 2] * 4
