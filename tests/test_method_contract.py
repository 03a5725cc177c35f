"""The contract every registered method keeps, run over all of them (kvpress style).

- each row of a left-padded batch of prompts of different lengths gets the tokens it gets alone;
- a budget is honoured (entries per row and KV head after the prefill);
- at budget 1.0 (or the method's own "keep everything" setting) it is token-identical to the full
  cache, through the code that selects (not a shortcut that skips it);
- it runs in bfloat16, and on CUDA when there is one.
"""

import pytest
import torch

import squeezegen as sg
from squeezegen.methods import REGISTRY
from squeezegen.methods.selection import ScoredSelection

from .conftest import tiny
from .test_fastkv import token_ids

# (label, method name, parameters): every registered method, with a fixed and a fractional budget
# where it takes one, at settings that really compress prompts of 40-120 tokens
CONFIGS = [
    ("full", "full", {}),
    ("streaming_llm-int", "streaming_llm", {"budget": 24}),
    ("streaming_llm-frac", "streaming_llm", {"budget": 0.3}),
    ("snapkv-int", "snapkv", {"budget": 24, "window": 8}),
    ("snapkv-frac", "snapkv", {"budget": 0.3, "window": 8}),
    ("snapkv-chunk", "snapkv", {"budget": 0.3, "window": 8, "chunk": 4}),
    ("pyramidkv-int", "pyramidkv", {"budget": 24, "window": 8}),
    ("pyramidkv-frac", "pyramidkv", {"budget": 0.3, "window": 8}),
    ("h2o-int", "h2o", {"budget": 24}),
    ("h2o-frac", "h2o", {"budget": 0.3}),
    ("tova-int", "tova", {"budget": 24}),
    ("tova-frac", "tova", {"budget": 0.3}),
    ("fastkv-default", "fastkv", {}),
    ("fastkv-int", "fastkv", {"max_capacity": 16, "tsp_len": 32}),
    ("fastkv-frac", "fastkv", {"retain_rate": 0.2, "tsp_rate": 0.4, "window": 4}),
    ("gemfilter-int", "gemfilter", {"budget": 24}),
    ("gemfilter-frac", "gemfilter", {"budget": 0.3}),
    ("rpc", "rpc", {"P": 8, "R": 2, "c": 4, "kernel": 1}),
    ("kvzip-int", "kvzip", {"budget": 24, "chunk_size": 48}),
    ("kvzip-frac", "kvzip", {"budget": 0.3, "chunk_size": 48, "floor": 0.2}),
    ("snapkv-adaptive", "snapkv", {"budget": 0.3, "window": 8, "adaptive": True}),
    ("snapkv-shared", "snapkv", {"budget": 0.3, "window": 8, "heads": "shared"}),
    ("fastkv-shared", "fastkv", {"retain_rate": 0.2, "tsp_rate": 0.4, "window": 4, "heads": "shared"}),
    ("token_sparse", "token_sparse", {"tau": 0.1, "min_tokens": 16, "window": 8}),
]

COMPOSED = {
    "snapkv+h2o": lambda: sg.Compose(prefill=sg.method("snapkv", budget=24), decode=sg.method("h2o", budget=16)),
    "fastkv+rpc": lambda: sg.Compose(prefill=sg.method("fastkv", retain_rate=0.3), decode=sg.method("rpc", P=8, R=2)),
    "tsa+snapkv": lambda: sg.Compose(
        prefill=sg.method("snapkv", budget=0.3),
        attention=sg.method("token_sparse", tau=0.1, min_tokens=16, window=8),
    ),
}


def test_every_registered_method_is_in_the_contract():
    assert {name for _, name, _ in CONFIGS} == set(REGISTRY)


def prompts(tok):
    return [tok.decode(token_ids(tok, n, seed=s)[0]) for n, s in ((40, 21), (120, 22), (75, 23))]


def build(label):
    if label in COMPOSED:
        return COMPOSED[label]()
    _, name, params = next(c for c in CONFIGS if c[0] == label)
    return sg.method(name, **params)


LABELS = [c[0] for c in CONFIGS] + list(COMPOSED)


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("label", LABELS)
def test_each_row_of_a_padded_batch_gets_its_tokens_alone(model_name, label):
    model, tok = tiny(model_name)
    texts = prompts(tok)
    method = build(label)
    alone = [sg.generate(model, tok, t, method=method, max_new_tokens=16, ignore_eos=True) for t in texts]
    batch = sg.generate(model, tok, texts, method=method, max_new_tokens=16, ignore_eos=True)
    assert batch.token_ids == [a.token_ids[0] for a in alone]
    assert batch.prompt_lengths == [a.prompt_lengths[0] for a in alone]


@pytest.mark.parametrize("label", [c[0] for c in CONFIGS if c[1] in ("snapkv", "h2o", "tova", "streaming_llm")])
def test_budget_is_honoured_per_row(label):
    model, tok = tiny("tiny-llama")
    method = build(label)
    texts = prompts(tok)
    budget = method.budget
    engine = sg.Engine(model, method)
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    engine.prefill(enc.input_ids, enc.attention_mask)
    lengths = enc.attention_mask.sum(-1).tolist()
    expected = [min(budget, n) if isinstance(budget, int) else round(budget * n) for n in lengths]
    for cache in engine.cache.layers:
        if getattr(method, "adaptive", False):  # the layer's heads share the budget unevenly
            assert cache.live().sum(dim=1).tolist() == [b * cache.live().shape[1] for b in expected]
        else:
            assert cache.live().amax(dim=1).tolist() == expected


KEEP_ALL = {
    "snapkv": {"budget": 1.0, "window": 8},
    "fastkv": {"retain_rate": 1.0, "tsp_rate": 1.0},
    "gemfilter": {"budget": 1.0},
    "kvzip": {"budget": 1.0, "chunk_size": 48},
    "rpc": {"P": 8, "R": 2, "c": 1, "kernel": 1},
    "token_sparse": {"tau": 0.0, "min_tokens": 16, "window": 8},
}


@pytest.mark.parametrize("name", sorted(KEEP_ALL))
def test_keeping_everything_is_the_full_cache(name):
    model, tok = tiny("tiny-qwen3")
    texts = prompts(tok)
    full = sg.generate(model, tok, texts, max_new_tokens=24, ignore_eos=True)
    same = sg.generate(model, tok, texts, method=sg.method(name, **KEEP_ALL[name]), max_new_tokens=24, ignore_eos=True)
    assert same.token_ids == full.token_ids


def test_the_selecting_code_runs_when_everything_is_kept(monkeypatch):
    """Budget 1.0 goes through the selection (so the test above can fail), not around it."""
    calls = []
    original = ScoredSelection.choose

    def counting(self, view, scores, budgets):
        calls.append(view.index)
        return original(self, view, scores, budgets)

    monkeypatch.setattr(ScoredSelection, "choose", counting)
    model, tok = tiny("tiny-llama")
    sg.generate(model, tok, prompts(tok)[0], method=sg.method("snapkv", budget=1.0), max_new_tokens=2)
    assert calls == [0, 1, 2, 3]


@pytest.mark.parametrize("label", ["snapkv-frac", "h2o-int", "fastkv-default", "rpc", "token_sparse", "snapkv+h2o"])
def test_runs_in_bfloat16(label):
    model, tok = sg.load("tiny-llama", dtype="bfloat16")
    res = sg.generate(model, tok, prompts(tok), method=build(label), max_new_tokens=12, ignore_eos=True)
    assert [len(ids) for ids in res.token_ids] == [12] * 3
    engine = sg.Engine(model, build(label))
    engine.prefill(tok(prompts(tok)[1], return_tensors="pt").input_ids)
    assert engine.cache.layers[0].keys.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("label", LABELS)
def test_padded_batch_on_cuda(label):
    model, tok = sg.load("tiny-llama", device="cuda")
    texts = prompts(tok)
    method = build(label)
    alone = [sg.generate(model, tok, t, method=method, max_new_tokens=12, ignore_eos=True).token_ids[0] for t in texts]
    assert sg.generate(model, tok, texts, method=method, max_new_tokens=12, ignore_eos=True).token_ids == alone


def test_compose_hands_the_prefill_cache_to_an_evicting_decode_method():
    model, tok = tiny("tiny-llama")
    text = prompts(tok)[1]
    snap = sg.method("snapkv", budget=24)
    both = sg.Compose(prefill=snap, decode=sg.method("h2o", budget=16))
    alone = sg.generate(model, tok, text, method=snap, max_new_tokens=20, ignore_eos=True)
    composed = sg.generate(model, tok, text, method=both, max_new_tokens=20, ignore_eos=True)
    # SnapKV alone keeps 24 and grows; with H2O decoding, the cache stays at the 24 SnapKV kept
    # (+ the slot of the incoming token)
    assert alone.cache_lengths == [24 + 19] * 4 and composed.cache_lengths == [24] * 4
    per_slot = 2 * model.config.num_key_value_heads * model.config.head_dim * 4 * 4
    assert composed.kv_bytes == per_slot * 25 < alone.kv_bytes
    assert composed.token_ids != alone.token_ids


def test_compose_refuses_parts_that_do_nothing_in_their_role():
    with pytest.raises(sg.SqueezegenError, match="does nothing while decoding"):
        sg.Compose(prefill=sg.method("snapkv"), decode=sg.method("snapkv"))
    with pytest.raises(sg.SqueezegenError, match="does nothing at prefill"):
        sg.Compose(prefill=sg.method("rpc"), decode=sg.method("h2o"))
    with pytest.raises(sg.SqueezegenError, match="two or three"):
        sg.Compose(prefill=sg.method("snapkv"))


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "kvzip"])
def test_shared_heads_keep_one_set_of_positions_per_layer(name):
    model, tok = tiny("tiny-llama")
    ids = token_ids(tok, 120)

    def positions(heads):
        engine = sg.Engine(model, sg.method(name, budget=0.3, heads=heads), tokenizer=tok)
        engine.prefill(ids)
        return [c.held()[2][0] for c in engine.cache.layers]  # (Hkv, K) per layer

    shared, per_head = positions("shared"), positions("per-head")
    assert all(bool((p == p[:1]).all()) for p in shared)
    assert any(not bool((p == p[:1]).all()) for p in per_head)  # the default does differ per head
    if name == "kvzip":  # one budget over all layers: the same total, shared out differently
        assert sum(p.shape[-1] for p in shared) == round(0.3 * 120) * len(shared)
    else:
        assert [p.shape[-1] for p in shared] == [p.shape[-1] for p in per_head]  # the same budget
    with pytest.raises(sg.SqueezegenError, match="shared"):
        sg.method("h2o", heads="shared")
