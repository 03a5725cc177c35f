"""Tables (markdown, JSON) and plots (accuracy vs KV budget) from evaluation records."""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

from squeezegen.errors import SqueezegenError


def budget_label(budget: float | int | None) -> str:
    if budget is None:
        return "all"
    return f"{budget:.0%}" if isinstance(budget, float) else f"{budget} tok"


def summarize(records: list[dict]) -> list[dict]:
    """Mean score (in %) per task, context, mode, method and budget, with the sample count."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["context"], r["mode"], r["method"], r["budget"])].append(r["score"])
    return [
        {
            "task": t,
            "context": c,
            "mode": m,
            "method": meth,
            "budget": b,
            "accuracy": 100 * sum(s) / len(s),
            "n": len(s),
        }
        for (t, c, m, meth, b), s in groups.items()
    ]


def markdown_tables(summary: list[dict]) -> str:
    """One table per task and question mode: a row per method, a column per context x budget;
    the full cache's accuracy heads each context's columns."""
    out = []
    for task in dict.fromkeys(s["task"] for s in summary):
        for mode in dict.fromkeys(s["mode"] for s in summary):
            rows = [s for s in summary if s["task"] == task and s["mode"] == mode]
            contexts = sorted({s["context"] for s in rows})
            # methods without a budget (token_sparse, rpc) show their one result under every budget
            budgets = sorted(
                {s["budget"] for s in rows if s["budget"] is not None}, key=lambda b: (isinstance(b, int), b)
            ) or [None]
            cell = {(s["method"], s["context"], s["budget"]): s for s in rows}
            n = max(s["n"] for s in rows)
            seen = "question inside the compressed prompt" if mode == "seen" else "question after compression"
            out.append(f"**{task}**, {seen} ({n} samples)\n")
            header = ["method"] + [f"{c} {budget_label(b)}" for c in contexts for b in budgets]
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            full = ["full"] + [f"{cell[('full', c, None)]['accuracy']:.0f}" for c in contexts for _ in budgets]
            out.append("| " + " | ".join(full) + " |")
            for method in dict.fromkeys(s["method"] for s in rows if s["method"] != "full"):
                values = [cell.get((method, c, b)) or cell.get((method, c, None)) for c in contexts for b in budgets]
                shown = [
                    "-" if v is None else f"{v['accuracy']:.0f}" + ("" if v["n"] == n else f" (n={v['n']})")
                    for v in values
                ]
                out.append("| " + " | ".join([method, *shown]) + " |")
            out.append("")
    return "\n".join(out)


def average_table(summary: list[dict]) -> str:
    """RULER's headline: the mean over tasks per method, question mode and budget (each task weighs
    alike, as the leaderboard averages), with the share of the full cache's mean kept."""
    out = []
    for context in sorted({s["context"] for s in summary}):
        rows = [s for s in summary if s["context"] == context]
        tasks = sorted({s["task"] for s in rows})
        modes = list(dict.fromkeys(s["mode"] for s in rows))
        budgets = sorted({s["budget"] for s in rows if s["budget"] is not None}, key=lambda b: (isinstance(b, int), b))
        mean: dict[tuple, float] = {}
        for key in {(s["method"], s["mode"], s["budget"]) for s in rows}:
            cells = [s["accuracy"] for s in rows if (s["method"], s["mode"], s["budget"]) == key]
            if len(cells) == len(tasks):  # a method that misses a task has no average
                mean[key] = sum(cells) / len(cells)
        n = min(s["n"] for s in rows)
        out.append(f"**{context} tokens**, mean of {len(tasks)} tasks, {n} samples each (% of full in brackets)\n")
        header = ["method"] + [f"{m} {budget_label(b)}" for m in modes for b in budgets]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        for method in dict.fromkeys(s["method"] for s in rows):
            cells = []
            for mode in modes:
                full = mean.get(("full", mode, None))
                for budget in budgets:
                    # a method without a budget (full; TSA keeps the whole cache) stands in every column
                    value = mean.get((method, mode, budget), mean.get((method, mode, None)))
                    if value is None:
                        cells.append("-")
                    elif method == "full" or not full:
                        cells.append(f"{value:.1f}")
                    else:
                        cells.append(f"{value:.1f} ({100 * value / full:.0f}%)")
            out.append("| " + " | ".join([method, *cells]) + " |")
        out.append("")
    return "\n".join(out).strip()


def swept_parameter(labels: list[str]) -> tuple[str, str, dict[str, float]] | None:
    """(method, key, value per label) when budget-less labels are one method differing in one
    numeric parameter (a tau sweep of token_sparse), else None."""
    from squeezegen.methods import parse_params

    labels = list(dict.fromkeys(labels))
    specs = [
        (label.partition(":")[0], parse_params([p for p in label.partition(":")[2].split(",") if p]))
        for label in labels
    ]
    if len(labels) < 2 or len({name for name, _ in specs}) != 1:
        return None
    varying = {k for _, params in specs for k in params if len({str(p.get(k)) for _, p in specs}) > 1}
    if len(varying) != 1:
        return None
    key = varying.pop()
    values = {label: params.get(key) for label, (_, params) in zip(labels, specs, strict=True)}
    if not all(isinstance(v, (int, float)) for v in values.values()):
        return None
    return specs[0][0], key, values


def plot_accuracy(summary: list[dict], path: Path) -> None:
    """Accuracy vs KV budget, one panel per task x mode x context, the full cache dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(s["task"], s["mode"], s["context"]) for s in summary})
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    others = [m for m in dict.fromkeys(s["method"] for s in summary) if m != "full"]
    color = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(others)}  # same colour in every panel
    sweep = swept_parameter([s["method"] for s in summary if s["budget"] is None and s["method"] != "full"])
    for ax, (task, mode, context) in zip(axes.flat, panels, strict=False):
        cell = [s for s in summary if (s["task"], s["mode"], s["context"]) == (task, mode, context)]
        for method in dict.fromkeys(s["method"] for s in cell):
            points = sorted((s["budget"], s["accuracy"]) for s in cell if s["method"] == method)
            if method == "full":
                ax.axhline(points[0][1], color="black", linestyle="--", label="full")
            elif points[0][0] is not None:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method, color=color[method])
            elif sweep is None:  # a method without a budget: one level across the axis
                ax.axhline(points[0][1], linestyle=":", label=method, color=color[method])
        if sweep is not None:
            name, key, values = sweep
            points = sorted((values[s["method"]], s["accuracy"]) for s in cell if s["method"] in values)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{name} by {key}")
            ax.set_xscale("log")
            ax.set_xticks([p[0] for p in points], [f"{p[0]:g}" for p in points])
            ax.minorticks_off()
        ax.set_title(f"{task}, {context} tok, question {mode}", fontsize=9)
        ax.set_xlabel("KV budget" if sweep is None else key)
        ax.set_ylabel("accuracy %")
        ax.set_ylim(-5, 105)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    ncol = 3 if cols > 1 else 1
    legend_rows = -(-len(handles) // ncol)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, min(0.5, 0.065 * legend_rows / rows), 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


FINAL_FILES = ("records.json", "summary.json", "table.md", "accuracy_vs_budget.png")

# the settings that decide what a record of a given key measured; a split sweep shares them
MEASURED_ALIKE = ("model", "dtype", "weights", "device", "seed", "max_new_tokens", "chat", "benchmark")
# settings runs did not record before they were part of them, at the values they then had
EARLIER_DEFAULTS = {"weights": "model", "device": "cpu", "benchmark": "squeezegen", "batch_size": 8}


def report_files(out_dir: str | Path) -> dict[str, Path]:
    """The files of an eval report in `out_dir`, by role (see `write_report`)."""
    return {
        key: Path(out_dir) / name
        for key, name in zip(("records", "summary", "table", "plot"), FINAL_FILES, strict=True)
    }


def report_paths(out_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Where the report goes; refuses to replace an earlier report unless `overwrite`."""
    return claim(report_files(out_dir), overwrite)


def refuse_file_as_folder(path: Path, flag: str = "--out") -> None:
    """A folder that is to hold results must not be an existing file (nor lie under one)."""
    for folder in (path, *path.parents):
        try:
            a_file = folder.exists() and not folder.is_dir()
        except OSError as exc:  # a folder above it that cannot be read
            raise SqueezegenError(f"cannot reach {folder} ({exc.strerror}): choose a {flag} you can write to") from None
        if a_file:
            raise SqueezegenError(f"{folder} is a file, not a folder: choose a folder for {flag}")


def refuse_unwritable(path: Path, flag: str = "--out") -> None:
    """Refuse, before any work, a file or folder the command could not write when it ends: an
    existing file is opened for appending (nothing changes), otherwise a scratch file is made and
    removed in the nearest folder that exists (where any missing folders would be made)."""
    path = Path(path)
    try:
        if path.is_file():
            open(path, "ab").close()  # noqa: SIM115 - opened to learn whether it can be, then closed
            return
        folder = path
        while not folder.is_dir():
            folder = folder.parent
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SqueezegenError(
            f"cannot write {path} ({reason}): choose a {flag} you can write to, or change its permissions"
        ) from None


def claim(paths: dict[str, Path], overwrite: bool = False, flag: str = "--out", hint: str = "") -> dict[str, Path]:
    """Refuse, before any work is done, to replace files a user already has (the one place that
    does), or to start work whose results could not be written.

    `flag` is the option that chose the paths, `hint` another way out.
    """
    for p in paths.values():
        refuse_file_as_folder(p.parent, flag)
        if p.is_dir():
            raise SqueezegenError(f"{p} is a folder, where a file is to be written: choose another {flag}")
        refuse_unwritable(p, flag)
    taken = [str(p) for p in paths.values() if p.exists()]
    if taken and not overwrite:
        verb = "exists" if len(taken) == 1 else "exist"
        raise SqueezegenError(f"{', '.join(taken)} already {verb}: choose another {flag}{hint} or pass --overwrite")
    return paths


def run_settings(meta: dict) -> dict | None:
    """The settings an eval report was measured with: stored as `settings` since runs resume,
    read from the command's flags in reports written before; None when the report says nothing."""
    if "settings" in meta:
        return meta["settings"]
    if "model" not in meta:
        return None
    earlier = {k: meta.get(k, EARLIER_DEFAULTS.get(k)) for k in MEASURED_ALIKE if k != "chat"}
    return {**earlier, "chat": not meta.get("no_chat", False)}


def read_report(folder: str | Path) -> tuple[dict | None, list[dict]]:
    """(settings or None, records) of a folder written by `squeezegen eval` or `squeezegen report`."""
    path = Path(folder) / "records.json"
    if not path.is_file():
        raise SqueezegenError(f"{path} does not exist: pass folders written by `squeezegen eval`")
    try:
        data = json.loads(path.read_text())
        return run_settings(data.get("meta") or {}), list(data["records"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise SqueezegenError(
            f"{path} is not a complete eval report (cut short?): finish its run with `squeezegen eval ... --resume`"
        ) from None


def merge_records(folders: list[str | Path]) -> tuple[dict | None, list[dict]]:
    """(shared settings, records) of several `squeezegen eval` reports (one sweep split across
    processes). All must be measured alike (same model, dtype, seed, ...); a record measured in
    more than one (the full cache) is kept once. Where a report does not say how it was measured,
    records of the same key must agree, or they came from different runs and merging is refused."""
    shared: dict | None = None
    first: str | None = None
    merged: dict[tuple, tuple[str, bool, dict]] = {}  # key -> (folder, its settings known, record)
    for folder in folders:
        settings, records = read_report(folder)
        if settings is not None:
            alike = {k: settings.get(k, EARLIER_DEFAULTS.get(k)) for k in MEASURED_ALIKE}
            if shared is None:
                shared, first = alike, str(folder)
            elif alike != shared:
                differing = "; ".join(
                    f"{k}: {shared[k]!r} vs {alike[k]!r}" for k in MEASURED_ALIKE if alike[k] != shared[k]
                )
                raise SqueezegenError(
                    f"{first} and {folder} were measured differently ({differing}): merge only reports of one setup"
                )
        for r in records:
            key = (r["task"], r["context"], r["sample"], r["mode"], r["method"], r["budget"])
            if key not in merged:
                merged[key] = (str(folder), settings is not None, r)
                continue
            where, known, kept = merged[key]
            if not (known and settings is not None) and kept != r:
                raise SqueezegenError(
                    f"{where} and {folder} both hold {r['method']} at budget {budget_label(r['budget'])}, "
                    f"{r['task']} {r['context']} sample {r['sample']} {r['mode']}, with different results: "
                    "they come from different runs; merge only reports of one setup"
                )
    return shared, [r for _, _, r in merged.values()]


def write_report(records: list[dict], paths: dict[str, Path], meta: dict | None = None) -> None:
    """records.json, summary.json, table.md and accuracy_vs_budget.png (see `report_paths`)."""
    paths["table"].parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    paths["records"].write_text(json.dumps({"meta": meta or {}, "records": records}, indent=1))
    paths["summary"].write_text(json.dumps({"meta": meta or {}, "summary": summary}, indent=1))
    paths["table"].write_text(markdown_tables(summary))
    plot_accuracy(summary, paths["plot"])
