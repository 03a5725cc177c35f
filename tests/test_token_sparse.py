"""Token Sparse Attention: selections by hand, scatter zeros, causality, tau = 0, layer choice."""

import json

import pytest
import torch
import torch.nn.functional as F

import squeezegen as sg
from squeezegen.errors import SqueezegenError
from squeezegen.evals.layer_profile import choose_sparse, measure_drift, measure_sensitivity
from squeezegen.methods.sparse_layers import profile_key
from squeezegen.methods.token_sparse import (
    TokenSparse,
    coverage_index,
    gather_heads,
    parse_layers,
    scatter_heads,
    sdpa_causal,
)
from squeezegen.runtime.engine import Engine

from .conftest import tiny
from .test_fastkv import token_ids

D = 4


def hand_pattern():
    """Two query heads sharing one KV head; window queries at positions 10, 11 whose logits to
    span key j are a_h[j] (head h reads dim h); the window keys get no mass."""
    a = torch.tensor(
        [
            [0, 0, 0, 0, 0, -10, -12, -20, -21, -22, -30, -30],  # head 0 values tokens 0-4, then 5, 6
            [-12, -10, 0, 0, 0, 0, 0, -20, -21, -22, -30, -30],  # head 1 values tokens 2-6, then 1, 0
        ]
    )
    key = torch.zeros(1, 1, 12, D)
    key[0, 0, :, 0], key[0, 0, :, 1] = a[0], a[1]
    query = torch.randn(1, 2, 12, D, generator=torch.Generator().manual_seed(0))
    query[:, :, 10:] = 0
    query[0, 0, 10:, 0] = query[0, 1, 10:, 1] = D**0.5
    return query, key


def select(query, key, tau, min_tokens=1, window=2):
    pos = torch.arange(12)[None]
    return coverage_index(query, key, pos, pos[:, None], D**-0.5, tau, min_tokens, window, kernel=1)


def test_coverage_selects_by_hand():
    query, key = hand_pattern()
    # tokens 7, 8, 9 hold ~e-9 of the layer's mass (< tau), token 0 next with ~0.1: 3 dropped,
    # so k = 10 - (3 + 1) = 6 per head, each head its own six, plus the window 10, 11
    index = select(query, key, tau=0.01)
    assert index.tolist() == [[[0, 1, 2, 3, 4, 5, 10, 11], [1, 2, 3, 4, 5, 6, 10, 11]]]
    assert select(query, key, tau=0.0) is None  # tau 0: dense
    assert select(query, key, tau=0.01, min_tokens=7)[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 10, 11]
    assert select(query, key, tau=0.01, min_tokens=9)[0].tolist() == [list(range(9)) + [10, 11]] * 2
    assert select(query, key, tau=0.01, min_tokens=10) is None  # the floor keeps every token


def test_scatter_leaves_zeros_exactly_at_dropped_pairs():
    query, key = hand_pattern()
    value = torch.randn(1, 1, 12, D, generator=torch.Generator().manual_seed(1))
    index = select(query, key, tau=0.01)
    out = scatter_heads(sdpa_causal(*gather_heads(query, key, value, index), D**-0.5), index, 12)
    for head, kept in enumerate(index[0].tolist()):
        for token in range(12):
            assert bool((out[0, head, token] == 0).all()) is (token not in kept)


def test_causality_holds_after_gather():
    # a reference that masks by true positions: a kept query sees only kept keys at or before it
    g = torch.Generator().manual_seed(2)
    query, key, value = (torch.randn(1, h, 12, D, generator=g) for h in (2, 1, 1))
    index = torch.tensor([[[0, 2, 3, 7, 9, 10, 11], [1, 3, 4, 5, 8, 10, 11]]])
    out = scatter_heads(sdpa_causal(*gather_heads(query, key, value, index), D**-0.5), index, 12)
    for head in range(2):
        kept = index[0, head]
        q, k, v = query[0, head, kept], key[0, 0, kept], value[0, 0, kept]
        logits = (q @ k.T) * D**-0.5
        logits = logits.masked_fill(kept[None, :] > kept[:, None], float("-inf"))
        assert torch.allclose(out[0, head, kept], logits.softmax(-1) @ v, atol=1e-6)
    # and the non-causal kernel gives something else, so the check above can fail
    loose = F.scaled_dot_product_attention(*gather_heads(query, key, value, index), scale=D**-0.5)
    assert not torch.allclose(scatter_heads(loose, index, 12), out)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-gemma3"])
def test_tau_zero_equals_dense_and_tau_drops_tokens(name):
    model, tok = tiny(name)
    ids = token_ids(tok, 96, seed=5)
    full = Engine(model).prefill(ids, all_logits=True)
    everywhere = ",".join(str(i) for i in range(model.config.num_hidden_layers))
    dense = Engine(model, TokenSparse(tau=0.0, min_tokens=8, window=8, layers=everywhere))
    assert (dense.prefill(ids, all_logits=True) - full).abs().max() < 1e-5
    sparse = Engine(model, TokenSparse(tau=0.2, min_tokens=8, window=8, layers=everywhere, timings=True))
    logits = sparse.prefill(ids, all_logits=True)
    stats = sparse.state_of(sparse.method).stats
    assert set(stats) == {i for i in range(model.config.num_hidden_layers) if not sparse.parts.is_sliding(i)}
    assert any(s["kept"] < 1 for s in stats.values()) and not torch.allclose(logits, full)
    assert all({"score_s", "attend_s"} <= set(s) for s in stats.values())
    # TSA saves compute, not memory: every layer caches what the full prefill caches
    ref = Engine(model)
    ref.prefill(ids)
    assert sparse.cache.lengths() == ref.cache.lengths()
    assert torch.equal(sparse.cache.layers[0].held()[0], ref.cache.layers[0].held()[0])


def test_short_prompts_and_later_chunks_run_dense():
    model, tok = tiny("tiny-llama")
    ids = token_ids(tok, 40, seed=6)
    method = TokenSparse(tau=0.5, min_tokens=32, window=8, layers="0-3")
    engine = Engine(model, method)
    engine.prefill(ids)  # 40 <= 32 + 8: too short to drop anything
    assert all(s["kept"] == 1.0 for s in engine.state_of(method).stats.values())
    full = sg.generate(model, tok, tok.decode(ids[0]), max_new_tokens=6, ignore_eos=True)
    same = sg.generate(model, tok, tok.decode(ids[0]), method=method, max_new_tokens=6, ignore_eos=True)
    assert same.token_ids == full.token_ids


def test_composes_with_cache_methods():
    model, tok = tiny("tiny-llama")
    prompt = tok.decode(token_ids(tok, 120, seed=7)[0])
    tsa = TokenSparse(tau=0.3, min_tokens=16, window=8, layers="1-3")
    both = sg.Compose(prefill=sg.method("snapkv", budget=32), decode=sg.method("rpc", P=8, R=2), attention=tsa)
    out = sg.generate(model, tok, prompt, method=both, max_new_tokens=12, ignore_eos=True)
    assert max(out.cache_lengths) < 32 + 12 and len(out.token_ids[0]) == 12
    fast = sg.Compose(prefill=sg.method("fastkv", budget=0.25, tsp_rate=0.5, tsp_layer=1), attention=tsa)
    assert len(sg.generate(model, tok, prompt, method=fast, max_new_tokens=4).token_ids[0]) >= 1


def test_layer_choice(tmp_path, monkeypatch):
    assert parse_layers("8-10,12") == [8, 9, 10, 12] and parse_layers(3) == [3] and parse_layers(None) is None
    with pytest.raises(SqueezegenError, match="8-15,20"):
        sg.method("token_sparse", layers="a-b")
    with pytest.raises(SqueezegenError, match="tau"):
        sg.method("token_sparse", tau=1.5)
    # drift at or below the median of the global layers
    assert choose_sparse([0.5, 0.1, 0.3, 0.2], [False, False, True, False]) == [1, 3]
    monkeypatch.setenv("SQUEEZEGEN_CACHE", str(tmp_path))
    model, tok = tiny("tiny-gemma3")  # 6 layers, the 6th global
    engine = Engine(model, TokenSparse())
    assert engine.method.sparse_layers(engine.view(0)) == {i for i in (3, 4, 5) if not engine.parts.is_sliding(i)}
    folder = tmp_path / "layer_profiles"
    folder.mkdir()
    (folder / f"{profile_key(model)}.json").write_text(json.dumps({"sparse_layers": [0, 5]}))
    engine = Engine(model, TokenSparse())
    assert engine.method.sparse_layers(engine.view(0)) == {i for i in (0, 5) if not engine.parts.is_sliding(i)}
    with pytest.raises(SqueezegenError, match="does not exist"):
        Engine(model, TokenSparse(layers="9")).prefill(token_ids(tok, 10, seed=0))


def test_drift_matches_hidden_states_of_hugging_face():
    model, tok = tiny("tiny-llama")
    ids = token_ids(tok, 50, seed=8)
    drift = measure_drift(model, ids)
    with torch.inference_mode():
        states = model(ids, output_hidden_states=True).hidden_states
    for layer in range(len(drift) - 1):  # HF's last hidden state is after the final norm
        before, after = states[layer], states[layer + 1]
        expected = ((after - before).norm(dim=-1) / before.norm(dim=-1)).mean()
        assert abs(drift[layer] - float(expected)) < 1e-4


def test_sensitivity_is_the_output_change_of_one_sparse_layer():
    model, tok = tiny("tiny-gemma3")
    ids = token_ids(tok, 300, seed=3)
    scores = measure_sensitivity(model, ids, tau=0.3, window=16, min_tokens=32)
    engine = Engine(model)
    assert [s is None for s in scores] == [engine.parts.is_sliding(i) for i in range(len(scores))]
    assert all(s > 0 for s in scores if s is not None)  # dropping 30% of the mass moves the output
    dense = measure_sensitivity(model, ids, tau=0.0, window=16, min_tokens=32)
    assert all(s == 0 for s in dense if s is not None)  # tau 0 is dense attention, token for token


def test_bench_and_profile_cli(tmp_path, capsys):
    from squeezegen.bench.sparse_prefill import run_sparse_prefill
    from squeezegen.cli import main

    model, tok = tiny("tiny-llama")
    result = run_sparse_prefill(model, tok, 300, TokenSparse(tau=0.2, min_tokens=32, window=16, layers="1-3"))
    assert [r["layer"] for r in result["layers"]] == [1, 2, 3]
    assert all(0 < r["dropped"] < 1 and r["dense_s"] > 0 and 0 < r["overhead_share"] < 1 for r in result["layers"])
    assert result["attention_speedup"] == result["attention_dense_s"] / result["attention_tsa_s"]
    for criterion in ("drift", "sensitivity"):
        argv = ["profile-layers", "--model", "tiny-llama", "--tokens", "120", "--criterion", criterion]
        assert main([*argv, "--out", str(tmp_path)]) == 0
        saved = json.loads((tmp_path / "llama-l4-h64-v49152.json").read_text())
        assert saved["criterion"] == criterion and len(saved["scores"]) == 4 and saved["sparse_layers"]
        assert "sparse layers:" in capsys.readouterr().out
    argv = ["bench-tsa", "--model", "tiny-llama", "--context", "300", "--min-tokens", "32", "--window", "16"]
    assert main([*argv, "--layers", "2", "--out", str(tmp_path / "b")]) == 0
    assert "| 2 |" in (tmp_path / "b" / "bench_tsa.md").read_text()
