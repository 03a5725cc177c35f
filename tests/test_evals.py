import json

import pytest

import squeezegen as sg
from squeezegen.cli import main
from squeezegen.errors import SqueezegenError
from squeezegen.evals.fanout import answer_all
from squeezegen.evals.report import markdown_tables, report_paths, summarize
from squeezegen.evals.runner import EvalConfig, run_eval
from squeezegen.evals.tasks import TASKS, make_sample
from squeezegen.methods import method
from squeezegen.methods.spec import MethodSpec
from squeezegen.runtime.engine import Engine
from squeezegen.runtime.generate import Decoding, decode_loop, encode, prefill_rows

from .conftest import tiny


@pytest.mark.parametrize("task", list(TASKS))
def test_tasks_are_seeded_and_sized(task, tok):
    a, b, c = (make_sample(task, tok, 1000, seed) for seed in (3, 3, 4))
    assert a == b and a != c
    n = len(tok(a.context).input_ids)
    assert 700 <= n <= 1000, n
    assert a.answers and all(ans in a.context for ans in a.answers)
    assert a.score(" ".join(a.answers)) == 1.0 and a.score("nothing") == 0.0


def test_multi_answer_tasks_score_partially(tok):
    sample = make_sample("niah_multivalue", tok, 800, 1)
    assert len(sample.answers) == 4
    assert sample.score(f"{sample.answers[0]} and {sample.answers[2]}") == 0.5


def test_variable_tracking_assigns_before_use(tok):
    sample = make_sample("variable_tracking", tok, 800, 2)
    names = sample.answers
    positions = [sample.context.index(f"VAR {name} =") for name in names]
    assert positions == sorted(positions)


def test_unknown_task_and_short_context(tok):
    with pytest.raises(SqueezegenError, match="unknown task"):
        make_sample("nope", tok, 1000, 0)
    with pytest.raises(SqueezegenError, match="too short"):
        make_sample("niah_number", tok, 100, 0)


METHODS = {
    "full": method("full"),
    "snapkv": method("snapkv", budget=0.3, window=8),
    "snapkv-chunk": method("snapkv", budget=0.3, window=8, chunk=8),
    "pyramidkv": method("pyramidkv", budget=0.3, window=8),
    "streaming_llm": method("streaming_llm", budget=0.3),
    "h2o": method("h2o", budget=0.4, window=8),
    "tova": method("tova", budget=0.4),
}


@pytest.mark.parametrize("seen", [True, False])
def test_fanned_out_prefill_equals_separate_runs(seen):
    model, tok = tiny("tiny-qwen2")
    sample = make_sample("niah_number", tok, 400, 5)
    (chunks,) = encode(tok, [sample.question], [sample.context], chat=True)
    decoding = Decoding(12, ignore_eos=True)
    shared = answer_all(model, tok, chunks, METHODS, decoding, question_seen=seen)
    row = [chunks[0] + chunks[1]] if seen else chunks
    for label, m in METHODS.items():
        engine = Engine(model, m, reserve=12 + len(chunks[1]))
        alone = decode_loop(engine, tok, prefill_rows(engine, [row], tok.pad_token_id), decoding, 0.0)
        assert shared[label].token_ids == alone.token_ids, label
        assert shared[label].cache_lengths == alone.cache_lengths, label
        assert shared[label].kv_bytes == alone.kv_bytes, label
    assert shared["snapkv"].kv_bytes < shared["full"].kv_bytes


def test_context_argument_matches_the_unseen_mode():
    model, tok = tiny("tiny-llama")
    sample = make_sample("niah_word", tok, 400, 1)
    res = sg.generate(
        model,
        tok,
        sample.question,
        method=method("snapkv", budget=0.3, window=8),
        context=sample.context,
        chat=True,
        max_new_tokens=10,
        ignore_eos=True,
    )
    (chunks,) = encode(tok, [sample.question], [sample.context], chat=True)
    fan = answer_all(
        model,
        tok,
        chunks,
        {"s": method("snapkv", budget=0.3, window=8)},
        Decoding(10, ignore_eos=True),
        question_seen=False,
    )
    assert res.token_ids == fan["s"].token_ids
    assert res.prompt_lengths == [len(chunks[0]) + len(chunks[1])]


def test_run_eval_records_and_tables():
    model, tok = tiny("tiny-llama")
    config = EvalConfig(
        ["niah_number"], [300], [MethodSpec.parse("snapkv:window=8")], [0.5], samples=2, max_new_tokens=4
    )
    records = run_eval(model, tok, config, progress=False)
    assert len(records) == 2 * 2 * 2  # samples x modes x (full + snapkv)
    assert {r["method"] for r in records} == {"full", "snapkv:window=8"}
    table = markdown_tables(summarize(records))
    assert "| full |" in table and "| snapkv:window=8 |" in table and "300 50%" in table
    budgetless = [
        {**s, "budget": None, "method": "token_sparse"} if s["method"] != "full" else s for s in summarize(records)
    ]
    lines = markdown_tables(budgetless).splitlines()
    assert "300 all" in lines[2] and lines[5].startswith("| token_sparse | ") and "-" not in lines[5]


def test_report_refuses_to_overwrite(tmp_path):
    (tmp_path / "table.md").write_text("an earlier result")
    with pytest.raises(SqueezegenError, match="table.md already exist"):
        report_paths(tmp_path)
    assert report_paths(tmp_path, overwrite=True)["table"].name == "table.md"


def test_eval_cli_writes_report(tmp_path, capsys):
    argv = [
        "eval",
        "--model",
        "tiny-llama",
        "--contexts",
        "300",
        "--samples",
        "1",
        "--methods",
        "tova",
        "--budgets",
        "0.5",
        "--max-new-tokens",
        "4",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    assert (tmp_path / "accuracy_vs_budget.png").stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())["summary"]
    assert {s["method"] for s in summary} == {"full", "tova"}
    assert main(argv) == 2
    assert "already exist" in capsys.readouterr().err
    assert main(argv[:-2] + ["--out", str(tmp_path / "x"), "--methods", "bogus"]) == 2


def test_context_beyond_the_model_is_refused(capsys):
    argv = ["eval", "--model", "tiny-llama", "--contexts", "9000", "--samples", "1", "--out", "/tmp/never-written"]
    assert main(argv) == 2
    assert "beyond what the model takes" in capsys.readouterr().err


def test_swept_parameter_names_the_one_varying_numeric_parameter():
    from squeezegen.evals.report import swept_parameter

    labels = ["token_sparse:tau=0.005", "token_sparse:tau=0.05,window=128", "token_sparse:tau=0.05,window=128"]
    assert swept_parameter(labels[:1] + ["token_sparse:tau=0.01"]) == (
        "token_sparse",
        "tau",
        {"token_sparse:tau=0.005": 0.005, "token_sparse:tau=0.01": 0.01},
    )
    assert swept_parameter(labels) is None  # two parameters vary
    assert swept_parameter(["token_sparse:tau=0.005", "rpc"]) is None  # two methods
    assert swept_parameter(["token_sparse:tau=0.005"]) is None  # nothing swept


def test_report_merges_split_sweeps_keeping_shared_records_once(tmp_path):
    from squeezegen.cli import main
    from squeezegen.evals.report import merge_records

    def record(method, sample, score):
        return {
            "task": "t",
            "context": 8,
            "sample": sample,
            "mode": "seen",
            "method": method,
            "budget": None,
            "score": score,
            "output": "",
            "answers": ["1"],
            "prompt_tokens": 8,
            "kv_bytes": 1,
        }

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = [record("full", 0, 1.0), record("token_sparse:tau=0.1", 0, 0.0)]
    b = [record("full", 0, 0.0), record("token_sparse:tau=0.5", 0, 1.0)]  # full again: the first is kept
    (tmp_path / "a" / "records.json").write_text(json.dumps({"records": a}))
    (tmp_path / "b" / "records.json").write_text(json.dumps({"records": b}))
    merged = merge_records([tmp_path / "a", tmp_path / "b"])
    assert [(r["method"], r["score"]) for r in merged] == [
        ("full", 1.0),
        ("token_sparse:tau=0.1", 0.0),
        ("token_sparse:tau=0.5", 1.0),
    ]
    assert main(["report", "--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 0
    assert "| token_sparse:tau=0.5 | 100 |" in (tmp_path / "m" / "table.md").read_text()
    assert main(["report", "--merge", str(tmp_path / "nope"), "--out", str(tmp_path / "n")]) == 2
