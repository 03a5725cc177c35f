"""The package's imports point down a fixed order of layers, and no modules import one another in a cycle.

The layers, from bottom to top (a module may import its own layer and those below it):

    0  root utility modules  errors, files, paths, quiet_imports, version
    1  runtime               the engine: decoder, KV cache, attention, sampling, generate
    2  methods, quant, mobile  KV / attention methods, 1-bit weights, mobile Stable Diffusion: side by
                             side, and none of the three imports another
    3  models                loading by name or path (a 1-bit folder through quant)
    4  evals                 corpora, tasks, perplexity, reports
    5  bench                 measurements side by side
    6  serve, integrations   the OpenAI server; the methods inside other engines (vLLM), side by side
    7  cli                   the `squeezegen` command

The package root (squeezegen/__init__.py, the facade of `import squeezegen as sg`) may import any of them,
and no module inside the package imports it. Every import counts for the layer order: at module level,
inside functions, under TYPE_CHECKING. For cycles, imports under TYPE_CHECKING do not count: they never
run, and a type named in an annotation (the hook contract naming the Engine it is called by) couples
nothing at import time. `from a.b import c` reads module a.b.c when there is one, else a.b.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "squeezegen"
ROOT = "squeezegen"
UTILITIES = ("errors", "files", "paths", "quiet_imports", "version")
LEVELS = {
    "utilities": 0,
    "runtime": 1,
    "methods": 2,
    "quant": 2,
    "mobile": 2,
    "models": 3,
    "evals": 4,
    "bench": 5,
    "serve": 6,
    "integrations": 6,
    "cli": 7,
}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = [ROOT, *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines of the statements under `if TYPE_CHECKING:`."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for inner in node.body:
                lines.update(range(inner.lineno, (inner.end_lineno or inner.lineno) + 1))
    return lines


def _imports(name: str, path: Path, runtime_only: bool = False) -> list[tuple[int, str, str]]:
    """(line, what the statement names, the package module it reads) for every import of the package
    (without those under TYPE_CHECKING if `runtime_only`)."""
    is_package = path.name == "__init__.py"
    found = []
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for alias in node.names:
                found.append((node.lineno, base, f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base))
    return sorted({entry for entry in found if entry[1].split(".")[0] == ROOT})


def _layer(module: str) -> str:
    """The folder a module lies in (`utilities` for the modules beside the root), or the root."""
    if "." not in module:
        return ROOT
    top = module.split(".")[1]
    return "utilities" if top in UTILITIES else top


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    unplaced = sorted({_layer(m) for m in MODULES} - {ROOT, *LEVELS})
    assert not unplaced, f"squeezegen/{unplaced[0]} is in no layer: add it to LEVELS or UTILITIES (and the docstring)"


def test_imports_name_modules_that_exist():
    missing = [f"{source} line {line}: {target}" for source, found in IMPORTS.items() for line, _, target in found]
    missing = [entry for entry in missing if entry.rsplit(": ", 1)[1] not in MODULES]
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_nothing_inside_imports_the_package_root():
    offending = [
        f"{source} line {line}"
        for source, found in IMPORTS.items()
        for line, named, target in found
        if named == ROOT or target == ROOT
    ]
    assert not offending, "import the module that holds the name, not `squeezegen`:\n" + "\n".join(offending)


def test_imports_point_down():
    offending = []
    for source, found in IMPORTS.items():
        here = _layer(source)
        if here == ROOT:
            continue  # the facade re-exports every layer
        for line, _, target in found:
            there = _layer(target)
            if there in (here, ROOT) or there not in LEVELS or here not in LEVELS:
                continue  # the root and unplaced modules are the other tests' to report
            if LEVELS[there] > LEVELS[here]:
                offending.append(f"{source} line {line} imports {target}: up from {here} to {there}")
            elif LEVELS[there] == LEVELS[here]:
                offending.append(f"{source} line {line} imports {target}: sideways from {here} to {there}")
    assert not offending, "imports against the layer order:\n" + "\n".join(offending)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            step = next(successors, None)
            if step is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
            elif step not in index:
                index[step] = low[step] = len(index)
                stack.append(step)
                on_stack.add(step)
                work.append((step, iter(sorted(graph[step]))))
            elif step in on_stack:
                low[node] = min(low[node], index[step])
    return components


def test_no_import_cycles():
    runtime = {name: _imports(name, path, runtime_only=True) for name, path in MODULES.items()}
    graph = {name: {t for _, _, t in found if t in MODULES and t != name} for name, found in runtime.items()}
    cycles = _cycles(graph)
    assert not cycles, "modules that import one another (through the others listed):\n" + "\n".join(
        ", ".join(c) for c in cycles
    )


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_members(tree: ast.AST) -> set[str]:
    """The private attributes a module's classes define: `self._x = ...` and private methods."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            names.update([node.attr] if _private(node.attr) and isinstance(node.ctx, ast.Store) else [])
        if isinstance(node, ast.ClassDef):
            names.update(f.name for f in node.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef))
    return {n for n in names if _private(n)}


def _folder_privates(sources: dict[str, ast.AST]) -> list[str]:
    """Where one folder reaches a private name of another: `from x import _name`, or `obj._attr`
    where `_attr` is a member only classes of other folders define (a third party's private
    attribute, such as torch's `tensor._version`, is defined by none and not counted)."""
    members: dict[str, set[str]] = {}
    for name, tree in sources.items():
        members.setdefault(_layer(name), set()).update(_private_members(tree))
    found = []
    for name, tree in sources.items():
        here = _layer(name)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(f"{ROOT}."):
                for alias in node.names:
                    if _private(alias.name) and _layer(node.module) != here:
                        found.append(f"{name} line {node.lineno}: from {node.module} import {alias.name}")
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    continue
                owners = [folder for folder, names in members.items() if node.attr in names]
                if owners and here not in owners:
                    found.append(f"{name} line {node.lineno}: .{node.attr} of {', '.join(owners)}")
    return found


def test_no_folder_reaches_another_folders_private_names():
    sources = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}
    found = _folder_privates(sources)
    assert not found, "make it a public, documented name of its folder:\n" + "\n".join(found)


def test_the_private_name_check_finds_both_kinds():
    engine = "class Engine:\n    def __init__(self):\n        self._lengths = []\n"
    method = "from squeezegen.runtime.engine import _helper\n\ndef f(engine):\n    return engine._lengths, x._version\n"
    sources = {"squeezegen.runtime.engine": ast.parse(engine), "squeezegen.methods.snapkv": ast.parse(method)}
    assert _folder_privates(sources) == [
        "squeezegen.methods.snapkv line 1: from squeezegen.runtime.engine import _helper",
        "squeezegen.methods.snapkv line 4: ._lengths of runtime",
    ]
