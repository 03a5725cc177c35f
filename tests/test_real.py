"""Checks on the real bundled models (slow: run with `make test-real`)."""

import json
from pathlib import Path

import pytest

import squeezegen as sg
from squeezegen.evals.corpus import prose
from squeezegen.evals.tasks import make_sample

from .conftest import smollm2

pytestmark = pytest.mark.real


@pytest.mark.parametrize("context", [0, 1500])
def test_smollm2_greedy_identical_to_hf_generate(context):
    model, tok = smollm2()
    prompt = (prose(tok, context, seed=11) + "\n\n" if context else "") + "The capital of France is"
    ids = tok(prompt, return_tensors="pt")
    # both stop at EOS (HF's min_new_tokens would forbid EOS, which ignore_eos does not)
    ref = model.generate(**ids, max_new_tokens=48, do_sample=False)
    res = sg.generate(model, tok, prompt, max_new_tokens=48)
    assert res.token_ids[0] == ref[0, ids.input_ids.shape[1] :].tolist()


def test_smollm2_padded_batch_logits_match_hf():
    model, tok = smollm2()
    prompts = ["Water boils at", prose(tok, 300, seed=2) + "\n\nIn summary,", "The three primary colours are"]
    res = sg.generate(model, tok, prompts, max_new_tokens=8, ignore_eos=True, output_logits=True)
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(
        **enc, max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    for ours, theirs in zip(res.logits, out.logits, strict=True):
        assert (ours - theirs).abs().max().item() < 1e-4


def test_smollm2_finds_a_needle_at_4k():
    model, tok = smollm2()
    found = 0
    for seed in range(3):
        sample = make_sample("niah_number", tok, 4000, seed=100 + seed)
        res = sg.generate(model, tok, sample.prompt, max_new_tokens=32, chat=True)
        assert res.prompt_lengths[0] > 3800
        found += sample.score(res.texts[0])
    assert found == 3


def test_smollm2_fastkv_at_full_rates_is_full_and_keeps_10_percent_by_default():
    model, tok = smollm2()
    prompt = prose(tok, 2000, seed=12) + "\n\nIn summary,"
    full = sg.generate(model, tok, prompt, max_new_tokens=24, ignore_eos=True)
    same = sg.generate(model, tok, prompt, sg.method("fastkv", tsp_rate=1.0, retain_rate=1.0), 24, ignore_eos=True)
    assert same.token_ids == full.token_ids
    fast = sg.generate(model, tok, prompt, sg.method("fastkv"), 24, ignore_eos=True)
    n = full.prompt_lengths[0]
    assert fast.cache_lengths == [round(0.1 * n) + 23] * model.config.num_hidden_layers


def test_cli_capital_of_france(capsys):
    from squeezegen.cli import main

    assert (
        main(["generate", "--model", "smollm2-135m", "--prompt", "The capital of France is", "--max-new-tokens", "8"])
        == 0
    )
    assert "Paris" in capsys.readouterr().out


def test_gemma3_greedy_identical_to_hf_generate():
    model, tok = sg.load("gemma3-270m", dtype="float32")
    prompt = prose(tok, 700, seed=5) + "\n\nTo summarise the passage above,"  # longer than the 512 sliding window
    ids = tok(prompt, return_tensors="pt")
    ref = model.generate(**ids, max_new_tokens=32, do_sample=False)
    res = sg.generate(model, tok, prompt, max_new_tokens=32)
    assert res.token_ids[0] == ref[0, ids.input_ids.shape[1] :].tolist()


def test_gemma3_long_prompt_through_banded_sliding_layers_matches_hf():
    model, tok = sg.load("gemma3-270m", dtype="float32")
    prompt = prose(tok, 1400, seed=6) + "\n\nTo summarise the passage above,"  # > 2 x the 512 window
    ids = tok(prompt, return_tensors="pt")
    ref = model.generate(**ids, max_new_tokens=16, do_sample=False)
    res = sg.generate(model, tok, prompt, max_new_tokens=16)
    assert res.token_ids[0] == ref[0, ids.input_ids.shape[1] :].tolist()


def test_smollm2_rpc_c1_is_full_and_follows_its_schedule():
    model, tok = smollm2()
    prompt = prose(tok, 300, seed=13) + "\n\nIn summary,"
    full = sg.generate(model, tok, prompt, max_new_tokens=200, ignore_eos=True)
    same = sg.generate(model, tok, prompt, sg.method("rpc", P=64, R=8, c=1), 200, ignore_eos=True)
    assert same.token_ids == full.token_ids
    rpc = sg.method("rpc", P=64, R=8, c=4)
    squeezed = sg.generate(model, tok, prompt, rpc, 200, ignore_eos=True)
    assert squeezed.cache_lengths == [full.prompt_lengths[0] + rpc.generated_held(199)] * 30


def test_smollm2_token_sparse_tau0_is_full_and_drops_tokens_at_tau(tmp_path, monkeypatch):
    model, tok = smollm2()
    monkeypatch.setenv("SQUEEZEGEN_CACHE", str(tmp_path))  # no user profile: the shipped one applies
    prompt = prose(tok, 2500, seed=14) + "\n\nIn summary,"
    full = sg.generate(model, tok, prompt, max_new_tokens=16, ignore_eos=True)
    same = sg.generate(model, tok, prompt, sg.method("token_sparse", tau=0.0), 16, ignore_eos=True)
    assert same.token_ids == full.token_ids
    engine = sg.Engine(model, sg.method("token_sparse"))
    engine.prefill(tok(prompt, return_tensors="pt").input_ids)
    kept = {layer: s["kept"] for layer, s in engine.state_of(engine.method).stats.items()}
    shipped = Path(sg.__file__).parent / "methods" / "layer_profiles" / "llama-l30-h576-v49152.json"
    assert set(kept) == set(json.loads(shipped.read_text())["sparse_layers"])
    assert min(kept.values()) < 1.0


def test_smollm2_binarymos_packs_to_under_1_25th_and_round_trips(tmp_path):
    import copy

    import torch

    float_model, tok = smollm2()
    model = sg.binarize_(copy.deepcopy(float_model), sg.BinaryMoSConfig(experts=4))
    assert sg.bits_per_weight(model) <= 32 / 25  # the linear layers: <= 1/25 of their float32 bytes
    sg.pack_(model)
    folder = sg.save(model, tok, tmp_path / "smollm2-binarymos")
    loaded, _ = sg.load(folder, dtype="float32")
    ids = tok("The interpreter reads each statement and", return_tensors="pt").input_ids
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.get_output_embeddings().weight.dtype == torch.float16  # the tied head stays 16-bit
    few = ids[:, :8]  # up to 16 tokens: the packed kernels; with gradients on: the dense path
    with torch.no_grad():
        kernel = loaded(few).logits
    dense = loaded(few).logits.detach()
    assert ((kernel - dense).abs().max() / dense.abs().max()).item() <= 1e-4
    linear = sg.stored_bytes(loaded)
    assert linear["float32_linear"] / linear["binary_linear"] >= 25
    # on disk: packed linear layers plus 16-bit embeddings and norms, a quarter of the float model or less
    assert (folder / "model.safetensors").stat().st_size < 0.25 * sum(p.numel() * 4 for p in float_model.parameters())


SMOLLM2_METHODS = {
    "streaming_llm": {"budget": 0.3},
    "snapkv": {"budget": 128},
    "pyramidkv": {"budget": 0.3},
    "h2o": {"budget": 0.3},
    "tova": {"budget": 128},
    "fastkv": {},
    "gemfilter": {"budget": 0.3},
    "rpc": {"P": 16, "R": 4},
    "token_sparse": {"tau": 0.05, "min_tokens": 64, "window": 32},
}


@pytest.mark.parametrize("name", sorted(SMOLLM2_METHODS))
def test_smollm2_padded_batch_rows_equal_each_row_alone(name):
    model, tok = smollm2()
    prompts = [prose(tok, n, seed=s) + "\n\nIn short," for n, s in ((150, 31), (600, 32), (350, 33))]
    method = sg.method(name, **SMOLLM2_METHODS[name])
    alone = [
        sg.generate(model, tok, p, method=method, max_new_tokens=24, ignore_eos=True).token_ids[0] for p in prompts
    ]
    batch = sg.generate(model, tok, prompts, method=method, max_new_tokens=24, ignore_eos=True)
    assert batch.token_ids == alone


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen2.5-1.5b"])
def test_qwen_greedy_identical_to_hf_generate_through_the_c_step(name):
    model, tok = sg.load(name, dtype="float32")
    prompt = prose(tok, 1200, seed=7) + "\n\nIn one sentence, the passage above is about"
    ids = tok(prompt, return_tensors="pt")
    ref = model.generate(**ids, max_new_tokens=24, do_sample=False)
    engine = sg.Engine(model, reserve=24)
    res = sg.generate(model, tok, prompt, max_new_tokens=24)
    assert res.token_ids[0] == ref[0, ids.input_ids.shape[1] :].tolist()
    engine.prefill(ids.input_ids)
    engine.decode(ref[:, ids.input_ids.shape[1]])
    assert engine.fused is not None and engine.fused.native is not None  # the C step, not the torch fallback


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen2.5-1.5b"])
def test_qwen_with_int4_weights_answers_as_the_float_model_does(name):
    model, tok = sg.load(name, dtype="float32")
    prompt = "Write a Python function that returns the sum of a list of numbers."
    full = sg.generate(model, tok, prompt, max_new_tokens=40, chat=True).texts[0]
    sg.quantize_(model, sg.Int4WeightOnlyConfig())
    four = sg.generate(model, tok, prompt, max_new_tokens=40, chat=True).texts[0]
    assert "def" in full and "def" in four
