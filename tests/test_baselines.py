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
    engine._row_tokens = engine.chunk_lengths = [n]
    engine.cache.layers[0].append(k, v, engine.positions)
    return engine, q, k, v


def kept(method_obj, a, layer=0):
    engine, q, k, v = setup(a, method_obj)
    idx = method_obj.select_cache(engine.view(layer), q, k, v)
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
    budgets = [pyramid.layer_budget(engine.view(layer), 100, 100) for layer in range(4)]
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
    h2o.select_cache(engine.view(0), q, k, v)
    held = engine.state_of(h2o).held[0]  # scores of the kept entries, carried into decoding
    assert torch.allclose(held[0, 0], torch.tensor([sums[0], sums[3], sums[5]]), atol=1e-5)


def test_tova_uses_the_last_query_only_shared_by_all_heads():
    # last query: KV head 0 prefers key 1, KV head 1 prefers key 2 more strongly -> mean picks 2 first
    a = [[0.0, 3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 1.0, 0.0]]
    assert kept(method("tova", budget=3), a) == [[1, 2, 4]]


def decode_evictions(method_obj, prompt_scores, new_scores):
    """Prefill layer 0 with keys scoring `prompt_scores` (both KV heads alike), then run decode
    steps whose new key scores `new_scores[i]`, the query seeing q.k*scaling = score. Returns the
    positions each step evicted from KV head 0."""
    engine, q, k, v = setup([prompt_scores] * HKV, method_obj)
    n = len(prompt_scores)
    keep = method_obj.select_cache(engine.view(0), q, k, v)
    cache = engine.cache.layers[0]
    if keep is not None:
        cache.keep(keep)
    engine.cache.layers = engine.cache.layers[:1]
    engine.next_pos = torch.tensor([n])
    cache.to_static(cache.used + 1)
    method_obj.start_decode(engine)
    evicted = []
    query = torch.zeros(1, H, 1, D)
    query[..., 0] = 1 / SCALE
    for i, score in enumerate(new_scores):
        before = set(cache.pos[0, 0].tolist()) - {-1}
        new = torch.zeros(1, HKV, 1, D)
        new[..., 0] = score
        engine.positions = torch.tensor([[n + i]])
        cache.write(new, new, torch.tensor([n + i]))
        method_obj.after_decode_attention(engine.view(0), query)
        after = set(cache.pos[0, 0].tolist()) - {-1}
        assert n + i in after and len(after) == len(before)  # one in, one out
        (gone,) = before - after
        evicted.append(gone)
    return evicted


def test_tova_evicts_the_entry_the_newest_query_attends_least():
    # softmax is monotonic: each step drops the lowest-scored entry except the newest
    # step 1 (new 5.0): 0.5 at position 3; step 2 (new 0.2): 1 at position 1; step 3 (new 4.0): the
    # 0.2 of position 5, no longer the newest
    assert decode_evictions(method("tova", budget=4), [3.0, 1.0, 2.0, 0.5], [5.0, 0.2, 4.0]) == [3, 1, 5]


def naive_h2o(prompt, new, budget):
    """H2O by the definition: per entry, the attention summed over every query so far (prompt
    queries causally, then each new token); evict the lightest outside the newest budget // 2."""
    scores = list(prompt)
    held = {j: 0.0 for j in range(len(prompt))}
    for i in range(len(prompt)):  # prefill queries
        w = torch.tensor(scores[: i + 1]).softmax(0)
        for j in range(i + 1):
            held[j] += w[j].item()
    evicted = []
    for step, score in enumerate(new):
        pos = len(prompt) + step
        scores.append(score)
        held[pos] = 0.0
        live = sorted(held)
        w = torch.tensor([scores[j] for j in live]).softmax(0)
        for j, weight in zip(live, w.tolist(), strict=True):
            held[j] += weight
        candidates = [j for j in live if pos - j >= budget // 2]
        gone = min(candidates, key=lambda j: held[j])
        del held[gone]
        evicted.append(gone)
    return evicted


def test_h2o_evicts_the_lightest_accumulated_entry_each_decode_step():
    prompt, new = [2.0, 0.0, 1.0, 0.5, 0.0, 3.0], [0.0, 2.5, 0.1, 1.0, 4.0]
    expected = naive_h2o(prompt, new, budget=6)
    assert expected == [3, 4, 1, 6, 7]  # the current query alone would evict 1, 4, 3, 6, 2
    assert decode_evictions(method("h2o", budget=6), prompt, new) == expected


def test_streaming_llm_rolls_past_its_sinks_while_decoding():
    # budget 4 with 2 sinks: positions 0 and 1 stay, the oldest other entry goes each step
    evicted = decode_evictions(method("streaming_llm", budget=4, sinks=2), [0.0, 0.0, 0.0, 0.0], [0.0] * 4)
    assert evicted == [2, 3, 4, 5]


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
    # the selection runs and keeps every entry (PyramidKV: layer 0; deeper layers keep less)
    assert all(heads == list(range(12)) for heads in kept(method(name, budget=1.0), a))


def test_bad_parameters_are_named():
    with pytest.raises(SqueezegenError, match="no parameter bogus"):
        method("snapkv", bogus=1)
    with pytest.raises(SqueezegenError, match="pooling"):
        method("snapkv", pooling="median")
    with pytest.raises(SqueezegenError, match=r"\(0, 1\]"):
        method("snapkv", budget=2.5)
    model, tok = tiny("tiny-llama")
    # a fixed budget larger than the prompt keeps everything
    full = __import__("squeezegen").generate(model, tok, "short prompt", max_new_tokens=4, ignore_eos=True)
    big = __import__("squeezegen").generate(
        model, tok, "short prompt", method=method("snapkv", budget=4096), max_new_tokens=4, ignore_eos=True
    )
    assert big.token_ids == full.token_ids and big.kv_bytes == full.kv_bytes


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
        "kvzip",
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
