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
    "kvzip": method("kvzip", budget=0.3, chunk_size=64),
    "fastkv": method("fastkv", budget=0.3, window=8),
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
        engine = Engine(model, m, reserve=decoding.max_new_tokens - 1, tokenizer=tok)
        alone = decode_loop(engine, tok, prefill_rows(engine, [row], tok.pad_token_id), decoding, 0.0)
        assert shared[label].token_ids == alone.token_ids, label
        assert shared[label].cache_lengths == alone.cache_lengths, label
        assert shared[label].kv_bytes == alone.kv_bytes, label
        assert shared[label].kv_bytes_decode == alone.kv_bytes_decode, label
    for label in ("snapkv", "kvzip", "fastkv"):  # each compressed (a method skipped would equal full)
        assert shared[label].kv_bytes_decode < 0.6 * shared["full"].kv_bytes_decode, label


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
    assert main([*argv, "--kvpress-layout", str(tmp_path / "kvpress")]) == 0
    assert (tmp_path / "accuracy_vs_budget.png").stat().st_size > 0
    runs = sorted(p.parent.name for p in (tmp_path / "kvpress").rglob("metrics.json"))
    assert runs == ["tiny-llama__full__0.00", "tiny-llama__full__0.00__query_aware"] + [
        "tiny-llama__tova__0.50",
        "tiny-llama__tova__0.50__query_aware",
    ]
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


def record(method, sample, score, context=8):
    return {
        "task": "t",
        "context": context,
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


def write_records(folder, records, meta=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "records.json").write_text(json.dumps({"meta": meta or {}, "records": records}))
    return folder


def test_report_merges_split_sweeps_keeping_shared_records_once(tmp_path):
    from squeezegen.evals.report import merge_records

    a = [record("full", 0, 1.0), record("token_sparse:tau=0.1", 0, 0.0)]
    b = [record("full", 0, 1.0), record("token_sparse:tau=0.5", 0, 1.0)]  # full measured alike in both
    write_records(tmp_path / "a", a)
    write_records(tmp_path / "b", b)
    settings, merged = merge_records([tmp_path / "a", tmp_path / "b"])
    assert settings is None
    assert [(r["method"], r["score"]) for r in merged] == [
        ("full", 1.0),
        ("token_sparse:tau=0.1", 0.0),
        ("token_sparse:tau=0.5", 1.0),
    ]
    assert main(["report", "--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 0
    assert "| token_sparse:tau=0.5 | 100 |" in (tmp_path / "m" / "table.md").read_text()
    assert main(["report", "--merge", str(tmp_path / "nope"), "--out", str(tmp_path / "n")]) == 2


SETTINGS = {
    "model": "tiny-llama",
    "dtype": "float32",
    "weights": "model",
    "device": "cpu",
    "seed": 0,
    "max_new_tokens": 4,
    "chat": True,
    "benchmark": "squeezegen",
}


def merge_error(capsys, tmp_path, *folders):
    code = main(["report", "--merge", *map(str, folders), "--out", str(tmp_path / "merged")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("squeezegen: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "merged" / "records.json").exists()
    return err


def test_merge_refuses_reports_measured_differently(tmp_path, capsys):
    a = write_records(tmp_path / "a", [record("full", 0, 1.0)], {"settings": SETTINGS})
    b = write_records(tmp_path / "b", [record("snapkv", 0, 1.0)], {"settings": {**SETTINGS, "model": "tiny-qwen2"}})
    err = merge_error(capsys, tmp_path, a, b)
    assert "measured differently (model: 'tiny-llama' vs 'tiny-qwen2')" in err
    c = write_records(tmp_path / "c", [record("snapkv", 0, 1.0)], {"settings": {**SETTINGS, "seed": 1, "chat": False}})
    assert "seed: 0 vs 1; chat: True vs False" in merge_error(capsys, tmp_path, a, c)


def test_merge_refuses_to_drop_records_of_the_same_key_from_another_run(tmp_path, capsys):
    a = write_records(tmp_path / "a", [record("full", 0, 1.0)])
    b = write_records(tmp_path / "b", [record("full", 0, 0.0), record("snapkv", 0, 1.0)])  # another run's full
    err = merge_error(capsys, tmp_path, a, b)
    assert "both hold full at budget all, t 8 sample 0 seen, with different results" in err
    # runs that say they were measured alike share the full cache even where its output varied
    a = write_records(tmp_path / "a2", [record("full", 0, 1.0)], {"settings": SETTINGS})
    b = write_records(tmp_path / "b2", [record("full", 0, 0.0), record("snapkv", 0, 1.0)], {"settings": SETTINGS})
    assert main(["report", "--merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "records.json").read_text())
    assert [(r["method"], r["score"]) for r in merged["records"]] == [("full", 1.0), ("snapkv", 1.0)]
    assert merged["meta"]["settings"] == SETTINGS  # the merged report can be merged again
    c = write_records(tmp_path / "c", [record("tova", 0, 1.0)], {"settings": {**SETTINGS, "max_new_tokens": 8}})
    assert "max_new_tokens: 4 vs 8" in merge_error(capsys, tmp_path, tmp_path / "m", c)


def test_merge_reads_reports_written_before_settings_were_stored(tmp_path, capsys):
    old = {"model": "tiny-llama", "dtype": "float32", "seed": 0, "max_new_tokens": 4, "no_chat": False, "out": "x"}
    a = write_records(tmp_path / "a", [record("full", 0, 1.0)], old)
    b = write_records(tmp_path / "b", [record("snapkv", 0, 1.0)], {"settings": SETTINGS})
    assert main(["report", "--merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 0
    c = write_records(tmp_path / "c", [record("tova", 0, 1.0)], {**old, "no_chat": True})
    assert "chat: True vs False" in merge_error(capsys, tmp_path, a, c)


def test_merge_of_a_truncated_report_is_one_line(tmp_path, capsys):
    a = write_records(tmp_path / "a", [record("full", 0, 1.0)])
    b = write_records(tmp_path / "b", [record("snapkv", s, 1.0) for s in range(5)])
    text = (b / "records.json").read_text()
    (b / "records.json").write_text(text[: len(text) // 2])
    assert "records.json is not a complete eval report" in merge_error(capsys, tmp_path, a, b)


EVAL = [
    "eval",
    "--model",
    "tiny-llama",
    "--tasks",
    "niah_number",
    "niah_word",
    "--contexts",
    "300",
    "--samples",
    "3",
    "--methods",
    "tova",
    "--budgets",
    "0.5",
    "--max-new-tokens",
    "4",
]


def counting(monkeypatch, stop_after=None):
    """Count the samples computed; raise KeyboardInterrupt (Ctrl-C) when `stop_after` are done."""
    import squeezegen.evals.runner as runner

    real, calls = runner.eval_sample, []

    def eval_sample(*args):
        if len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append(args[3:])
        return real(*args)

    monkeypatch.setattr(runner, "eval_sample", eval_sample)
    return calls


def test_interrupted_eval_resumes_to_the_same_records(tmp_path, capsys, auto_dtype):
    assert main([*EVAL, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "records.json").read_text())["records"]
    assert len(whole) == 6 * 2 * 2  # samples x modes x (full + tova)
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["dtype"] == auto_dtype

    out = tmp_path / "split"
    with pytest.MonkeyPatch.context() as mp:  # undone alone: the dtype "auto" means stays as set
        counting(mp, stop_after=4)
        assert main([*EVAL, "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"squeezegen: interrupted: 4 of 6 samples are saved in {out / 'records.jsonl'}; "
        "rerun the same command with --resume to finish"
    )
    assert len((out / "records.jsonl").read_text().splitlines()) == 4 and not (out / "records.json").exists()
    assert main([*EVAL, "--out", str(out)]) == 2  # neither discarded nor silently continued
    assert "--resume to continue it" in capsys.readouterr().err

    with pytest.MonkeyPatch.context() as mp:
        calls = counting(mp)
        assert main([*EVAL, "--out", str(out), "--resume"]) == 0
    # only the unfinished samples; sample-major, so the last sample of each task
    assert calls == [("niah_number", 300, 2), ("niah_word", 300, 2)]
    assert json.loads((out / "records.json").read_text())["records"] == whole
    assert (out / "table.md").read_text() == (tmp_path / "whole" / "table.md").read_text()


def test_resume_refuses_other_settings_and_drops_a_half_written_sample(tmp_path, capsys, auto_dtype):
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        counting(mp, stop_after=2)
        assert main([*EVAL, "--out", str(out)]) == 130
    capsys.readouterr()
    assert main([*EVAL, "--out", str(out), "--resume", "--samples", "4", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("squeezegen: error: ") and err.count("\n") == 1
    assert "samples: 3 then, 4 now; seed: 0 then, 1 now" in err
    assert main([*EVAL, "--out", str(out), "--resume", "--overwrite"]) == 2
    assert "pass one of them" in capsys.readouterr().err
    other = "float32" if auto_dtype == "bfloat16" else "bfloat16"  # an explicit other dtype is another run
    assert main([*EVAL, "--out", str(out), "--resume", "--dtype", other]) == 2
    assert f"dtype: {auto_dtype!r} then, {other!r} now" in capsys.readouterr().err
    assert main([*EVAL, "--out", str(out), "--resume", "--weights", "int4"]) == 2  # once resumed as float rows
    assert "weights: 'model' then, 'int4' now" in capsys.readouterr().err

    lines = (out / "records.jsonl").read_text()
    (out / "records.jsonl").write_text(lines + lines.splitlines()[0][:50])  # killed mid-write
    with pytest.MonkeyPatch.context() as mp:
        calls = counting(mp)  # what auto chose, named: the same run
        assert main([*EVAL, "--out", str(out), "--resume", "--dtype", auto_dtype]) == 0
    assert len(calls) == 4
    assert len((out / "records.jsonl").read_text().splitlines()) == 6


def test_a_second_eval_on_the_same_folder_is_refused_at_once(tmp_path, capsys, monkeypatch):
    from squeezegen.evals.runner import EvalFolder

    calls = counting(monkeypatch)
    with EvalFolder(tmp_path, {"model": "tiny-llama"}):  # another run holds the folder
        assert main([*EVAL, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err == f"squeezegen: error: {tmp_path} is in use by another `squeezegen eval`: wait for it or " + (
            "choose another --out\n"
        )
    assert calls == []
    assert main([*EVAL, "--out", str(tmp_path), "--samples", "1"]) == 0  # released when that run ends
