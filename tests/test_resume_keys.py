"""Every flag of a resumable command either decides its results, and so is part of what --resume
must find again, or is named here as one that does not. A new flag fails these tests until it is
placed (a float run resumed with --weights int4 once mixed 34 float rows with 26 int4 rows)."""

import argparse

import pytest

from squeezegen.cli import build_parser
from squeezegen.cli.kv import eval_settings
from squeezegen.cli.quant import binarize_settings
from squeezegen.quant.distill import resume_key

# flags of `eval` that decide no record: where files go, and how the command treats them
EVAL_ASIDE = {"--out", "--overwrite", "--resume", "--kvpress-layout"}
EVAL_OTHER_VALUES = {
    "--model": ["tiny-qwen2"],
    "--dtype": ["bfloat16"],
    "--device": ["cuda"],
    "--weights": ["int4"],
    "--tasks": ["niah_word"],
    "--contexts": ["1024"],
    "--methods": ["snapkv"],
    "--budgets": ["0.5"],
    "--samples": ["3"],
    "--modes": ["seen"],
    "--seed": ["1"],
    "--max-new-tokens": ["8"],
    "--no-chat": [],
    "--benchmark": ["ruler"],
    "--batch-size": ["4"],
}
# flags of `binarize` that a resumed run may change (distill.RESUMABLE: how far it goes, how often it
# saves and measures), that only shape the report after training, or that say where files go; a run
# may also go on on another device
BINARIZE_ASIDE = {
    "--steps",
    "--stop-after",
    "--save-every",
    "--eval-every",
    "--decode-tokens",
    "--out",
    "--resume",
    "--overwrite",
    "--device",
}
BINARIZE_OTHER_VALUES = {
    "--model": ["tiny-qwen2"],
    "--dtype": ["bfloat16"],
    "--method": ["onebit"],
    "--experts": ["2"],
    "--batch": ["3"],
    "--block": ["128"],
    "--lr": ["0.01"],
    "--hidden-weight": ["1.0"],
    "--loss": ["kl"],
    "--max-grad-norm": ["0.5"],
    "--parallel": ["fsdp"],
    "--bf16": ["on"],
    "--no-checkpointing": [],
    "--seed": ["1"],
    "--eval-blocks": ["4"],
}
# flags of the time-budget path (`--time-budget`), each against a blockwise run of 60 s
BUDGET = ["--recipe", "blockwise", "--time-budget", "60"]
BUDGET_OTHER_VALUES = {
    "--recipe": ["end-to-end"],
    "--time-budget": ["120"],
    "--data": ["corpus", "essays"],
    "--train-tokens": ["4096"],
    "--block-share": ["0.5"],
    "--block-lr": ["0.001"],
}


def options(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {a.option_strings[-1] for a in sub._actions if a.option_strings and a.dest != "help"}


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@pytest.mark.parametrize(
    "command, aside, changes",
    [
        ("eval", EVAL_ASIDE, EVAL_OTHER_VALUES),
        ("binarize", BINARIZE_ASIDE, BINARIZE_OTHER_VALUES | BUDGET_OTHER_VALUES),
    ],
)
def test_every_flag_is_placed(command, aside, changes):
    assert options(command) == aside | set(changes), "place the new flag: in the resume key, or aside here"
    assert not aside & set(changes)


def eval_key(extra: list[str]) -> dict:
    return eval_settings(parse(["eval", "--model", "tiny-llama", "--dtype", "float32", *extra]))[1]


def binarize_key(extra: list[str]) -> dict:
    _, train, run = binarize_settings(
        parse(["binarize", "--model", "tiny-llama", "--dtype", "float32", "--out", "x", *extra])
    )
    return resume_key(train, run)


@pytest.mark.parametrize("flag, value", EVAL_OTHER_VALUES.items())
def test_each_eval_flag_that_decides_records_is_in_the_resume_key(flag, value):
    assert eval_key([flag, *value]) != eval_key([])


@pytest.mark.parametrize("flag, value", BINARIZE_OTHER_VALUES.items())
def test_each_binarize_flag_that_decides_training_is_in_the_resume_key(flag, value):
    assert binarize_key([flag, *value]) != binarize_key([])


@pytest.mark.parametrize("flag, value", BUDGET_OTHER_VALUES.items())
def test_each_time_budget_flag_is_in_the_resume_key(flag, value):
    assert binarize_key([*BUDGET, flag, *value]) != binarize_key(BUDGET)


@pytest.mark.parametrize("flag, value", [("--steps", "7"), ("--stop-after", "2"), ("--decode-tokens", "0")])
def test_what_a_resumed_binarize_may_change_is_not_in_the_key(flag, value):
    assert binarize_key([flag, value]) == binarize_key([])
