"""Held-out perplexity of 1-bit models against the wall-clock time they were trained for.

Each point is one `squeezegen binarize ... --time-budget SECONDS` run from scratch (a shorter budget
is not a stop along a longer run: each budget gets its own schedule), for every recipe, method and
budget asked, run one after another so each has the machine to itself. Each point records its host
and a curve compares points of one CPU class only (a faster CPU trains more tokens in the same
minutes). The models go to `--runs`; a point already in `--out` for this host's class is kept and
skipped, an interrupted run goes on with `--resume`, so the script can be run again until every
point is there. `curve.json`, `curve.png` and each run's report (`reports/`) are written to `--out`
after each run.

    .venv/bin/python benchmarks/binary_budget.py --budgets 300 1200 --out docs/results/binarymos/budget
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from squeezegen.runtime.device import host


def run_one(model: str, recipe: str, method: str, budget: int, folder: Path) -> dict:
    """One `binarize` run (resumed if it was cut off); its report and the command's wall time."""
    cmd = [sys.executable, "-m", "squeezegen.cli", "binarize", "--model", model, "--method", method]
    cmd += ["--recipe", recipe, "--time-budget", str(budget), "--decode-tokens", "0", "--out", str(folder)]
    if folder.with_name(folder.name + ".ckpt").is_dir():
        cmd.append("--resume")
    print(" ".join(cmd[2:]), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    report = json.loads((folder / "binarize_report.json").read_text())
    return {"report": report, "wall_s": time.perf_counter() - started}


def point(recipe: str, method: str, budget: int, report: dict, wall_s: float) -> dict:
    held = report["held_out"]
    trained = report["recipe"]
    return {
        "host": host(),
        "recipe": recipe,
        "method": method,
        "budget_s": budget,
        "wall_s": wall_s,
        "training_s": report["train"]["seconds"],
        "block_tokens": sum(r["tokens"] for r in trained["blocks"]) // max(1, len(trained["blocks"])),
        "end_to_end_tokens": trained["end_to_end_tokens"],
        "data_tokens": trained["data_tokens"],
        "bits_per_weight": report["bits_per_weight"],
        "dtype": report["dtype"],
        **{f"perplexity_{name}": p["binary"] for name, p in held.items()},
        **{f"float_{name}": p["float"] for name, p in held.items()},
        **{f"tokens_{name}": p["tokens"] for name, p in held.items()},
    }


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(dict.fromkeys(p["host"]["cpu_class"] for p in points))
    fig, axes = plt.subplots(1, len(classes), figsize=(6 * len(classes), 4), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], classes, strict=True):
        mine = [p for p in points if p["host"]["cpu_class"] == kind]
        for key in sorted({(p["recipe"], p["method"]) for p in mine}):
            line = sorted((p for p in mine if (p["recipe"], p["method"]) == key), key=lambda p: p["budget_s"])
            style = "-o" if key[0] == "blockwise" else "--s"
            ax.plot(
                [p["budget_s"] / 60 for p in line],
                [p["perplexity_cpython-docs"] for p in line],
                style,
                label=" ".join(key),
            )
        ax.axhline(mine[0]["float_cpython-docs"], color="gray", lw=0.8, label="float model")
        ax.set(
            xscale="log", yscale="log", xlabel="training budget (minutes, 2 CPU cores)", title=mine[0]["host"]["cpu"]
        )
        ax.legend(fontsize=8)
    axes[0][0].set(ylabel="held-out perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipes", nargs="+", default=["blockwise", "end-to-end"])
    parser.add_argument("--methods", nargs="+", default=["binarymos", "onebit", "sign"])
    parser.add_argument("--budgets", nargs="+", type=int, default=[300, 1200, 3600, 7200], help="seconds")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=Path, default=Path("runs/binary-budget"), help="where the models go")
    args = parser.parse_args()
    runs, reports = args.runs, args.out / "reports"
    runs.mkdir(parents=True, exist_ok=True)
    reports.mkdir(parents=True, exist_ok=True)
    record = args.out / "curve.json"
    points = json.loads(record.read_text())["points"] if record.is_file() else []
    here = host()
    for budget in args.budgets:
        for recipe in args.recipes:
            for method in args.methods:
                key = (here["cpu_class"], recipe, method, budget)
                if any((p["host"]["cpu_class"], p["recipe"], p["method"], p["budget_s"]) == key for p in points):
                    continue
                folder = runs / f"{here['cpu_class']}-{recipe}-{method}-{budget}"
                result = run_one(args.model, recipe, method, budget, folder)
                (reports / f"{folder.name}.json").write_text(json.dumps(result["report"], indent=1))
                points.append(point(recipe, method, budget, result["report"], result["wall_s"]))
                doc = {"meta": {"model": args.model}, "points": points}
                record.write_text(json.dumps(doc, indent=1))
                plot(points, args.out / "curve.png")


if __name__ == "__main__":
    main()
