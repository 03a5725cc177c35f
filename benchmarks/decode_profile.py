"""Where a decode step's time goes, with a long and a short cache, measured in one run.

Shows why a compressed cache speeds decoding up by less on a small model: the linear layers read
all weights every step whatever the cache holds. The breakdown is of the torch step (the profiler
sees its operations); the C step's total (the default decode, runtime/native_step.py) stands beside
it. Usage:
    python benchmarks/decode_profile.py --model smollm2-135m --caches 8000 800 [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import squeezegen as sg
from squeezegen.evals.corpus import prose
from squeezegen.runtime.engine import Engine


def step_ms(model, ids: torch.Tensor, steps: int, native: bool) -> tuple[Engine, torch.Tensor, float]:
    """(engine, next token, ms per decode step) after a prefill and a warm-up."""
    engine = Engine(model, reserve=2 * steps + 8, native=native)
    token = engine.prefill(ids).argmax(-1)
    for _ in range(4):  # warm-up
        token = engine.decode(token).argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        token = engine.decode(token).argmax(-1)
    return engine, token, (time.perf_counter() - start) / steps * 1000


def step_breakdown(model, ids: torch.Tensor, steps: int) -> dict[str, float]:
    """ms per decode step: the torch step's total, linear layers (aten::mm) and attention (SDPA
    kernels), and the C step's total."""
    engine, token, total = step_ms(model, ids, steps, native=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            token = engine.decode(token).argmax(-1)
    ms = {"linear": 0.0, "attention": 0.0}
    for event in prof.key_averages():
        if event.key == "aten::mm":
            ms["linear"] += event.self_cpu_time_total / 1000 / steps
        elif "scaled_dot_product" in event.key and event.key.startswith("aten::_"):
            ms["attention"] += event.self_cpu_time_total / 1000 / steps
    return {"total": total, **ms, "c_total": step_ms(model, ids, steps, native=True)[2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--caches", nargs="+", type=int, default=[8000, 800], help="cache lengths in tokens")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    model, tok = sg.load(args.model, dtype=args.dtype)
    text = tok(prose(tok, max(args.caches) + 500)).input_ids
    print(f"{args.model} {args.dtype}, {torch.get_num_threads()} threads, ms per decode step")
    print("| cache tokens | torch step | linear layers | attention | other | C step |")
    print("|---|---|---|---|---|---|")
    for n in args.caches:
        r = step_breakdown(model, torch.tensor([text[:n]]), args.steps)
        other = r["total"] - r["linear"] - r["attention"]
        print(
            f"| {n} | {r['total']:.1f} | {r['linear']:.1f} | {r['attention']:.1f} | {other:.1f} | {r['c_total']:.1f} |"
        )


if __name__ == "__main__":
    main()
