"""Eval records written the way kvpress's evaluation lays out its results, so our numbers can be set
beside its leaderboard: one folder per dataset, and in it one folder per (model, press, compression
ratio) with `predictions.csv` and `metrics.json`.

kvpress's convention: **compression_ratio is the fraction of the KV cache removed** (0.75 keeps 25%);
our budgets are the fraction kept, so ratio = 1 - budget (a token budget counts against the
context length). The question-inside-the-prompt ("seen") mode is kvpress's `query_aware` and gets
that suffix; the unseen mode, its default, has none.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path


def compression_ratio(budget: float | int | None, context: int) -> float:
    """kvpress's ratio (fraction removed) for one of our budgets (fraction kept, or tokens)."""
    if budget is None:
        return 0.0
    kept = budget if isinstance(budget, float) else budget / context
    return round(1.0 - min(1.0, kept), 4)


def run_folder(record: dict, model: str) -> Path:
    """<dataset>/<model>__<press>__<ratio>[__query_aware] for one record."""
    ratio = compression_ratio(record["budget"], record["context"])
    press = record["method"].replace(":", "_").replace(",", "_").replace("=", "-")
    name = "__".join([model.replace("/", "--"), press, f"{ratio:.2f}"])
    if record["mode"] == "seen":
        name += "__query_aware"
    return Path(f"{record['task']}_{record['context']}") / name


def write_kvpress_layout(records: list[dict], model: str, folder: str | Path) -> list[Path]:
    """Write every run's predictions.csv and metrics.json under `folder`; returns the run folders.
    metrics.json holds {task: {"string_match": percent}} as kvpress's RULER scorer reports it."""
    runs: dict[Path, list[dict]] = defaultdict(list)
    for r in records:
        runs[run_folder(r, model)].append(r)
    written = []
    for rel, rows in sorted(runs.items()):
        out = Path(folder) / rel
        out.mkdir(parents=True, exist_ok=True)
        rows = sorted(rows, key=lambda r: r["sample"])
        with open(out / "predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sample", "answer", "predicted_answer", "score"])
            for r in rows:
                writer.writerow([r["sample"], json.dumps(r["answers"]), r["output"], r["score"]])
        score = 100 * sum(r["score"] for r in rows) / len(rows)
        metrics = {rows[0]["task"]: {"string_match": round(score, 2)}}
        config = {
            "dataset": rel.parts[0],
            "model": model,
            "press_name": rows[0]["method"],
            "compression_ratio": compression_ratio(rows[0]["budget"], rows[0]["context"]),
            "query_aware": rows[0]["mode"] == "seen",
            "samples": len(rows),
        }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (out / "config.json").write_text(json.dumps(config, indent=1))
        written.append(out)
    return written
