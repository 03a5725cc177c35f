"""Bad input through the `squeezegen` command: one `squeezegen: error:` line and exit status 2."""

import argparse
import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

import squeezegen
from squeezegen.cli import build_parser, main
from squeezegen.methods.spec import BUDGET_GRAMMAR


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code, err, message):
    assert code == 2, err
    assert err.startswith("squeezegen: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture
def prompt_files(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)))
    (tmp_path / "nul.txt").write_bytes(b"text\x00more")
    (tmp_path / "folder").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    "name, message",
    [
        ("latin1.txt", "is not UTF-8 text (byte 0xe9 at offset 3)"),
        ("binary.bin", "is not UTF-8 text (byte 0x80 at offset 128)"),
        ("nul.txt", "holds NUL bytes"),
        ("folder", "is a folder"),
    ],
)
def test_unreadable_prompt_files(capsys, prompt_files, name, message):
    code, _, err = run(capsys, "generate", "--model", "tiny-llama", "--prompt-file", str(prompt_files / name))
    assert_one_line(code, err, message)


GENERATE = ["generate", "--model", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "2"]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*GENERATE, "--temperature", "nan"], "argument --temperature: must be a finite number, got 'nan'"),
        ([*GENERATE, "--temperature", "inf"], "argument --temperature: must be a finite number, got 'inf'"),
        ([*GENERATE, "--temperature", "-1"], "temperature must be"),
        ([*GENERATE, "--top-p", "-0.5"], "top_p must be in (0, 1]"),
        ([*GENERATE, "--top-p", "nan"], "argument --top-p: must be a finite number"),
        ([*GENERATE, "--top-k", "-1"], "top_k must be a whole number >= 0"),
        ([*GENERATE, "--device", "bogus"], "unknown device 'bogus': use cpu, cuda, cuda:N, mps or auto"),
        ([*GENERATE, "--method", "snapkv", "--method-arg", "budget=1", "budget=2"], "'budget' is given twice"),
        ([*GENERATE, "--method", "snapkv", "--method-arg", "budget=2.5"], "a fractional budget must be in (0, 1]"),
        ([*GENERATE, "--method", "snapkv", "--method-arg", "kernel=2.5"], "kernel must be a whole number, got 2.5"),
        ([*GENERATE, "--method", "snapkv", "--method-arg", "window=x"], "window must be a whole number, got 'x'"),
        ([*GENERATE, "--temperature", "1", "--seed", "9" * 23], "seed must be a whole number in [-2**63, 2**63)"),
        (["eval", "--model", "tiny-llama", "--out", ""], "argument --out: is empty"),
        (["bench", "--model", "tiny-llama", "--out", " "], "argument --out: is empty"),
        (["eval", "--model", "tiny-llama", "--benchmark", "ruler", "--tasks", "niah_number"], "unknown ruler task"),
        (["eval", "--model", "tiny-llama", "--benchmark", "gsm8k", "--samples", "2000"], "gsm8k has 1319 problems"),
        (["generate", "--prompt", "hi"], "the following arguments are required: --model"),
        (["generate", "--model", "tiny-llama", "--prompt", "hi", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "the following arguments are required: command"),
        (["perplexity", "--model", "tiny-llama", "--texts", "0"], "argument --texts: must be at least 1, got 0"),
        (["perplexity", "--model", "tiny-llama", "--continuation", "0"], "argument --continuation: must be at least 1"),
        (["perplexity", "--model", "tiny-llama", "--context", "-5"], "argument --context: must be at least 1"),
        (
            [
                "perplexity",
                "--model",
                "tiny-llama",
                "--methods",
                "snapkv",
                "--context",
                "8000",
                "--continuation",
                "300",
            ],
            "exceed the model's 8192",
        ),
        (["eval", "--model", "tiny-llama", "--samples", "0"], "argument --samples: must be at least 1, got 0"),
        (["eval", "--model", "tiny-llama", "--contexts", "300", "0"], "argument --contexts: must be at least 1"),
        (["eval", "--model", "tiny-llama", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1"),
        (["eval", "--model", "tiny-llama", "--samples", "two"], "expected a whole number, got 'two'"),
        (["bench", "--model", "tiny-llama", "--repeats", "0"], "argument --repeats: must be at least 1"),
        (["bench", "--model", "tiny-llama", "--new-tokens", "0"], "argument --new-tokens: must be at least 1"),
        (["bench", "--model", "tiny-llama", "--context", "0"], "argument --context: must be at least 1"),
        (["bench", "--model", "tiny-llama", "--batch", "0"], "argument --batch: must be at least 1"),
        (["bench-long", "--model", "tiny-llama", "--lengths", "0"], "argument --lengths: must be at least 1"),
        (["reasoning-needle", "--model", "tiny-llama", "--samples", "0"], "argument --samples: must be at least 1"),
        (["bench-tsa", "--model", "tiny-llama", "--repeats", "0"], "argument --repeats: must be at least 1"),
        (["demo", "--model", "tiny-llama", "--context", "100000"], "beyond what tiny-llama takes: use at most 8060"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert_one_line(code, err, message)


def test_eval_out_that_is_a_file_is_refused_before_any_compute(tmp_path, capsys, monkeypatch):
    import squeezegen.evals.runner as runner

    monkeypatch.setattr(runner, "eval_sample", lambda *a: pytest.fail("computed before refusing --out"))
    taken = tmp_path / "results.txt"
    taken.write_text("mine")
    for out in (taken, taken / "sub"):
        code, _, err = run(capsys, "eval", "--model", "tiny-llama", "--contexts", "300", "--out", str(out))
        assert_one_line(code, err, f"{taken} is a file, not a folder")
    code, _, err = run(capsys, "report", "--merge", str(tmp_path), "--out", str(taken))
    assert_one_line(code, err, "is a file, not a folder")
    assert taken.read_text() == "mine"


def test_h2o_accepts_the_defaults_that_methods_prints(capsys):
    code, out, _ = run(capsys, "methods")
    (line,) = [line for line in out.splitlines() if line.startswith("h2o ")]
    defaults = line.split()[1:]
    assert "window=None" in defaults
    prompt = "The quick brown fox jumps over the lazy dog. " * 20  # long enough for h2o to evict
    code, out, err = run(
        capsys, "generate", "--model", "tiny-llama", "--prompt", prompt, "--max-new-tokens", "3", "--ignore-eos",
        "--json", "--method", "h2o", "--method-arg", *defaults,
    )  # fmt: skip
    assert code == 0, err
    assert '"window": null' in out


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out == f"squeezegen {squeezegen.__version__}\n"


def test_help_is_intact_and_states_the_budget_grammar(capsys):
    """Every flag that takes a budget (a budget flag, a method spec, method parameters) says how
    to write one, and each command's --help still prints (a bare % in help text breaks it)."""
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    checked = 0
    for name, sub in commands.choices.items():
        budget_flags = [
            a
            for a in sub._actions
            if "budget" in a.dest
            and a.type is not int
            and a.dest != "time_budget"  # seconds, not a KV budget
            or a.dest in ("methods", "method_arg")
        ]
        for action in budget_flags:
            assert BUDGET_GRAMMAR.replace("%", "%%") in action.help, (name, action.dest)
            checked += 1
        code, out, err = run(capsys, name, "--help")
        assert code == 0 and out.startswith("usage: squeezegen") and not err, (name, err)
        if budget_flags:
            assert BUDGET_GRAMMAR in " ".join(out.split()), name
    assert checked >= 9


@contextlib.contextmanager
def as_a_user():
    """The block runs as an ordinary user where the tests run as root (root writes anywhere)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def open_tmp():
    """A folder any user reaches (pytest's own are the owner's alone)."""
    top = Path(tempfile.mkdtemp())
    top.chmod(0o755)
    yield top
    for path in [top, *top.rglob("*")]:
        path.chmod(0o777)
    shutil.rmtree(top)


@pytest.fixture
def read_only(open_tmp):
    folder = open_tmp / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


TINY_BENCH = ["--model", "tiny-llama", "--dtype", "float32"]


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", *TINY_BENCH, "--context", "64", "--new-tokens", "2", "--repeats", "1", "--methods", "snapkv"],
        ["bench-long", *TINY_BENCH, "--lengths", "8", "--batch", "1", "--methods", "rpc"],
        ["eval", *TINY_BENCH, "--contexts", "256", "--samples", "1"],
        ["perplexity", *TINY_BENCH, "--context", "64", "--continuation", "8", "--texts", "1"],
        ["profile-layers", *TINY_BENCH, "--tokens", "64"],
    ],
    ids=lambda argv: argv[0],
)
def test_an_unwritable_out_is_refused_before_any_work(capsys, read_only, argv):
    out = str(read_only / ("run.json" if argv[0] == "perplexity" else "run"))
    with as_a_user():
        code, _, err = run(capsys, *argv, "--out", out)
    assert_one_line(code, err, "cannot write")
    assert list(read_only.iterdir()) == []


def test_a_folder_where_a_result_file_goes_is_refused_before_any_work(capsys, tmp_path):
    argv = ["perplexity", *TINY_BENCH, "--context", "64", "--continuation", "8", "--texts", "1"]
    code, out, err = run(capsys, *argv, "--out", str(tmp_path), "--overwrite")
    assert_one_line(code, err, "is a folder, where a file is to be written")
    assert "perplexity" not in out  # nothing was measured


@pytest.mark.parametrize("name", ["eval.lock", "records.jsonl"])
def test_resuming_with_a_read_only_run_file_is_refused_in_one_line_and_it_is_kept(capsys, open_tmp, name):
    out = open_tmp / "run"
    argv = ["eval", *TINY_BENCH, "--contexts", "256", "--samples", "1", "--methods", "snapkv", "--out", str(out)]
    assert run(capsys, *argv)[0] == 0
    out.chmod(0o777)
    for path in out.iterdir():
        path.chmod(0o444 if path.name == name else 0o666)
    before = (out / name).read_bytes()
    with as_a_user():
        code, _, err = run(capsys, *argv, "--resume")
    assert_one_line(code, err, name)
    assert (out / name).read_bytes() == before


def test_an_eval_whose_model_does_not_load_leaves_no_folder_behind(capsys, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    args = ["eval", "--model", str(tmp_path / "model"), "--dtype", "float32"]
    code, _, err = run(capsys, *args, "--out", str(tmp_path / "new"))
    assert_one_line(code, err, "model")
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    code, _, err = run(capsys, *args, "--out", str(tmp_path / "kept"))
    assert code == 2 and [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "70000"], "from 1 to 65535"),
        (["--port", "-1"], "from 1 to 65535"),
        (["--port", "http"], "expected a port number"),
        (["--host", "999.1.1.1"], "is not an address of this machine"),
        (["--grace", "-1"], "0 or more seconds"),
        (["--grace", "nan"], "finite"),
    ],
)
def test_serve_refuses_an_address_it_cannot_listen_on_before_serving(capsys, flags, message):
    code, out, err = run(capsys, "serve", "--model", "tiny-llama", *flags)
    assert_one_line(code, err, message)
    assert "serving" not in out


def test_serve_refuses_a_port_in_use_before_loading_the_model(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run(capsys, "serve", "--model", "no-such-model", "--port", str(port))
    assert_one_line(code, err, f"port {port} on 127.0.0.1 is in use")
    assert "serving" not in out


def test_int4_weights_on_a_model_no_group_divides_say_so_in_cli_terms(capsys, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = squeezegen.load("tiny-llama")[1]
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "narrow")
    tok.save_pretrained(tmp_path / "narrow")
    capsys.readouterr()
    code, _, err = run(capsys, *GENERATE[:1], "--model", str(tmp_path / "narrow"), *GENERATE[3:], "--weights", "int4")
    last = err.split("\r")[-1].splitlines()[-1] + "\n"  # after the weights' loading bar
    assert_one_line(code, last, "cannot use --weights int4")
    assert "--weights model" in err and "group_size" not in err
