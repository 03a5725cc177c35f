"""The field's benchmarks and the models they run on: GGUF files joined from part packages, NVIDIA's
RULER through its own generators and metrics, GSM8K/AIME answers read as their formats state them."""

import hashlib
import importlib
import json
import os

import pytest

import squeezegen.files
from squeezegen.cli import main
from squeezegen.errors import MissingDependencyError, SqueezegenError
from squeezegen.evals import math_problems, ruler
from squeezegen.models.parts import SplitGGUF

from .conftest import tiny

CHUNKS = [b"GGUF" + bytes(range(60)), bytes(range(64, 128)), b"tail"]


def split_file(tmp_path, monkeypatch, chunks=CHUNKS, sizes=None) -> SplitGGUF:
    """Packages fakepart1..N on sys.path, each holding data/partNN.bin, and the pinned join."""
    for i, chunk in enumerate(chunks, start=1):
        data = tmp_path / "site" / f"fakepart{i}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("")
        (data / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    whole = b"".join(CHUNKS)
    return SplitGGUF(
        file_name="model.gguf",
        package_prefix="fakepart",
        version="1.0",
        part_sizes=tuple(sizes or (len(c) for c in CHUNKS)),
        sha256=hashlib.sha256(whole).hexdigest(),
        install="pip install 'squeezegen[fake]'",
    )


def test_parts_join_in_order_once_and_are_reused_without_hashing(tmp_path, monkeypatch):
    split = split_file(tmp_path, monkeypatch)
    path = split.joined(tmp_path / "cache")
    assert path.read_bytes() == b"".join(CHUNKS)
    monkeypatch.setattr(squeezegen.files, "file_sha256", lambda p: pytest.fail("hashed again"))
    assert split.joined(tmp_path / "cache") == path


def test_a_changed_join_is_checked_again_and_never_loaded(tmp_path, monkeypatch):
    split = split_file(tmp_path, monkeypatch)
    path = split.joined(tmp_path / "cache")
    path.write_bytes(b"X" * len(path.read_bytes()))  # same size, another mtime: joined and checked again
    os.utime(path, ns=(1, 1))
    assert split.joined(tmp_path / "cache").read_bytes() == b"".join(CHUNKS)


def test_a_missing_part_names_its_package_and_the_install(tmp_path, monkeypatch):
    split = split_file(tmp_path, monkeypatch, chunks=CHUNKS[:2], sizes=[len(c) for c in CHUNKS])
    with pytest.raises(MissingDependencyError, match=r"fakepart3==1.0 \(part 3 of 3\).*squeezegen\[fake\]"):
        split.joined(tmp_path / "cache")


def test_a_truncated_part_names_the_package_to_reinstall(tmp_path, monkeypatch):
    split = split_file(tmp_path, monkeypatch, chunks=[CHUNKS[0], CHUNKS[1][:10], CHUNKS[2]])
    with pytest.raises(
        SqueezegenError, match=r"part02.bin has 10 bytes, not 64.*--force-reinstall --no-deps fakepart2"
    ):
        split.joined(tmp_path / "cache")


def test_a_corrupt_part_of_the_right_size_is_refused_and_leaves_no_file(tmp_path, monkeypatch):
    split = split_file(tmp_path, monkeypatch, chunks=[CHUNKS[0], bytes(64), CHUNKS[2]])
    with pytest.raises(SqueezegenError, match="do not join into the pinned file"):
        split.joined(tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


# --- RULER ------------------------------------------------------------------------------------------


def test_the_sentence_stand_in_cuts_where_punkt_would():
    text = 'He left at 5 p.m. on Monday. "Why?" she asked! Dr. Smith (the first) came. The U.S. did too. 3 more.'
    assert ruler.split_sentences(text) == [
        "He left at 5 p.m. on Monday.",
        '"Why?" she asked!',
        "Dr. Smith (the first) came.",
        "The U.S. did too.",
        "3 more.",
    ]


def test_ruler_scores_with_its_own_metrics():
    sample = ruler.RulerSample("niah_multivalue", "c", "q", ("111", "222", "333", "444"), family="niah")
    assert sample.score("the numbers are 111 and 333") == 0.5  # string_match_all: the share found
    qa = ruler.RulerSample("qa_1", "c", "q", ("Paris", "the city of Paris"), family="qa")
    assert qa.score("paris.") == 1.0 and qa.score("London") == 0.0  # string_match_part: any one


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_3", "vt"])
def test_ruler_samples_come_from_its_generators_in_kvpress_layout(task):
    _, tok = tiny("tiny-llama")
    samples = ruler.ruler_samples(task, tok, 1024, 2, seed=3)
    assert len(samples) == 2 and samples[0] != samples[1]
    config = ruler.task_config(task)
    for s in samples:
        assert ruler.QUESTION_MARK not in s.context + s.question and ruler.ANSWER_MARK not in s.answer_prefix
        assert s.answers and s.max_new_tokens == config["tokens_to_generate"]
        assert all(a in s.context for a in s.answers)  # the needles are in the haystack
        prompt = len(tok(f"{s.context}\n{s.question} {s.answer_prefix}").input_ids)
        assert prompt + s.max_new_tokens <= 1024 + 8  # RULER's length: prompt and answer
    assert ruler.ruler_samples(task, tok, 1024, 2, seed=3) == samples  # seeded (and cached)
    assert ruler.ruler_samples(task, tok, 1024, 2, seed=4) != samples


def test_eval_runs_ruler_and_resumes(tmp_path, capsys):
    argv = ["eval", "--model", "tiny-llama", "--dtype", "float32", "--benchmark", "ruler", "--tasks", "niah_single_1"]
    argv += ["--contexts", "1024", "--samples", "2", "--methods", "snapkv", "--budgets", "0.5", "--modes", "seen"]
    argv += ["--max-new-tokens", "4", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    records = json.loads((tmp_path / "r" / "records.json").read_text())
    rows = records["records"]
    assert {(r["method"], r["sample"]) for r in rows} == {(m, i) for m in ("full", "snapkv") for i in (0, 1)}
    assert records["meta"]["settings"]["benchmark"] == "ruler"
    assert all(len(r["answers"]) == 1 and r["answers"][0].isdigit() for r in rows)
    assert main([*argv, "--resume"]) == 0  # every sample done: nothing recomputed
    capsys.readouterr()
    assert main([*argv[:-2], "--samples", "3", "--out", str(tmp_path / "r"), "--resume"]) == 2


# --- GSM8K / AIME ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, answer",
    [
        ("She sells 9 eggs.\n#### 18", "18"),
        ("#### $1,234", "1,234"),
        ("so the answer is \\boxed{588}.", "588"),
        ("Steps: 3 + 4 = 7, then 7 * 2 = 14 apples", "14"),
        ("no number here", None),
        ("#### 12\nWait, 3 more.", "12"),  # the answer line wins over later numbers
    ],
)
def test_the_final_answer_is_read_as_the_formats_state_it(text, answer):
    assert math_problems.final_answer(text) == answer


def test_answers_compare_as_numbers():
    problem = math_problems.Problem("gsm8k", "q", "1234")
    assert problem.score("#### 1,234.00") == 1.0 and problem.score("#### 1235") == 0.0


def test_the_datasets_load_with_their_reference_answers():
    gsm8k = math_problems.problems("gsm8k")
    assert len(gsm8k) == 1319 and gsm8k[0].answer == "18"
    aime = math_problems.problems("aime2025")
    assert len(aime) == 30 and aime[0].answer == "70" and all(p.answer.isdigit() for p in aime)
    first = math_problems.chosen("gsm8k", 3, 0)
    assert [i for i, _ in first] == [0, 1, 2]
    other = math_problems.chosen("gsm8k", 3, 5)
    assert other == math_problems.chosen("gsm8k", 3, 5) and other != first
    with pytest.raises(SqueezegenError, match="aime2025 has 30 problems"):
        math_problems.chosen("aime2025", 31, 0)


def test_eval_gsm8k_runs_every_method_on_each_batch_and_resumes(tmp_path, capsys):
    argv = ["eval", "--model", "tiny-llama", "--dtype", "float32", "--benchmark", "gsm8k", "--samples", "3"]
    argv += ["--batch-size", "2", "--methods", "rpc:P=8,R=4", "h2o", "--max-new-tokens", "24"]
    argv += ["--out", str(tmp_path / "g")]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "g" / "records.json").read_text())["records"]
    assert [r["method"] for r in rows if r["sample"] == 0] == ["full", "rpc:P=8,R=4", "h2o"]
    h2o = [r for r in rows if r["method"] == "h2o"]
    assert all(r["kv_budget_tokens"] and r["generated_tokens"] <= 24 for r in h2o)
    assert "decode tok/s" in (tmp_path / "g" / "table.md").read_text()
    assert main([*argv, "--resume"]) == 0


def test_the_ruler_average_weighs_each_task_alike_and_shows_the_share_of_full():
    from squeezegen.evals.report import average_table

    def row(task, method, budget, accuracy, n=2):
        return {
            "task": task,
            "context": 4096,
            "mode": "seen",
            "method": method,
            "budget": budget,
            "accuracy": accuracy,
            "n": n,
        }

    summary = [row("a", "full", None, 100.0), row("b", "full", None, 50.0)]
    summary += [row("a", "kvzip", 0.25, 100.0), row("b", "kvzip", 0.25, 0.0), row("a", "snapkv", 0.25, 50.0)]
    summary += [row("a", "token_sparse", None, 100.0), row("b", "token_sparse", None, 25.0)]  # no budget
    table = average_table(summary)
    assert "| full | 75.0 |" in table and "| kvzip | 50.0 (67%) |" in table
    assert "| token_sparse | 62.5 (83%) |" in table  # a budget-less method stands in the budget's column
    assert "| snapkv | - |" in table  # a method missing a task has no average
    assert "mean of 2 tasks, 2 samples each" in table
