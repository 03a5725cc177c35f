"""Decode-time methods in the server's shared batch against one engine per request, in one run.

Before the shared batch took rows of decode-time methods (H2O, TOVA, StreamingLLM, RPC), each such
request decoded on an engine of its own, one step each per scheduler step. This script prefills
`--rows` requests per method (distinct passages of CPython's docs, `--prompt` tokens each, its own
budget), then times `--steps` decode steps two ways on the same host: every engine stepped apart,
and the engines stacked into one batch (`runtime/batching.stack`). Greedy tokens are fed back so
both decode real text; the full cache is the reference row.

    .venv/bin/python benchmarks/shared_batch.py --out docs/results/shared-batch
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import squeezegen as sg
from squeezegen.evals.corpus import prose
from squeezegen.runtime.batching import stack
from squeezegen.runtime.device import host
from squeezegen.runtime.engine import Engine
from squeezegen.runtime.generate import prefill_rows

METHODS = ["full", "h2o", "tova", "streaming_llm", "rpc"]


def engines(model, tok, name: str, rows: int, prompt: int, steps: int) -> tuple[list[Engine], list[int]]:
    """`rows` prefilled engines of method `name` (a budget of half the prompt; RPC compresses every
    32 generated tokens) and each one's first token."""
    made, first = [], []
    for i in range(rows):
        if name in ("full", "rpc"):
            method = sg.method(name) if name == "full" else sg.method("rpc", P=32, R=8)
        else:
            method = sg.method(name, budget=prompt // 2)
        engine = Engine(model, method, reserve=steps)
        ids = tok(prose(tok, prompt + 200, seed=100 + i)).input_ids[:prompt]
        first.append(int(prefill_rows(engine, [[ids]], 0).argmax(-1)))
        engine.start_decoding()
        made.append(engine)
    return made, first


def timed_apart(made: list[Engine], first: list[int], steps: int) -> float:
    tokens = [torch.tensor([t]) for t in first]
    start = time.perf_counter()
    for _ in range(steps):
        tokens = [e.decode(t).argmax(-1) for e, t in zip(made, tokens, strict=True)]
    return time.perf_counter() - start


def timed_shared(made: list[Engine], first: list[int], steps: int) -> float:
    batch, tokens = stack(made), torch.tensor(first)
    start = time.perf_counter()
    for _ in range(steps):
        tokens = batch.decode(tokens).argmax(-1)
    return time.perf_counter() - start


def markdown(doc: dict) -> str:
    meta = doc["meta"]
    lines = [
        "| method | rows | one engine each, tok/s | shared batch, tok/s | shared / apart |",
        "|---|---|---|---|---|",
    ]
    for row in doc["rows"]:
        lines.append(
            f"| {row['method']} | {meta['rows']} | {row['apart_tokens_per_s']:.1f} | {row['shared_tokens_per_s']:.1f} "
            f"| **{row['shared_tokens_per_s'] / row['apart_tokens_per_s']:.2f}x** |"
        )
    cpu = meta["host"]
    lines += [
        "",
        f"{meta['model']} in {meta['dtype']}, {meta['prompt']}-token prompts, {meta['steps']} decode steps, "
        f"{cpu['cpu']} ({cpu['cpu_class']}, {cpu['cores']} cores), one run.",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--prompt", type=int, default=400)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    model, tok = sg.load(args.model)
    rows = []
    for name in METHODS:
        apart = timed_apart(*engines(model, tok, name, args.rows, args.prompt, args.steps), args.steps)
        shared = timed_shared(*engines(model, tok, name, args.rows, args.prompt, args.steps), args.steps)
        tokens = args.rows * args.steps
        rows.append({"method": name, "apart_tokens_per_s": tokens / apart, "shared_tokens_per_s": tokens / shared})
        print(f"{name}: apart {tokens / apart:.1f} tok/s, shared {tokens / shared:.1f} tok/s", flush=True)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    doc = {"meta": {**vars(args), "dtype": dtype, "host": host()}, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shared_batch.json").write_text(json.dumps(doc, indent=1))
    (out / "shared_batch.md").write_text(markdown(doc) + "\n")
    print(markdown(doc))


if __name__ == "__main__":
    main()
