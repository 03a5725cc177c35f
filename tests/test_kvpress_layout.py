"""Eval records in kvpress's evaluation layout: ratios by its convention (fraction removed), folders, metrics."""

import csv
import json

from squeezegen.evals.kvpress_layout import compression_ratio, write_kvpress_layout


def record(sample, method, budget, mode, score):
    return {
        "task": "niah_number",
        "context": 4096,
        "sample": sample,
        "mode": mode,
        "method": method,
        "budget": budget,
        "score": score,
        "output": f"answer {sample}",
        "answers": ["123"],
    }


def test_ratio_is_the_fraction_removed():
    assert compression_ratio(0.25, 4096) == 0.75
    assert compression_ratio(1024, 4096) == 0.75  # a token budget counts against the context
    assert compression_ratio(None, 4096) == 0.0
    assert compression_ratio(8192, 4096) == 0.0


def test_one_folder_per_dataset_press_and_ratio(tmp_path):
    records = [record(i, "kvzip", 0.25, "unseen", float(i < 3)) for i in range(4)]
    records += [record(i, "snapkv:chunk=20", 0.1, "seen", 1.0) for i in range(2)]
    records += [record(i, "full", None, "unseen", 1.0) for i in range(2)]
    folders = write_kvpress_layout(records, "org/model", tmp_path)
    names = sorted(f.relative_to(tmp_path).as_posix() for f in folders)
    assert names == [
        "niah_number_4096/org--model__full__0.00",
        "niah_number_4096/org--model__kvzip__0.75",
        "niah_number_4096/org--model__snapkv_chunk-20__0.90__query_aware",
    ]
    kvzip = tmp_path / names[1]
    assert json.loads((kvzip / "metrics.json").read_text()) == {"niah_number": {"string_match": 75.0}}
    rows = list(csv.DictReader(open(kvzip / "predictions.csv")))
    assert [r["sample"] for r in rows] == ["0", "1", "2", "3"] and rows[3]["score"] == "0.0"
    config = json.loads((tmp_path / names[2] / "config.json").read_text())
    assert config["query_aware"] is True and config["compression_ratio"] == 0.9
