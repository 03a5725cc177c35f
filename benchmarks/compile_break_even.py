"""When `torch.compile` of the decode step pays for itself: eager beside compiled, cold and warm.

Each configuration runs in a fresh process (dynamo's in-memory cache would otherwise make every
run after the first warm): the same real-text prompt is prefilled, the first decode step is timed
(it compiles), then `--new-tokens` more steps are timed. "cold" compiles into an empty inductor
cache; "warm" is a second process over the cache the cold one left (runtime/step.py keeps it under
squeezegen's cache). Break-even is the number of generated tokens after which the compiled run
has made up its compile time: compile s / (1/eager tok/s - 1/compiled tok/s), none where compiled
decoding is not faster. Usage:
    python benchmarks/compile_break_even.py --context 2048 --new-tokens 64 --out docs/results/compile
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from squeezegen.evals.corpus import prose
from squeezegen.models.loading import load
from squeezegen.runtime.device import auto_dtype, host
from squeezegen.runtime.engine import Engine

# inductor settings tried beside its defaults: the "C++ wrapper and freezing" on the CPU
VARIANTS = {"inductor defaults": {}, "inductor cpp_wrapper + freezing": {"cpp_wrapper": True, "freezing": True}}


def one_run(model_name: str, dtype: str, context: int, new_tokens: int, compile: bool, variant: str) -> dict:
    """Prefill, one timed first step, `new_tokens` timed steps (this process only)."""
    for key, value in VARIANTS[variant].items():
        setattr(torch._inductor.config, key, value)
    model, tok = load(model_name, dtype=dtype)
    ids = torch.tensor([tok(prose(tok, context + 256, seed=7)).input_ids[:context]])
    engine = Engine(model, reserve=new_tokens + 1, compile=compile)
    with torch.inference_mode():
        token = engine.prefill(ids).argmax(-1)
        start = time.perf_counter()
        token = engine.decode(token).argmax(-1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = engine.decode(token).argmax(-1)
        steady = new_tokens / (time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"first_step_s": first, "decode_tok_s": steady, "peak_rss_bytes": peak}


def in_fresh_process(args: argparse.Namespace, dtype: str, compile: bool, variant: str, cache: str) -> dict:
    cmd = [sys.executable, __file__, "--model", args.model, "--context", str(args.context)]
    cmd += ["--new-tokens", str(args.new_tokens), "--one", dtype, str(int(compile)), variant]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{variant} {dtype} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def break_even(compile_s: float, eager: float, compiled: float) -> float | None:
    gain = 1 / eager - 1 / compiled  # seconds saved per token
    return compile_s / gain if gain > 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: the auto dtype of this machine")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--one", nargs=3, metavar=("DTYPE", "COMPILE", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="folder for compile.md and compile.json")
    args = parser.parse_args()
    if args.one:
        dtype, compile, variant = args.one
        print(json.dumps(one_run(args.model, dtype, args.context, args.new_tokens, compile == "1", variant)))
        return
    dtypes = args.dtypes or [str(auto_dtype(torch.device("cpu")))[6:]]
    rows = []
    for dtype in dtypes:
        eager = in_fresh_process(args, dtype, False, "inductor defaults", tempfile.mkdtemp())
        for variant in args.variants:
            cache = tempfile.mkdtemp(prefix="inductor-")
            cold = in_fresh_process(args, dtype, True, variant, cache)
            warm = in_fresh_process(args, dtype, True, variant, cache)
            row = {
                "dtype": dtype,
                "variant": variant,
                "eager_tok_s": eager["decode_tok_s"],
                "compiled_tok_s": warm["decode_tok_s"],
                "cold_compile_s": cold["first_step_s"],
                "warm_compile_s": warm["first_step_s"],
                "break_even_cold": break_even(cold["first_step_s"], eager["decode_tok_s"], warm["decode_tok_s"]),
                "break_even_warm": break_even(warm["first_step_s"], eager["decode_tok_s"], warm["decode_tok_s"]),
                "eager_peak_rss_bytes": eager["peak_rss_bytes"],
                "compiled_peak_rss_bytes": warm["peak_rss_bytes"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = markdown_table(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compile.md").write_text(table + "\n")
        meta = {**vars(args), "threads": torch.get_num_threads(), "host": host()}
        (out / "compile.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def markdown_table(rows: list[dict]) -> str:
    def tokens(n: float | None) -> str:
        return "never (compiled is slower)" if n is None else f"{n:,.0f}"

    lines = [
        "| dtype | inductor | eager tok/s | compiled tok/s | compiled vs eager | first step cold s | "
        "first step warm s | break-even tokens cold | break-even tokens warm | peak RSS eager / compiled MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['variant'][9:]} | {r['eager_tok_s']:.1f} | {r['compiled_tok_s']:.1f} | "
            f"{r['compiled_tok_s'] / r['eager_tok_s']:.2f}x | {r['cold_compile_s']:.1f} | {r['warm_compile_s']:.1f} | "
            f"{tokens(r['break_even_cold'])} | {tokens(r['break_even_warm'])} | "
            f"{r['eager_peak_rss_bytes'] / 2**20:,.0f} / {r['compiled_peak_rss_bytes'] / 2**20:,.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
