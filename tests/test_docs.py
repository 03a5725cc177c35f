"""The docs stay true: README is a front page, every generated table matches its committed JSON, every
`squeezegen` command the docs show parses with the real parser, every relative link resolves, and the
engine page's "add a method" example runs as written."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import re
import shlex
import shutil
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


# --- (a) README is a front page --------------------------------------------------------------------


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines: move detail to docs/ (at most 250)"


def test_every_method_page_exists():
    for name in ("baselines", "fastkv", "rpc", "token_sparse", "binarymos", "mobile_sd", "kvzip"):
        assert (DOCS / "methods" / f"{name}.md").is_file(), name
    for name in ("engine", "serving", "benchmarks"):
        assert (DOCS / f"{name}.md").is_file(), name


# --- (b) generated tables ---------------------------------------------------------------------------


def test_generated_tables_are_up_to_date(capsys):
    gen = _generator()
    assert gen.main(["--check"]) == 0, capsys.readouterr().out
    markers = sum(len(gen.blocks(page.read_text())) for page in PAGES)
    assert markers >= 30, f"only {markers} generated tables: were the markers removed?"


def test_a_changed_json_value_makes_the_check_fail(tmp_path, monkeypatch, capsys):
    gen = _generator()
    shutil.copy(README, tmp_path / "README.md")
    shutil.copytree(DOCS, tmp_path / "docs", ignore=shutil.ignore_patterns("*.png", "*.log", "__pycache__"))
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    monkeypatch.setattr(gen, "DOCS", tmp_path / "docs")
    assert gen.main(["--check"]) == 0  # the copy is as fresh as the original
    capsys.readouterr()

    runs = tmp_path / "docs" / "results" / "peers-amx" / "peers.json"
    doc = json.loads(runs.read_text())
    assert doc["rows"][1]["config"] == "engine bfloat16 C step"  # the README's headline quotes it
    doc["rows"][1]["decode_tok_s"] = 98.7
    runs.write_text(json.dumps(doc))
    assert gen.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "docs/engine.md" in out and "README.md" in out  # the table and the headline that quote it

    assert gen.main([]) == 0  # a rerun rewrites the pages from the JSON...
    assert "| 98.7 |" in (tmp_path / "docs" / "engine.md").read_text()
    assert "decode step in C 98.7 tok/s" in (tmp_path / "README.md").read_text()
    assert gen.main(["--check"]) == 0  # ...and then they are fresh again


def test_a_marker_without_its_end_is_refused(tmp_path, monkeypatch):
    gen = _generator()
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("<!-- generated: results/x.json table -->\n| a |\n")
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    monkeypatch.setattr(gen, "DOCS", tmp_path / "docs")
    with pytest.raises(SystemExit, match="without its end marker"):
        gen.main(["--check"])


# --- (c) every command the docs show parses ----------------------------------------------------------


def _command_lines() -> list[tuple[str, str]]:
    """(page, line) of every shell line inside a fenced block, continuation lines joined."""
    found = []
    for page in PAGES:
        for block in FENCE.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                if line.strip():
                    found.append((_rel(page), line.strip()))
    return found


def _argv(line: str) -> list[str] | None:
    """The arguments after `squeezegen` (or `-m squeezegen.cli`), env assignments skipped; None if the
    line runs something else."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
        words = words[1:]
    if not words:
        return None
    if words[0] == "squeezegen":
        return words[1:]
    if words[0] in ("torchrun", "python", "python3", ".venv/bin/python") and "squeezegen.cli" in words:
        at = words.index("squeezegen.cli")
        if words[at - 1] == "-m":
            return words[at + 1 :]
    return None


COMMANDS = [(page, line, argv) for page, line in _command_lines() if (argv := _argv(line)) is not None]


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 40, f"found only {len(COMMANDS)} squeezegen commands in README and docs"


def _subcommand_path(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The subcommand words at the front of argv (`["mobile", "export"]`)."""
    path = []
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or not argv or argv[0] not in subs[0].choices:
            return path
        path.append(argv[0])
        parser, argv = subs[0].choices[argv[0]], argv[1:]


def _check_methods(args: argparse.Namespace) -> None:
    """Method names and parameters are strings to argparse: build them as the commands would."""
    from squeezegen.methods import method
    from squeezegen.methods.spec import MethodSpec, parse_params

    for spec in getattr(args, "methods", None) or []:
        MethodSpec.parse(spec)
    if hasattr(args, "method_arg"):
        method(args.method, **parse_params(args.method_arg))
    if hasattr(args, "document_arg"):
        method(args.document_method, **parse_params(args.document_arg))


@pytest.mark.parametrize(("page", "line", "argv"), COMMANDS, ids=[f"{p}: {line[:60]}" for p, line, _ in COMMANDS])
def test_command_parses(page, line, argv):
    from squeezegen.cli import build_parser, main

    parser = build_parser()
    path = _subcommand_path(parser, argv)
    assert path, f"{page}: `{line}` names no squeezegen subcommand"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main([*path, "--help"]) == 0
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)  # every flag and value as the real parser takes it, nothing run
    except SystemExit as exc:
        pytest.fail(f"{page}: `{line}` does not parse (exit {exc.code}): {err.getvalue().strip()}")
    _check_methods(args)


def test_every_subcommand_is_documented():
    from squeezegen.cli import build_parser

    def paths(parser, prefix=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from (
                        paths(sub, (*prefix, name))
                        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                        else [(*prefix, name)]
                    )

    parser = build_parser()
    shown = {tuple(_subcommand_path(parser, argv)) for _, _, argv in COMMANDS}
    missing = [" ".join(p) for p in paths(parser) if p not in shown]
    assert not missing, f"subcommands no page shows: {', '.join(missing)}"


def test_scripts_the_docs_run_exist():
    for page, line in _command_lines():
        words = shlex.split(line, comments=True) if "{" not in line else line.split()
        if len(words) > 1 and words[0] in ("python", "python3", ".venv/bin/python") and words[1].endswith(".py"):
            assert (ROOT / words[1]).is_file(), f"{page}: `{line}` runs {words[1]}, which does not exist"


# --- (e) links ---------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    text = FENCE.sub("", page.read_text())  # a link inside a code block is not a link
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{_rel(page)}: broken links: {', '.join(broken)}"


# --- (d) the engine page's example -------------------------------------------------------------------


def test_add_a_method_example_runs():
    from squeezegen.methods.registry import REGISTRY

    text = (DOCS / "engine.md").read_text()
    found = re.search(r"<!-- test: add-a-method -->\n```python\n(.*?)^```", text, re.S | re.M)
    assert found, "docs/engine.md lost its marked example"
    code = found.group(1)
    method_part = code[: code.index("REGISTRY[")].rstrip().splitlines()
    assert len(method_part) + 1 <= 30, f"the method itself takes {len(method_part) + 1} lines, not 30"

    out = io.StringIO()
    module = types.ModuleType("docs_engine_example")  # a real module, as dataclasses expect of a class's home
    namespace = module.__dict__
    sys.modules[module.__name__] = module
    try:
        with contextlib.redirect_stdout(out):  # its own asserts check what was kept
            exec(compile(code, "docs/engine.md", "exec", dont_inherit=True), namespace)
        printed = re.search(r"KV (\d+)% of the full cache's, (\d+) entries per layer", out.getvalue())
        assert printed, out.getvalue()
        assert int(printed.group(1)) <= 30  # budget 0.25 (+ the decoded tokens)
        stated = re.search(r"It prints `(.*?)`", text)
        assert stated and stated.group(1) == out.getvalue().strip(), "the page states another output"

        sg, model, tok, prompt = namespace["sg"], namespace["model"], namespace["tok"], namespace["prompt"]
        method = sg.method("keynorm", budget=0.25)
        prompts = [prompt, prompt[: len(prompt) // 2]]
        batch = sg.generate(model, tok, prompts, method=method, max_new_tokens=6)
        for row, alone in enumerate(prompts):
            single = sg.generate(model, tok, alone, method=method, max_new_tokens=6)
            assert batch.token_ids[row] == single.token_ids[0], f"row {row} of a padded batch differs from alone"
    finally:
        REGISTRY.pop("keynorm", None)
        sys.modules.pop(module.__name__, None)


@pytest.mark.parametrize("family, passes", [("seed_oss", True), ("helium", False)])
def test_add_a_family_guide_runs(monkeypatch, family, passes):
    """The guide's two edits made in memory, then its check as written: it passes for seed_oss and
    prints what the page states, and catches helium, whose layers the fused step gets wrong."""
    from squeezegen.models import loading, tiny
    from squeezegen.runtime import decoder

    text = (DOCS / "engine.md").read_text()
    found = re.search(r"<!-- test: add-a-family -->\n```python\n(.*?)^```", text, re.S | re.M)
    assert found, "docs/engine.md lost its marked family check"
    for module, name in ((decoder, "SUPPORTED_MODEL_TYPES"), (tiny, "TINY_CONFIGS")):
        assert f"`{name}`" in text and hasattr(module, name), f"the guide names {name}, which moved"
    supported = (*decoder.SUPPORTED_MODEL_TYPES, family)
    monkeypatch.setattr(decoder, "SUPPORTED_MODEL_TYPES", supported)
    monkeypatch.setattr(loading, "SUPPORTED_MODEL_TYPES", supported)
    name = "tiny-" + family.replace("_", "-")
    monkeypatch.setitem(tiny.TINY_CONFIGS, name, dict(model_type=family, rope_theta=10000.0))
    code = found.group(1).replace('"tiny-seed-oss"', repr(name))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if passes:
            exec(compile(code, "docs/engine.md", "exec", dont_inherit=True), {})
        else:
            with pytest.raises(AssertionError, match="differ from HF generate's"):
                exec(compile(code, "docs/engine.md", "exec", dont_inherit=True), {})
    if passes:
        stated = re.search(r"It prints `(tiny-seed-oss: .*?)`", text)
        assert stated and stated.group(1) == out.getvalue().strip(), "the page states another output"
