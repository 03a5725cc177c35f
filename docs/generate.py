"""Render the result tables of README.md and docs/**/*.md from the committed JSON under docs/results/.

    .venv/bin/python docs/generate.py           rewrite every generated table in place
    .venv/bin/python docs/generate.py --check   only compare; exit 1 and name the stale tables

A generated table sits between two markers:

    <!-- generated: results/bench/bench.json bench -->
    ...
    <!-- end generated -->

The path is relative to docs/ (whichever file holds the marker) and names a committed JSON (or JSONL)
file; the word after it names a renderer below. Renderers reuse the library's own table functions
where there is one; an index file (a JSON naming other result files) lets one table draw on several
runs. Nothing between the markers is kept: edit the JSON or the renderer, then rerun this script.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from collections.abc import Callable
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
MARKER = re.compile(
    r"(?P<open><!-- generated: (?P<path>\S+) (?P<renderer>[\w-]+) -->\n)(?P<body>.*?)(?P<close><!-- end generated -->)",
    re.S,
)
MiB = 2**20


def pages() -> list[Path]:
    """Every markdown file that may hold generated tables."""
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def load(path: str) -> object:
    """A result file by its path relative to docs/: JSON, or JSONL as a list of objects."""
    file = DOCS / path
    if not file.is_file():
        raise SystemExit(f"docs/generate.py: {path} (relative to docs/) does not exist")
    if file.suffix == ".jsonl":
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return json.loads(file.read_text())


def rows_of(doc: object, key: str | None) -> list[dict]:
    if isinstance(doc, list):
        return doc
    return doc[key] if key else [doc]


def select(source: dict) -> dict:
    """The one row of `source["from"]` (in its list `source["list"]`) matching every `where` item."""
    rows = rows_of(load(source["from"]), source.get("list"))
    where = source.get("where", {})
    found = [r for r in rows if all(r.get(k) == v for k, v in where.items())]
    if len(found) != 1:
        raise SystemExit(f"docs/generate.py: {len(found)} rows of {source['from']} match {where}; need exactly one")
    return found[0]


class CellFormatter(string.Formatter):
    """str.format with one extra conversion: `!M` turns bytes into MiB."""

    def convert_field(self, value, conversion):
        if conversion == "M":
            return value / MiB
        return super().convert_field(value, conversion)


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- renderers: (the loaded JSON, its path) -> markdown ---------------------------------------------


def render_eval(doc: dict, path: str) -> str:
    from squeezegen.evals.report import markdown_tables

    return markdown_tables(doc["summary"]).strip()


def render_ruler(doc: dict, path: str) -> str:
    """RULER's mean over its tasks per method, mode and budget (the per-task tables: `eval`)."""
    from squeezegen.evals.report import average_table

    settings = doc["meta"]["settings"]
    return f"{average_table(doc['summary'])}\n\n{settings['model']} in {settings['dtype']} on {_machine(doc)}"


def _machine(doc: dict) -> str:
    """The host a result file records: 'AMD EPYC (avx512-bf16, 2 cores)'."""
    host = doc["meta"].get("host", {})
    return f"{host.get('cpu', '?')} ({host.get('cpu_class', '?')}, {host.get('cores', '?')} cores)"


def render_math(doc: dict, path: str) -> str:
    """Accuracy, generated tokens, decode tokens/s and peak KV per method of a gsm8k/aime2025 run."""
    from squeezegen.evals.math_problems import math_table

    settings = doc["meta"]["settings"]
    head = (
        f"{settings['benchmark']}, {settings['samples']} problems, {settings['model']} in {settings['dtype']} "
        f"({settings['weights']} weights), batch {settings['batch_size']}, at most {settings['max_new_tokens']} "
        f"new tokens, on {_machine(doc)}"
    )
    return f"{head}\n\n{math_table(doc['records'])}"


def render_bench(doc: dict, path: str) -> str:
    from squeezegen.bench.runner import markdown_table

    return markdown_table(doc["rows"])


def render_bench_long(doc: dict, path: str) -> str:
    from squeezegen.bench.long_generation import markdown_table

    return markdown_table(doc["rows"])


def render_tsa_layers(doc: dict, path: str) -> str:
    from squeezegen.bench.sparse_prefill import markdown_report

    return "\n\n".join(markdown_report(result) for result in doc["results"])


def render_needle(doc: dict, path: str) -> str:
    from squeezegen.evals.reasoning import accuracy_table

    return accuracy_table(doc["records"])


def render_perplexity(doc: dict, path: str) -> str:
    from squeezegen.evals.perplexity import markdown_table

    meta = doc["meta"]
    return markdown_table(doc["perplexity"], meta["context"], meta["continuation"], meta["texts"])


def render_table(doc: dict, path: str) -> str:
    """An index of rows: literal `cells`, or `cells` as format strings over the rows its `sources` select
    (`{0[key]}` is the first source's row; `!M` turns bytes into MiB)."""
    fmt = CellFormatter()
    out = []
    for row in doc["rows"]:
        picked = [select(s) for s in row.get("sources", [])]
        out.append([fmt.format(cell, *picked) if picked else cell for cell in row["cells"]])
    return table(doc["columns"], out)


def render_demo(doc: dict, path: str) -> str:
    lines = [
        f"question after ~{doc['context_tokens']} tokens of Python documentation prose: {doc['question']}",
        f"expected answer: {doc['expected']}",
        "",
        "| method | answer | correct | prompt tokens | prefill s | decode tok/s | KV cache MiB | vs full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        ratios = f"prefill {r['prefill_vs_full']:.2f}x, decode {r['decode_vs_full']:.2f}x, KV {r['kv_vs_full']:.0%}"
        lines.append(
            f"| {r['method']} | {r['answer']} | {'yes' if r['correct'] else 'no'} | {r['prompt_tokens']} "
            f"| {r['prefill_s']:.2f} | {r['decode_tok_s']:.1f} | {r['kv_mib']:.1f} | {ratios} |"
        )
    return "```\n" + "\n".join(lines) + "\n```"


def render_engine_vs_hf(doc: dict, path: str) -> str:
    header = [
        "run",
        "HF prefill s",
        "engine prefill s",
        "prefill, engine vs HF",
        "HF decode tok/s",
        "engine decode tok/s",
        "decode, engine vs HF",
    ]
    rows = [
        [
            r["run"],
            f"{r['hf_prefill_s']:.2f}",
            f"{r['engine_prefill_s']:.2f}",
            f"{r['prefill_ratio']:.2f}x as fast",
            f"{r['hf_decode_tok_s']:.2f}",
            f"{r['engine_decode_tok_s']:.2f}",
            f"{r['decode_ratio']:.2f}x",
        ]
        for r in doc["runs"]
    ]
    return table(header, rows)


def render_decode_profile(doc: dict, path: str) -> str:
    rows = [
        [r["cache_tokens"], f"{r['total']:.1f}", f"{r['linear']:.1f}", f"{r['attention']:.1f}", f"{r['other']:.1f}"]
        for r in doc["rows"]
    ]
    return table(["cache tokens", "total", "linear layers", "attention", "other"], rows)


def render_rpc_nll(doc: dict, path: str) -> str:
    """Pooled NLL per method over the forced tokens, and the mean KV each method's schedule holds."""
    from squeezegen.methods import RPC

    meta = doc["meta"]
    prompt, steps = meta["context"], meta["continuation"] - 1
    full_nll = _mean_nll(doc["nll"]["full"])
    full_kv = prompt + (1 + steps) / 2
    rows = []
    for label, per_text in doc["nll"].items():
        name, _, budget = label.partition("@")
        if name == "full":
            cap, held = "all", [prompt + n for n in range(1, steps + 1)]
        elif name == "rpc":
            rpc = RPC()
            held = [prompt + rpc.generated_held(n) for n in range(1, steps + 1)]
            cap = f"own schedule, peak {max(held):,}"
        else:
            limit = int(budget)
            cap, held = f"{limit:,}", [prompt + min(n, limit - prompt) for n in range(1, steps + 1)]
        mean_kv = sum(held) / len(held)
        nll = _mean_nll(per_text)
        vs = "—" if name == "full" else f"{nll / full_nll - 1:+.1%}"
        rows.append(
            [
                name,
                cap,
                f"{mean_kv:,.0f} ({mean_kv / full_kv:.0%})",
                f"{nll:.3f}",
                vs,
                f"{doc['perplexity'][label]:.2f}",
            ]
        )
    header = ["method", "KV cap (tokens)", "mean KV over the run", "mean NLL", "vs full", "perplexity"]
    return table(header, rows)


def _mean_nll(per_text: list[list[float]]) -> float:
    values = [x for text in per_text for x in text]
    return sum(values) / len(values)


def _layer_list(layers: list[int]) -> str:
    """[3, 4, 5, 6, 7, 9, 16, 17] -> "3–7, 9, 16, 17": runs of three or more as ranges."""
    parts, run = [], [layers[0]]
    for layer in layers[1:]:
        if layer == run[-1] + 1:
            run.append(layer)
            continue
        parts.append(run)
        run = [layer]
    parts.append(run)
    return ", ".join(f"{r[0]}–{r[-1]}" if len(r) >= 3 else ", ".join(map(str, r)) for r in parts)


def render_tsa_summary(doc: dict, path: str) -> str:
    header = [
        "model, context",
        "sparse layers",
        "tokens dropped per layer",
        "attention in sparse layers, dense → TSA",
        "speedup",
        "TSA overhead (share of its attention time)",
        "prefill, dense → TSA",
    ]
    rows = []
    for entry in doc["rows"]:
        (result,) = load(entry["from"])["results"]
        layers = result["layers"]
        drops = [x["dropped"] for x in layers]
        dropped = (
            ", ".join(f"{d:.1%}" for d in drops) if len(drops) <= 2 else f"{min(drops):.1%}–{max(drops):.1%}"
        ).replace("%–", "–")
        rows.append(
            [
                entry["label"],
                entry["layers_prefix"] + _layer_list([x["layer"] for x in layers]),
                dropped,
                f"{result['attention_dense_s']:.2f} s → {result['attention_tsa_s']:.2f} s",
                f"{result['attention_speedup']:.2f}x",
                f"{result['overhead_share']:.1%}",
                f"{result['prefill_dense_s']:.1f} s → {result['prefill_tsa_s']:.1f} s "
                f"({result['prefill_speedup']:.2f}x)",
            ]
        )
    rows.append(doc["paper"])
    return table(header, rows)


def render_tsa_accuracy(doc: dict, path: str) -> str:
    taus = doc["taus"]
    rows = []
    for entry in doc["rows"]:
        summary = load(entry["from"])["summary"]
        full = next(s for s in summary if s["method"] == "full")
        by_tau = {}
        for s in summary:
            found = re.search(r"tau=([0-9.]+)", s["method"])
            if found:
                by_tau[float(found.group(1))] = f"{s['accuracy']:.0f}%"
        cells = [by_tau.get(tau, "") for tau in taus]
        rows.append([entry["label"], full["n"], f"{full['accuracy']:.0f}%", *cells])
    return table(["sparse layers (how chosen)", "samples", "dense", *(f"tau {t}" for t in taus)], rows)


def render_binary(doc: dict, path: str) -> str:
    float_run, sign, onebit, mos = (load(doc[k]) for k in ("float", "sign", "onebit", "binarymos"))
    decode = load(doc["decode"])
    binary = [sign, onebit, mos]
    linear = float_run["bytes"]["float32_linear"]

    def kl(run: dict) -> str:
        return f"{run['history'][-1]['kl']:.1f}" if run["history"] else "—"

    def speed(name: str) -> str:
        if name not in decode["tokens_per_s"]:
            return "—"
        return f"{decode['tokens_per_s'][name]:.1f} ({decode['vs_reference'][name]:.2f}x)"

    header = [
        "SmolLM2-135M, held-out CPython docs",
        "float32",
        "plain sign (no training)",
        "OneBit",
        "BinaryMoS (E = 4)",
    ]
    rows = [
        ["perplexity", f"{float_run['perplexity_float']:.2f}"] + [f"{r['perplexity_binary']:,.0f}" for r in binary],
        ["bits per weight (binarized linear layers)", "32"] + [f"{r['bits_per_weight']:.3f}" for r in binary],
        ["linear layers on disk", f"{linear / MiB:.1f} MiB"]
        + [
            f"{r['bytes']['binary_linear'] / MiB:.1f} MiB (1/{linear / r['bytes']['binary_linear']:.1f})"
            for r in binary
        ],
        ["whole checkpoint", f"{float_run['float_model_bytes'] / MiB:.0f} MiB"]
        + [f"{r['bytes']['total'] / MiB:.1f} MiB" for r in binary],
        ["final KL to the teacher (train)", "—"] + [kl(r) for r in binary],
        ["decode tokens/s, packed (`bench-binary`)", f"{decode['tokens_per_s'][decode['reference']]:.1f}"]
        + [speed(r["binarization"]["method"]) for r in binary],
    ]
    return table(header, rows)


def render_binary_runs(doc: dict, path: str) -> str:
    """Distillation runs side by side: their recipe, budget and held-out perplexity, with the
    perplexity at each `--eval-every` checkpoint (the curve against tokens seen)."""
    rows = []
    for run in doc["runs"]:
        report = load(run["report"])
        train = report["train"]
        curve = ", ".join(
            f"{p['tokens'] / 1000:.0f}K: {p['held_out_perplexity']:,.0f}" for p in report.get("held_out_curve", [])
        )
        rows.append(
            [
                run["label"],
                report["binarization"]["method"],
                train["loss"],
                f"{train['lr']:.0e}",
                f"{train['tokens']:,}",
                f"{report['perplexity_binary']:,.0f}",
                f"{report['history'][-1]['kl']:.2f}",
                curve or "—",
            ]
        )
    header = ["run", "method", "loss", "lr", "tokens", "held-out perplexity, packed", "last KL (train)", doc["curve"]]
    return table(header, rows)


def render_binary_budget(doc: dict, path: str) -> str:
    """Held-out perplexity per recipe and method at each time budget (`benchmarks/binary_budget.py`),
    on both held-out sets, with the tokens each run trained on; one table per CPU class, since a
    faster CPU trains more tokens in the same minutes."""
    by_class: dict[str, list[dict]] = {}
    for p in doc["points"]:
        by_class.setdefault(p["host"]["cpu_class"], []).append(p)
    return "\n\n".join(_binary_budget_table(doc["meta"]["model"], points) for points in by_class.values())


def _binary_budget_table(model: str, points: list[dict]) -> str:
    budgets = sorted({p["budget_s"] for p in points})
    first = points[0]
    float_row = ["float model", "—"] + [
        f"{first['float_cpython-docs']:.2f} / {first['float_essays']:.2f}" for _ in budgets
    ]
    rows = [float_row]
    for key in dict.fromkeys((p["recipe"], p["method"]) for p in points):
        cells = []
        for budget in budgets:
            found = [p for p in points if (p["recipe"], p["method"], p["budget_s"]) == (*key, budget)]
            cells.append(
                f"{found[0]['perplexity_cpython-docs']:,.0f} / {found[0]['perplexity_essays']:,.0f}" if found else "—"
            )
        rows.append([key[1], key[0], *cells])
    header = ["model", "recipe", *(f"{b / 60:g} min" for b in budgets)]
    sizes = ", ".join(
        f"{b / 60:g} min: "
        + "; ".join(
            f"{p['recipe']} {p['method']} {p['block_tokens'] / 1000:.0f}K a block + "
            f"{p['end_to_end_tokens'] / 1000:.0f}K end to end, training {p['training_s'] / 60:.1f} of "
            f"{p['wall_s'] / 60:.1f} min"
            for p in points
            if p["budget_s"] == b
        )
        for b in budgets
    )
    head = (
        f"{model} ({first['dtype']}), held-out perplexity on CPython docs ({first['tokens_cpython-docs']:,} tokens) "
        f"/ essays ({first['tokens_essays']:,} tokens), on {_machine({'meta': {'host': first['host']}})}"
    )
    note = "Tokens each block and the end-to-end stage trained on, and training time within each command's wall time"
    return f"{head}\n\n{table(header, rows)}\n\n{note}: {sizes}."


def render_binary_paper(doc: dict, path: str) -> str:
    rows = [[r["model"], *(" / ".join(f"{x:.2f}" for x in r[c]) for c in doc["columns"])] for r in doc["rows"]]
    return table([f"paper, {doc['metric'].split(', ')[1]}", *doc["columns"]], rows)


def render_tiny_sd_sizes(doc: dict, path: str) -> str:
    rows = [
        [
            RECIPE_NAMES.get(r["recipe"], r["recipe"]),
            *(f"{r[m]:.2f} MiB" for m in ("text_encoder", "unet", "vae_decoder")),
        ]
        for r in doc["rows"]
    ]
    return table(["recipe", "text encoder", "UNet", "VAE decoder"], rows)


MINI_BACKENDS = {
    "pytorch": "PyTorch",
    "litert-fp32": "LiteRT fp32",
    "litert-fp16": "LiteRT fp16",
    "litert-int8-weight-only": "LiteRT int8 weight-only",
    "litert-int8-dynamic": "LiteRT int8 dynamic",
    "litert-fp16-gpu": "LiteRT fp16, GPU accelerator (software Vulkan)",
}


def render_mobile_mini(doc: dict, path: str) -> str:
    header = [
        "backend",
        "classifier accuracy",
        "files (MiB, incl. embedding table)",
        "mean abs pixel diff vs PyTorch (0–255)",
        f"UNet time, {doc['images']} images × {doc['steps']} steps",
    ]
    rows = []
    for key, r in doc["backends"].items():
        files = f"{r['bytes'] / MiB:.2f}" if "bytes" in r else "–"
        diff = f"{r['mean_abs_pixel_diff_vs_pytorch']:.2f}" if "mean_abs_pixel_diff_vs_pytorch" in r else "–"
        rows.append([MINI_BACKENDS.get(key, key), f"{r['accuracy']:.0%}", files, diff, f"{r['unet_s']:.2f} s"])
    return table(header, rows)


MODELS = {"sd15": "SD 1.5", "sd21-base": "SD 2.1-base"}
RECIPES = ["fp32", "fp16", "int8-weight-only", "int8-dynamic"]
MODULES = ["unet", "text_encoder", "vae_decoder"]
MODULE_NAMES = {"unet": "UNet", "text_encoder": "text encoder", "vae_decoder": "VAE decoder"}
RECIPE_NAMES = {"int8-weight-only": "int8 weight-only", "int8-dynamic": "int8 dynamic"}


def _mb(n: float) -> str:
    """Bytes as the tables show them: MB = 10^6 bytes below 1000 MB, GB above."""
    return f"{n / 1e6:.0f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def render_mobile_sizes(doc: list[dict], path: str) -> str:
    """File sizes per model, recipe and module: the first line of each (model, module, recipe), since
    the sizes do not depend on the resolution."""
    first: dict[tuple, dict] = {}
    for r in doc:
        first.setdefault((r["model"], r["module"], r["recipe"]), r)
    rows = []
    for model in MODELS:
        for recipe in RECIPES:
            te, unet, vae = (first[(model, m, recipe)] for m in ("text_encoder", "unet", "vae_decoder"))
            parts = " + ".join(f"{b / 1e6:.0f}" for b in unet["part_bytes"])
            table_bytes = unet["token_embedding_bytes"]
            total = te["bytes"] + unet["bytes"] + vae["bytes"] + table_bytes
            rows.append(
                [
                    MODELS[model],
                    RECIPE_NAMES.get(recipe, recipe),
                    _mb(te["bytes"]),
                    f"{_mb(unet['bytes'])} ({parts})",
                    _mb(vae["bytes"]),
                    _mb(table_bytes),
                    _mb(total),
                ]
            )
    header = ["model", "recipe", "text encoder", "UNet (4 parts)", "VAE decoder", "embedding table", "total"]
    return table(header, rows)


def render_mobile_latency(doc: dict, path: str) -> str:
    """Every UNet export and every timed export, grouped by module, model, recipe and size; rows from
    the earlier session carry no star."""
    lines = load(doc["data"])
    earlier = set(doc["earlier_lines"])
    chosen = [(number, r) for number, r in enumerate(lines, 1) if r["module"] == "unet" or r.get("latency_threads")]
    chosen.sort(
        key=lambda x: (
            MODULES.index(x[1]["module"]),
            list(MODELS).index(x[1]["model"]),
            RECIPES.index(x[1]["recipe"]),
            x[1]["size"],
            x[0],
        )
    )
    rows = []
    for number, r in chosen:
        star = "" if number in earlier else "*"
        if r["module"] == "unet":
            module, size = f"UNet ({r['unet_parts']} parts)", f"{r['size']}×{r['size']}"
            times = r.get("unet_step_s")
            latency = f"{', '.join(f'{t:.3g} s' for t in times)} per step (batch {r['cfg_batch']})" if times else ""
        else:
            module = MODULE_NAMES[r["module"]]
            size = f"{r['size']}×{r['size']}" if r["module"] == "vae_decoder" else "–"
            latency = f"{', '.join(f'{t:.3g} s' for t in r['call_s'])} per call"
        latency = (latency or "– (size only)") + star
        rows.append(
            [
                MODELS[r["model"]],
                module,
                RECIPE_NAMES.get(r["recipe"], r["recipe"]),
                size,
                f"{r['export_s']:.0f} s",
                f"{r['peak_rss_gib']:.2f} GiB",
                latency,
            ]
        )
    header = ["model", "module", "recipe", "size", "export time", "peak RSS", "LiteRT CPU, 1 thread"]
    return table(header, rows)


def _gpu_cell(row: dict) -> str:
    """One file's verdict on LiteRT's GPU accelerator: the fp16 error, or why it failed."""
    if not row["runs_on_gpu"]:
        reason = row["error"].lstrip("└ ").split(";")[0].split(". ")[0]
        return f"rejected ({reason[:70]}{'…' if len(reason) > 70 else ''})"
    if not row["finite"]:
        return "inf/NaN"
    mark = "" if row["ok"] else " (over tolerance)"
    return f"{row['rel_error']:.2%}{mark}"


def render_mobile_gpu(doc: list[dict], path: str) -> str:
    """Per model, recipe and rewrite turned off: each module on the GPU accelerator alone (fp16 error vs
    the CPU's fp32 as a share of the output range, or why it failed; a UNet in parts part by part),
    and how often the static table's verdict matches the executed one."""
    groups: dict[tuple, dict] = {}
    for row in doc:
        groups.setdefault((row["model"], row["recipe"], row["rewrite_off"]), {})[row["file"]] = row
    header = ["model", "recipe", "rewrite off", "text encoder", "UNet", "VAE decoder", "static table agrees"]
    header.append("UNet call, software GPU / CPU")
    rows = []
    for (model, recipe, off), parts in groups.items():
        unet = [r for f, r in sorted(parts.items()) if f.startswith("unet")]
        unet_cell = (
            _gpu_cell(unet[0])
            if len(unet) == 1
            else " · ".join(f"part {i}: {_gpu_cell(r)}" for i, r in enumerate(unet))
        )
        cells = [_gpu_cell(parts[f]) if f in parts else "–" for f in ("text_encoder.tflite", "vae_decoder.tflite")]
        agree = sum(r["static_ok"] == r["ok"] for r in parts.values())
        timed = unet and all(r["gpu_s"] is not None for r in unet)
        speed = f"{sum(r['gpu_s'] for r in unet):.2f} s / {sum(r['cpu_s'] for r in unet):.3f} s" if timed else "–"
        rows.append(
            [
                model,
                RECIPE_NAMES.get(recipe, recipe),
                off,
                cells[0],
                unet_cell,
                cells[1],
                f"{agree} of {len(parts)}",
                speed,
            ]
        )
    first = doc[0]
    host = first["host"]
    note = (
        f"adapter: {first['adapter'] or '?'} ({first['driver']}); host {host['cpu']} "
        f"({host['cpu_class']}, {host['cores']} cores)"
    )
    return f"{table(header, rows)}\n\n{note}"


def render_bench_binary(doc: dict, path: str) -> str:
    from squeezegen.bench.binary_decode import markdown_table

    return markdown_table(doc["rows"], doc["meta"]["reference"])


def _benchmark(module: str, name: str) -> Callable:
    """A function of one of the scripts under benchmarks/ (not a package)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return getattr(__import__(module), name)
    finally:
        sys.path.pop(0)


def render_serve_load(doc: dict, path: str) -> str:
    return _benchmark("serve_load", "markdown")(doc)


def render_serve_vs_vllm(doc: dict, path: str) -> str:
    return _benchmark("serve_vs_vllm", "markdown")(doc)


def render_shared_batch(doc: dict, path: str) -> str:
    return _benchmark("shared_batch", "markdown")(doc)


def render_peers(doc: dict, path: str) -> str:
    return _benchmark("engine_vs_peers", "markdown_table")(doc["rows"])


def render_compile(doc: dict, path: str) -> str:
    return _benchmark("compile_break_even", "markdown_table")(doc["rows"])


def render_vllm_plugin(doc: dict, path: str) -> str:
    return _benchmark("vllm_plugin", "markdown_table")(doc["rows"])


def _recorded_host(path: str) -> tuple[str | None, str | None]:
    """(CPU class, dtype) a result file records itself (meta.host, meta.dtype), where it does."""
    try:
        doc = load(path)
    except (OSError, ValueError):
        return None, None
    meta = doc.get("meta", {}) if isinstance(doc, dict) else {}
    host = meta.get("host") if isinstance(meta, dict) else None
    return (host or {}).get("cpu_class"), meta.get("dtype") if isinstance(meta, dict) else None


def render_machines(doc: dict, path: str) -> str:
    """Each result file: the machine class and dtype it ran with, recorded in the file where it is,
    else as the notes of the session that made it record them."""
    rows = []
    for name, entry in sorted(doc["results"].items()):
        cpu_class, dtype = _recorded_host(name)
        source = "the file (meta.host)" if cpu_class else entry["source"]
        rows.append(
            [f"`{name}`", cpu_class or entry["cpu_class"], dtype or entry.get("dtype") or "not recorded", source]
        )
    return table(["result", "machine class", "dtype", "from"], rows)


RENDERERS: dict[str, Callable[[object, str], str]] = {
    "eval": render_eval,
    "ruler": render_ruler,
    "math": render_math,
    "bench": render_bench,
    "bench-long": render_bench_long,
    "tsa-layers": render_tsa_layers,
    "needle": render_needle,
    "perplexity": render_perplexity,
    "table": render_table,
    "demo": render_demo,
    "engine-vs-hf": render_engine_vs_hf,
    "decode-profile": render_decode_profile,
    "rpc-nll": render_rpc_nll,
    "tsa-summary": render_tsa_summary,
    "tsa-accuracy": render_tsa_accuracy,
    "binary": render_binary,
    "binary-paper": render_binary_paper,
    "binary-runs": render_binary_runs,
    "binary-budget": render_binary_budget,
    "bench-binary": render_bench_binary,
    "serve-load": render_serve_load,
    "serve-vs-vllm": render_serve_vs_vllm,
    "shared-batch": render_shared_batch,
    "peers": render_peers,
    "compile": render_compile,
    "vllm-plugin": render_vllm_plugin,
    "tiny-sd-sizes": render_tiny_sd_sizes,
    "mobile-mini": render_mobile_mini,
    "mobile-sizes": render_mobile_sizes,
    "mobile-latency": render_mobile_latency,
    "mobile-gpu": render_mobile_gpu,
    "machines": render_machines,
}


def render(text: str, where: str) -> str:
    """`text` with every generated block rendered afresh from its JSON."""

    def block(match: re.Match) -> str:
        name = match["renderer"]
        if name not in RENDERERS:
            raise SystemExit(f"docs/generate.py: {where}: unknown renderer {name!r}; known: {', '.join(RENDERERS)}")
        body = RENDERERS[name](load(match["path"]), match["path"])
        return f"{match['open']}\n{body}\n\n{match['close']}"

    return MARKER.sub(block, text)


def blocks(text: str) -> list[tuple[str, str]]:
    """(path, renderer) of every generated block in `text`."""
    return [(m["path"], m["renderer"]) for m in MARKER.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if a table is stale")
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        if text.count("<!-- generated:") != len(blocks(text)):
            raise SystemExit(f"docs/generate.py: {page.relative_to(ROOT)}: a generated marker without its end marker")
        new = render(text, str(page.relative_to(ROOT)))
        if new == text:
            continue
        stale.append(str(page.relative_to(ROOT)))
        if not args.check:
            page.write_text(new)
    if args.check and stale:
        print("stale generated tables in: " + ", ".join(stale) + " (run .venv/bin/python docs/generate.py)")
        return 1
    print(f"rewrote: {', '.join(stale)}" if stale else "every generated table is up to date")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
