"""The engine's extension points, exercised by small methods written for the test."""

from dataclasses import dataclass, field

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import squeezegen as sg
from squeezegen.runtime.engine import Engine
from squeezegen.runtime.hooks import Method

from .conftest import tiny

PROMPT = "Mountains rise where the plates of the earth collide, folding rock over many millions of years"


@dataclass
class KeepAll(Method):
    """Selects and propagates every index explicitly: must change nothing."""

    def select_cache(self, view, query, key, value):
        return torch.arange(key.shape[2])[None, None].expand(key.shape[0], 1, -1)

    def propagate(self, view, hidden):
        return torch.arange(hidden.shape[1])[None].expand(hidden.shape[0], -1)


@dataclass
class KeepRecent(Method):
    keep: int = 5

    def select_cache(self, view, query, key, value):
        n = key.shape[2]
        return torch.arange(n - self.keep, n)[None, None]


@dataclass
class DropPrefix(Method):
    """After `layer`, only the last `keep` tokens go on."""

    after_layer: int = 1
    keep: int = 6

    def propagate(self, view, hidden):
        if view.index != self.after_layer:
            return None
        n = hidden.shape[1]
        return torch.arange(n - self.keep, n)[None].expand(hidden.shape[0], -1)


@dataclass
class Recorder(Method):
    calls: list = field(default_factory=list)

    def prefill_attention(self, view, query, key, value, mask, causal):
        self.calls.append(("prefill", view.index, tuple(query.shape)))
        return super().prefill_attention(view, query, key, value, mask, causal)

    def start_decode(self, engine):
        self.calls.append(("start", engine.cache.lengths()[0]))

    def after_decode_attention(self, view, query):
        self.calls.append(("after_decode_attention", view.index, tuple(query.shape)))

    def after_decode_step(self, engine, step):
        self.calls.append(("step", step, engine.cache.lengths()[0]))


@dataclass
class Unlisted(Method):
    """Overrides two hooks and lists none: the engine finds them."""

    calls: list = field(default_factory=list)

    def select_cache(self, view, query, key, value):
        self.calls.append(("select", view.index))

    def after_decode_step(self, engine, step):
        self.calls.append(("step", step))


@dataclass
class SlidingEviction(Method):
    """Decode-time eviction between steps: keep the first 2 positions and the newest 4."""

    def after_decode_step(self, engine, step):
        newest = engine.next_pos[:, None, None] - 1
        for cache in engine.cache.layers:
            cache.evict_where((cache.pos >= 2) & (cache.pos <= newest - 4))


def test_identity_selection_and_propagation_change_nothing():
    model, tok = tiny("tiny-qwen3")
    full = sg.generate(model, tok, PROMPT, max_new_tokens=20, ignore_eos=True)
    same = sg.generate(model, tok, PROMPT, method=KeepAll(), max_new_tokens=20, ignore_eos=True)
    assert same.token_ids == full.token_ids


def test_select_cache_keeps_original_positions_and_decode_counts_on():
    model, tok = tiny("tiny-llama")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    n = ids.shape[1]
    engine = Engine(model, KeepRecent(keep=5), reserve=3)
    engine.prefill(ids)
    assert engine.cache.lengths() == [5] * model.config.num_hidden_layers
    assert engine.cache.layers[0].held()[2][0, 0].tolist() == list(range(n - 5, n))
    engine.decode(torch.tensor([42]))
    assert engine.cache.layers[2].held()[2][0, 0].tolist() == list(range(n - 5, n + 1)) + [-1, -1]
    assert engine.next_pos.tolist() == [n + 1]
    # the peak counts what layers hold between steps: 5 entries each, then the decode buffers of
    # 5 + 3 reserved slots
    per_entry = 2 * model.config.num_key_value_heads * model.config.head_dim * 4
    assert engine.cache.peak_bytes == per_entry * 8 * model.config.num_hidden_layers


def test_propagated_tokens_carry_their_original_positions():
    model, tok = tiny("tiny-llama")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    n = ids.shape[1]
    engine = Engine(model, DropPrefix(after_layer=1, keep=6))
    engine.prefill(ids)
    assert engine.cache.lengths() == [n, n, 6, 6]
    assert engine.cache.layers[3].held()[2][0, 0].tolist() == list(range(n - 6, n))

    # layer 2's keys must be RoPE'd at positions n-6..n-1, not renumbered 0..5
    with torch.inference_mode():
        hidden = model(ids, output_hidden_states=True).hidden_states[2][:, n - 6 :]
        layer = model.model.layers[2]
        keys = layer.self_attn.k_proj(layer.input_layernorm(hidden)).view(1, 6, -1, 16).transpose(1, 2)
        for positions, should_match in ((torch.arange(n - 6, n)[None], True), (torch.arange(6)[None], False)):
            cos, sin = model.model.rotary_emb(hidden, positions)
            _, rotated = apply_rotary_pos_emb(keys, keys, cos, sin)
            close = torch.allclose(engine.cache.layers[2].held()[0], rotated, atol=1e-5)
            assert close == should_match


def test_hooks_are_called_where_documented():
    model, tok = tiny("tiny-llama")
    recorder = Recorder()
    n = len(tok(PROMPT).input_ids)
    sg.generate(model, tok, PROMPT, method=recorder, max_new_tokens=3, ignore_eos=True)
    layers = model.config.num_hidden_layers
    assert recorder.calls[:layers] == [("prefill", i, (1, 4, n, 16)) for i in range(layers)]
    assert recorder.calls[layers] == ("start", n)
    decode = recorder.calls[layers + 1 :]
    # two decode steps (the third token is sampled from the second step's logits)
    expected = []
    for step in range(2):
        expected += [("after_decode_attention", i, (1, 4, 1, 16)) for i in range(layers)]
        expected.append(("step", step, n + step + 1))
    assert decode == expected


def test_decode_time_eviction_bounds_the_cache():
    model, tok = tiny("tiny-llama")
    res = sg.generate(model, tok, PROMPT, method=SlidingEviction(), max_new_tokens=12, ignore_eos=True)
    assert len(res.token_ids[0]) == 12
    assert res.cache_lengths == [6] * model.config.num_hidden_layers


def test_a_hook_overridden_is_called_without_being_listed():
    model, tok = tiny("tiny-llama")
    method = Unlisted()
    assert method.hooks() == {"select_cache", "after_decode_step"}
    assert Method().hooks() == frozenset() and KeepAll().hooks() == {"select_cache", "propagate"}
    sg.generate(model, tok, PROMPT, method=method, max_new_tokens=3, ignore_eos=True)
    layers = model.config.num_hidden_layers
    assert method.calls == [("select", i) for i in range(layers)] + [("step", 0), ("step", 1)]


def test_a_hook_under_its_old_name_is_refused_at_once():
    with pytest.raises(TypeError, match="after_decode_attention"):

        class Old(Method):
            def decode_attention(self, view, query):
                pass
