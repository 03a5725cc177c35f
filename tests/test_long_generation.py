"""Decode-time budgets, the long-generation benchmark and the batched reasoning needle."""

import json

import pytest
import torch

import squeezegen as sg
from squeezegen.bench.long_generation import LongGenerationConfig, markdown_table, run_long_generation
from squeezegen.cli import main
from squeezegen.evals.reasoning import answer_after_path, answer_after_paths, forced_rows, make_reasoning_sample
from squeezegen.methods.rpc import RPC
from squeezegen.methods.spec import MethodSpec, matched_budget

from .conftest import tiny
from .test_rpc import run


@pytest.mark.parametrize("name", ["h2o", "tova", "streaming_llm"])
def test_token_budget_above_the_prompt_caps_decoding(name):
    # a 20-token prompt fits a 30-token budget whole; the cache grows to 30 and stays there
    _, lengths = run(sg.method(name, budget=30), prompt_len=20, generated=25)
    assert lengths == [min(20 + g, 30) for g in range(1, 26)]


def test_rpc_cache_size_formula_and_freed_memory():
    rpc = RPC(P=8, R=2, c=4, kernel=1)
    _, lengths = run(rpc, prompt_len=20, generated=40)
    assert [20 + rpc.generated_held(g) for g in range(1, 41)] == lengths
    # the peak comes just before a compression: the step's token is in, the cut not yet made
    assert rpc.peak_generated(9) == 9 and rpc.peak_generated(10) == 10 and rpc.peak_generated(17) == 11
    assert rpc.peak_generated(40) == max(rpc.generated_held(g - 1) + 1 for g in range(1, 41)) == 16
    engine, _ = run(rpc, prompt_len=20, generated=10)
    # the decode buffer holds the prompt and RPC's peak over the reserved steps, not the reserve,
    # and compressing marks slots empty in place: the buffer never changes
    assert engine.cache.layers[0].keys.shape[2] == 20 + rpc.peak_generated(10) < 20 + 10 + 1
    assert engine.cache.layers[0].live().tolist() == [[20 + 2 + 2] * 2]


def test_long_generation_bench_rows():
    model, tok = tiny("tiny-llama")
    specs = [MethodSpec.parse("rpc:P=8,R=2,kernel=1"), MethodSpec.parse("tova")]
    config = LongGenerationConfig(lengths=[12, 30], batch_sizes=[2], methods=specs, prompt_tokens=16)
    rows = run_long_generation(model, tok, config, progress=False)
    assert [(r["generated"], r["method"]) for r in rows] == [
        (g, m) for g in (12, 30) for m in ("full", "rpc:P=8,R=2,kernel=1", "tova")
    ]
    budget = matched_budget(specs, 16, 30)
    assert budget == 16 + RPC(P=8, R=2).peak_generated(30) == rows[0]["kv_budget"]
    by = {(r["generated"], r["method"]): r for r in rows}
    full = by[(30, "full")]
    assert full["speedup"] == full["kv_fraction"] == 1.0 and full["cache_tokens"] == 16 + 29
    # after 29 decode steps RPC peaked at the prompt + its hand-computed peak; TOVA at the budget
    rpc_slots = 16 + RPC(P=8, R=2).peak_generated(29)
    assert by[(30, "rpc:P=8,R=2,kernel=1")]["kv_fraction"] == pytest.approx(rpc_slots / (16 + 29))
    assert by[(30, "tova")]["cache_tokens"] == budget
    assert by[(12, "rpc:P=8,R=2,kernel=1")]["cache_tokens"] == 16 + RPC(P=8, R=2).generated_held(11)
    assert all(r["tok_s"] > 0 and r["recent_tok_s"] > 0 for r in rows)
    assert "| 2 | 30 | tova |" in markdown_table(rows)


def test_forced_rows_share_one_length_and_keep_note_and_question():
    model, tok = tiny("tiny-llama")
    samples = [make_reasoning_sample(tok, 150, seed) for seed in range(3)]
    rows = forced_rows(tok, samples)
    assert len({len(r) for r in rows}) == 1
    for sample, row in zip(samples, rows, strict=True):
        question = tok(sample.question, add_special_tokens=False).input_ids
        path = tok(sample.path, add_special_tokens=False).input_ids
        assert row[-len(question) :] == question and row[: -len(question)] == path[: len(row) - len(question)]
        assert sample.answer in tok.decode(row[: -len(question)])


def test_batched_reasoning_rows_match_single_runs():
    model, tok = tiny("tiny-qwen2")
    sample = make_reasoning_sample(tok, 100, seed=4)
    single, _ = answer_after_path(model, tok, sample, RPC(P=16, R=4), max_new_tokens=5)
    texts, engine = answer_after_paths(model, tok, [sample, sample], RPC(P=16, R=4), max_new_tokens=5)
    assert texts == [single, single] and engine.next_pos.shape == (2,)


def test_long_generation_and_reasoning_cli(tmp_path, capsys):
    out = tmp_path / "long"
    argv = ["bench-long", "--model", "tiny-llama", "--lengths", "10", "20", "--batch", "1", "--prompt-tokens", "8"]
    argv += ["--methods", "rpc:P=4,R=2", "streaming_llm", "--out", str(out)]
    assert main(argv) == 0
    saved = json.loads((out / "bench_long.json").read_text())
    assert len(saved["rows"]) == 6 and (out / "throughput.png").exists()
    assert main(argv) == 2 and "already exist" in capsys.readouterr().err
    needle = tmp_path / "needle"
    argv = ["reasoning-needle", "--model", "tiny-llama", "--path-tokens", "80", "--samples", "3"]
    argv += ["--batch-size", "2", "--methods", "rpc:P=8,R=2", "h2o", "--out", str(needle)]
    assert main(argv) == 0
    records = json.loads((needle / "records.json").read_text())["records"]
    assert [r["sample"] for r in records] == [0, 1, 2] * 3
    assert {r["method"] for r in records} == {"full", "rpc:P=8,R=2", "h2o"}
    assert "| h2o |" in (needle / "table.md").read_text()
    with torch.no_grad():
        assert main(["bench-long", "--model", "tiny-llama", "--lengths", "9000", "--out", str(tmp_path / "x")]) == 2
    assert "exceeds the model's" in capsys.readouterr().err
