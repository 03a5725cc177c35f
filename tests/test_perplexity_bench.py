import json

import torch
import torch.nn.functional as F

from squeezegen.bench.runner import BenchConfig, markdown_table, run_bench
from squeezegen.cli import main
from squeezegen.evals.perplexity import continuation_nll, held_out_ids, perplexity
from squeezegen.methods import method
from squeezegen.methods.spec import MethodSpec

from .conftest import tiny


def test_full_cache_nll_equals_hugging_face_loss():
    model, tok = tiny("tiny-mistral")
    ids = held_out_ids(tok, 260)
    nll = continuation_nll(model, ids, context=100)
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0]
    ref = F.cross_entropy(logits[99:-1], torch.tensor(ids[100:]), reduction="none")
    assert len(nll) == 160
    assert max(abs(a - b) for a, b in zip(nll, ref.tolist(), strict=True)) < 1e-4


def test_decode_time_eviction_is_applied_token_by_token():
    model, tok = tiny("tiny-llama")
    ids = held_out_ids(tok, 200)
    full = continuation_nll(model, ids, 100)
    # TOVA at a budget of every context token still evicts once decoding outgrows it
    tova = continuation_nll(model, ids, 100, method("tova", budget=1.0))
    assert tova[0] == full[0]  # the first prediction comes from the same uncompressed prefill
    assert tova != full
    assert perplexity(full) > 1


def test_bench_reports_ratios_to_full_and_kv_fractions():
    model, tok = tiny("tiny-llama")
    config = BenchConfig(
        contexts=[200],
        methods=[MethodSpec.parse("snapkv"), MethodSpec.parse("tova"), MethodSpec.parse("rpc:P=4,R=2,kernel=1")],
        budget=0.25,
        new_tokens=12,
        repeats=2,
    )
    rows = run_bench(model, tok, config, progress=False)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"full", "snapkv", "tova", "rpc:P=4,R=2,kernel=1"}
    assert by["full"]["kv_fraction"] == 1.0 and by["full"]["decode_speedup"] == 1.0
    # 25% of the prompt kept, plus the 11 decoded tokens, over the full prompt plus the same 11
    n = by["full"]["prompt_tokens"]
    expected = (round(0.25 * n) + 11) / (n + 11)
    assert abs(by["snapkv"]["kv_fraction"] - expected) < 1e-6
    assert by["tova"]["kv_fraction"] < by["snapkv"]["kv_fraction"]  # TOVA stays at its budget
    # RPC (P=4, R=2, c=4; no budget of its own) compresses at 6 and 10 generated tokens; it peaks
    # just before the second: the prompt, 1 survivor, 2 recent and 4 new entries
    assert abs(by["rpc:P=4,R=2,kernel=1"]["kv_fraction"] - (n + 7) / (n + 11)) < 1e-6
    assert all(r["peak_memory_bytes"] > 0 and r["ttft_s"] >= r["prefill_s"] for r in rows)
    assert "| 200 | 1 | snapkv |" in markdown_table(rows)


def test_perplexity_and_bench_cli(tmp_path, capsys):
    out = tmp_path / "ppl.json"
    assert (
        main(
            [
                "perplexity",
                "--model",
                "tiny-llama",
                "--methods",
                "snapkv",
                "rpc:P=8,R=2",
                "--budgets",
                "0.5",
                "--context",
                "150",
                "--continuation",
                "20",
                "--texts",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    saved = json.loads(out.read_text())
    assert set(saved["perplexity"]) == {"full", "snapkv@0.5", "rpc:P=8,R=2"}
    assert [len(text) for text in saved["nll"]["rpc:P=8,R=2"]] == [20] and out.with_suffix(".png").exists()
    assert "| rpc:P=8,R=2 | own |" in capsys.readouterr().out
    bench = tmp_path / "bench"
    argv = [
        "bench",
        "--model",
        "tiny-llama",
        "--context",
        "150",
        "--methods",
        "snapkv",
        "--new-tokens",
        "4",
        "--repeats",
        "1",
        "--out",
        str(bench),
    ]
    assert main(argv) == 0
    assert (bench / "latency_vs_context.png").exists() and "snapkv" in (bench / "bench.md").read_text()
    assert main(argv) == 2 and "already exist" in capsys.readouterr().err
