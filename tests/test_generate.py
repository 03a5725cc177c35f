import pytest

import squeezegen as sg
from squeezegen.errors import SqueezegenError

from .conftest import tiny

PROMPT = "Rivers carry water from the mountains to the sea, and along the way"


def greedy(n=20, **kwargs):
    model, tok = tiny("tiny-llama")
    return sg.generate(model, tok, PROMPT, max_new_tokens=n, ignore_eos=True, **kwargs)


def test_eos_stops_a_row_and_ignore_eos_does_not():
    model, tok = tiny("tiny-llama")
    free = greedy()
    eos_token = free.token_ids[0][4]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos_token
    try:
        stopped = sg.generate(model, tok, PROMPT, max_new_tokens=20)
        ignored = sg.generate(model, tok, PROMPT, max_new_tokens=20, ignore_eos=True)
    finally:
        model.generation_config.eos_token_id = saved
    first = free.token_ids[0].index(eos_token)
    assert stopped.token_ids[0] == free.token_ids[0][: first + 1]  # EOS kept, as HF does
    assert stopped.finish_reasons == ["eos"]
    assert ignored.token_ids == free.token_ids and ignored.finish_reasons == ["length"]


def test_stop_string_cuts_text_and_ends_the_row():
    free = greedy()
    text = free.texts[0]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    res = greedy(stop=[stop])
    assert res.finish_reasons == ["stop"]
    assert res.texts[0] == text[: text.find(stop)]
    assert len(res.token_ids[0]) < len(free.token_ids[0])


def test_streaming_pieces_add_up_to_the_text():
    pieces = []
    res = greedy(stream=lambda row, piece: pieces.append((row, piece)))
    assert {row for row, _ in pieces} == {0}
    assert "".join(p for _, p in pieces) == res.texts[0]


def test_chat_template_wraps_the_prompt():
    model, tok = tiny("tiny-llama")
    res = sg.generate(model, tok, "hello there", max_new_tokens=1, chat=True)
    expected = tok(
        tok.apply_chat_template(
            [{"role": "user", "content": "hello there"}], add_generation_prompt=True, tokenize=False
        ),
        add_special_tokens=False,
    ).input_ids
    assert res.prompt_lengths == [len(expected)]
    assert res.prompt_lengths[0] > len(tok("hello there").input_ids)


def test_kv_bytes_and_lengths_of_the_full_cache():
    model, tok = tiny("tiny-llama")
    n = len(tok(PROMPT).input_ids)
    res = greedy(n=10)
    cfg = model.config
    # the last sampled token is never fed back, so the cache ends at prompt + new - 1 entries
    entries = n + 10 - 1
    assert res.cache_lengths == [entries] * cfg.num_hidden_layers
    per_entry = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # K and V, fp32
    assert res.kv_bytes == cfg.num_hidden_layers * entries * per_entry


def test_timings_are_filled():
    res = greedy(n=5)
    t = res.timings
    assert t.prefill_s > 0 and t.decode_s > 0 and t.decode_tokens == 4
    assert t.decode_tokens_per_s == pytest.approx(4 / t.decode_s)


def test_sampling_is_seeded():
    a = greedy(temperature=1.0, top_p=0.9, seed=3)
    b = greedy(temperature=1.0, top_p=0.9, seed=3)
    c = greedy(temperature=1.0, top_p=0.9, seed=4)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=""), "empty"),
        (dict(prompts=["fine", "  "]), "prompt 1 is empty"),
        (dict(prompts=[]), "no prompts"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(prompts="word " * 9000), "exceeds the model's 8192-token context"),
        (dict(temperature=-1), "temperature"),
        (dict(stop=[""]), "stop strings"),
        (dict(max_new_tokens=4.0), "max_new_tokens must be an int"),
        (dict(context=5), "context must be a string"),
        (dict(method="snapkv"), r"sg.method\('snapkv'\)"),
        (dict(temperature=float("nan")), "finite"),
        (dict(temperature=float("inf")), "finite"),
        (dict(prompts=7), "prompts must be a string"),
        (dict(stop=5), "stop must be a string or a list"),
        (dict(top_k=2.0), "top_k must be a whole number"),
        (dict(top_k=-1), "top_k must be a whole number"),
        (dict(temperature=1.0, seed=1.5), "seed must be a whole number"),
        (dict(temperature=True), "temperature"),
        (dict(top_p=True), "top_p"),
    ],
)
def test_bad_input_gets_a_clear_error(kwargs, message):
    model, tok = tiny("tiny-llama")
    args = dict(prompts=PROMPT, max_new_tokens=4) | kwargs
    with pytest.raises(SqueezegenError, match=message):
        sg.generate(model, tok, args.pop("prompts"), **args)


def test_a_model_that_is_not_one_is_named():
    _, tok = tiny("tiny-llama")
    with pytest.raises(SqueezegenError, match="sg.load"):
        sg.generate(None, tok, PROMPT)
    with pytest.raises(SqueezegenError, match="unknown device 'bogus'"):
        sg.load("tiny-llama", device="bogus")


def test_the_host_may_look_every_few_steps():
    """Reading tokens every 5 steps (as on a GPU) changes nothing a row returns, also for stop
    strings and EOS found between looks."""
    model, tok = tiny("tiny-llama")
    from squeezegen.runtime.engine import Engine
    from squeezegen.runtime.generate import Decoding, decode_loop, encode, prefill_rows

    prompts = [PROMPT, "Another, rather different prompt about mountains."]
    free = sg.generate(model, tok, prompts, max_new_tokens=20, ignore_eos=True)
    stop = free.texts[0][10:13]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = free.token_ids[1][6]
    try:
        results = []
        for every in (1, 5):
            engine = Engine(model, reserve=19)
            logits = prefill_rows(engine, encode(tok, prompts, None, False), tok.pad_token_id)
            results.append(decode_loop(engine, tok, logits, Decoding(20, stop=[stop], look_every=every), 0.0))
    finally:
        model.generation_config.eos_token_id = saved
    assert results[0].finish_reasons == ["stop", "eos"]
    assert results[0].token_ids == results[1].token_ids and results[0].texts == results[1].texts


def test_batch_rows_finish_independently():
    model, tok = tiny("tiny-llama")
    prompts = [PROMPT, "Another, rather different prompt about mountains."]
    alone = [sg.generate(model, tok, p, max_new_tokens=8, ignore_eos=True).token_ids[0] for p in prompts]
    together = sg.generate(model, tok, prompts, max_new_tokens=8, ignore_eos=True)
    assert together.token_ids == alone
    assert together.prompt_lengths == [len(tok(p).input_ids) for p in prompts]
    assert together.timings.decode_tokens == 2 * 7
