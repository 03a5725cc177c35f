"""The full-cache engine must reproduce Hugging Face exactly: tokens, and logits on padded batches."""

import pytest
import torch

import squeezegen as sg
from squeezegen.runtime.engine import Engine

from .conftest import TINY, tiny

PROMPT = "The history of the printing press begins in the fifteenth century, when movable type"
BATCH = [
    "Short prompt about cats.",
    "A much longer prompt that talks about the history of computing machines and the people who built them. " * 2,
    "Medium length prompt on rivers, lakes and the sea.",
]


@pytest.mark.parametrize("name", TINY)
def test_greedy_tokens_identical_to_hf_generate(name):
    model, tok = tiny(name)
    ids = tok(PROMPT, return_tensors="pt")
    # 100 new tokens cross Gemma-3's 16-token sliding window and the cache's compaction slack
    ref = model.generate(**ids, max_new_tokens=100, min_new_tokens=100, do_sample=False)
    res = sg.generate(model, tok, PROMPT, max_new_tokens=100, ignore_eos=True)
    assert res.token_ids[0] == ref[0, ids.input_ids.shape[1] :].tolist()
    assert res.finish_reasons == ["length"]


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-mistral"])
def test_long_prompt_greedy_tokens_identical_to_hf_generate(name):
    """A prompt many times tiny-gemma3's 16-token window: its sliding layers prefill band by band."""
    model, tok = tiny(name)
    ids = tok(" ".join([PROMPT] * 8), return_tensors="pt")
    assert ids.input_ids.shape[1] > 6 * 16
    ref = model.generate(**ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    res = sg.generate(
        model, tok, tok.decode(ids.input_ids[0], skip_special_tokens=True), max_new_tokens=40, ignore_eos=True
    )
    assert res.token_ids[0] == ref[0, ids.input_ids.shape[1] :].tolist()


@pytest.mark.parametrize("name", TINY)
def test_left_padded_batch_logits_match_hf_at_every_step(name):
    model, tok = tiny(name)
    res = sg.generate(model, tok, BATCH, max_new_tokens=12, ignore_eos=True, output_logits=True)
    enc = tok(BATCH, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(
        **enc, max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    assert len(res.logits) == len(out.logits) == 12
    for ours, theirs in zip(res.logits, out.logits, strict=True):
        assert (ours - theirs).abs().max().item() < 1e-4
    for row in range(len(BATCH)):
        assert res.token_ids[row] == out.sequences[row, enc.input_ids.shape[1] :].tolist()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_prefill_in_two_chunks_equals_one(name):
    model, tok = tiny(name)
    ids = tok(PROMPT * 2, return_tensors="pt").input_ids
    whole = Engine(model).prefill(ids)
    chunked = Engine(model)
    chunked.prefill(ids[:, :20])
    second = chunked.prefill(ids[:, 20:], compress=False)
    assert torch.allclose(whole, second, atol=1e-5)
    assert chunked.next_pos.tolist() == [ids.shape[1]]


def test_model_generate_is_unchanged_by_the_engine():
    model, _ = tiny_model_fresh()
    tok = tiny("tiny-llama")[1]
    ids = tok(BATCH, return_tensors="pt", padding=True, padding_side="left")
    before = model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    sg.generate(model, tok, PROMPT, max_new_tokens=2)  # routes the model's attention through the engine
    assert model.config._attn_implementation == "squeezegen"
    after = model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(before, after)
    with torch.inference_mode():
        assert torch.equal(model(ids.input_ids).logits, sg.load("tiny-llama", dtype="float32")[0](ids.input_ids).logits)


def tiny_model_fresh():
    """A tiny model the engine has never touched (the shared fixture may have run already)."""
    return sg.load("tiny-llama", dtype="float32")
