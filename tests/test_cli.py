import argparse
import json

import pytest

from squeezegen.cli import build_parser, main
from squeezegen.methods import parse_params


def test_method_args_are_typed():
    assert parse_params(["budget=512", "ratio=0.25", "pooling=max", "flag=true"]) == {
        "budget": 512,
        "ratio": 0.25,
        "pooling": "max",
        "flag": True,
    }


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json(capsys):
    code, out, _ = run(
        capsys,
        "generate",
        "--model",
        "tiny-llama",
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "5",
        "--ignore-eos",
        "--json",
    )
    assert code == 0
    record = json.loads(out)
    assert len(record["token_ids"]) == 5 and record["finish_reason"] == "length" and record["kv_bytes"] > 0


def test_generate_streams_text(capsys):
    code, out, err = run(
        capsys, "generate", "--model", "tiny-llama", "--prompt", "Once upon a time", "--max-new-tokens", "5"
    )
    assert code == 0 and out.strip() and "prompt tokens" in err


def test_prompt_file(tmp_path, capsys):
    path = tmp_path / "prompt.txt"
    path.write_text("A prompt read from a file")
    code, out, _ = run(
        capsys, "generate", "--model", "tiny-llama", "--prompt-file", str(path), "--json", "--max-new-tokens", "2"
    )
    assert code == 0 and json.loads(out)["prompt_tokens"] == 6


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no-such-model", "--prompt", "hi"], "unknown model 'no-such-model'; available: smollm2-135m"),
        (["--model", "tiny-llama", "--prompt", ""], "the prompt is empty"),
        (["--model", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--model", "tiny-llama", "--prompt-file", "/nonexistent/prompt.txt"], "does not exist"),
        (["--model", "tiny-llama", "--prompt", "hi", "--method", "nope"], "unknown method 'nope'; available: full"),
        (["--model", "tiny-llama", "--prompt", "hi", "--method-arg", "budget"], "key=value pairs"),
        (["--model", "tiny-llama", "--prompt", "hi", "--method-arg", "budget=3"], "has no parameter budget"),
    ],
)
def test_errors_are_one_line(capsys, argv, message):
    code, out, err = run(capsys, "generate", *argv)
    assert code == 2
    assert err.startswith("squeezegen: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_models_and_methods_listings(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and "smollm2-135m" in out and "tiny-gemma3" in out
    code, out, _ = run(capsys, "methods")
    assert code == 0 and out.startswith("full")


def _subcommands(parser, path=()):
    """Every command path under `parser`: ("generate",), ("mobile",), ("mobile", "export"), ..."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name)
                yield from _subcommands(sub, (*path, name))


COMMANDS = list(_subcommands(build_parser()))


def test_the_command_tree_is_all_there():
    assert len(COMMANDS) >= 20 and ("mobile", "eval-mini") in COMMANDS and ("bench-binary",) in COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_subcommand_has_help(capsys, command):
    code, out, err = run(capsys, *command, "--help")
    assert code == 0 and out.startswith(f"usage: squeezegen {' '.join(command)}") and not err


def test_generate_with_4bit_weights_is_generate_on_the_quantized_model(capsys):
    import squeezegen as sg

    argv = ["generate", "--model", "tiny-llama", "--dtype", "float32", "--prompt", "Once upon a time"]
    code, out, _ = run(capsys, *argv, "--max-new-tokens", "6", "--ignore-eos", "--json", "--weights", "int4")
    assert code == 0
    model, tok = sg.load("tiny-llama", dtype="float32")
    float_ids = sg.generate(model, tok, "Once upon a time", max_new_tokens=6, ignore_eos=True).token_ids[0]
    sg.quantize_(model, sg.Int4WeightOnlyConfig())
    expected = sg.generate(model, tok, "Once upon a time", max_new_tokens=6, ignore_eos=True).token_ids[0]
    assert json.loads(out)["token_ids"] == expected != float_ids
