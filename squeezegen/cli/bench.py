"""`squeezegen bench`, `bench-long`, `bench-tsa`, `bench-binary`: time and memory of methods and 1-bit weights."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from squeezegen.cli import common
from squeezegen.errors import SqueezegenError


def cmd_bench(args: argparse.Namespace) -> None:
    from squeezegen.bench.runner import BenchConfig, markdown_table, plot_latency, run_bench

    specs = common.method_specs(args)
    config = common.settings_from(
        BenchConfig,
        args,
        contexts=args.context,
        batch_sizes=args.batch,
        methods=specs,
        compile=common.compile_flag(args),
    )
    outputs = common.Outputs.under(args, table="bench.md", json="bench.json", plot="latency_vs_context.png")
    model, tok = common.load_model(args)
    rows = run_bench(model, tok, config)
    outputs.write(args, markdown_table(rows), {"rows": rows}, plot=partial(plot_latency, rows))


def cmd_bench_long(args: argparse.Namespace) -> None:
    from squeezegen.bench.long_generation import (
        LongGenerationConfig,
        markdown_table,
        plot_throughput,
        run_long_generation,
    )

    specs = common.method_specs(args)
    config = common.settings_from(LongGenerationConfig, args, batch_sizes=args.batch, methods=specs)
    outputs = common.Outputs.under(args, table="bench_long.md", json="bench_long.json", plot="throughput.png")
    model, tok = common.load_model(args)
    rows = run_long_generation(model, tok, config)
    outputs.write(args, markdown_table(rows), {"rows": rows}, plot=partial(plot_throughput, rows))


def cmd_bench_tsa(args: argparse.Namespace) -> None:
    from squeezegen.bench.sparse_prefill import markdown_report, run_sparse_prefill
    from squeezegen.methods import method

    outputs = common.Outputs.under(args, table="bench_tsa.md", json="bench_tsa.json")
    params = {"min_tokens": args.min_tokens, "window": args.window}
    if args.layers:
        params["layers"] = args.layers
    configs = [method("token_sparse", tau=tau, **params) for tau in args.taus]
    model, tok = common.load_model(args)
    results = [run_sparse_prefill(model, tok, n, tsa, args.repeats) for n in args.context for tsa in configs]
    report = "\n\n".join(markdown_report(r) for r in results)
    outputs.write(args, report, {"results": results}, heading=args.model)


def cmd_bench_binary(args: argparse.Namespace) -> None:
    from squeezegen.bench.binary_decode import DECODE_PROMPT, compare_models, markdown_table
    from squeezegen.models.loading import load

    for folder in args.binary:
        if not Path(folder).is_dir():
            raise SqueezegenError(f"{folder} is not a folder: pass folders written by `squeezegen binarize`")
    paths = {}
    if args.out:
        table_path = Path(args.out)
        paths = {"table": table_path, "json": table_path.with_suffix(".json")}
    outputs = common.Outputs.claimed(paths, args.overwrite)
    model, tok = load(args.model, dtype="float32")
    models = {f"{args.model} float32": model, f"{args.model} bfloat16": load(args.model, dtype="bfloat16")[0]}
    for folder in args.binary:
        models[Path(folder).name] = load(folder, dtype=args.binary_dtype)[0]
    reference = f"{args.model} bfloat16"
    rows = compare_models(models, tok, args.tokens, args.rounds, reference=reference)
    meta = {"reference": reference, "prompt": DECODE_PROMPT, "batch": 1}
    outputs.write(args, markdown_table(rows, reference="bf16"), {"rows": rows}, meta=meta)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="prefill, TTFT, decode speed and memory of methods, as ratios to full")
    common.add_model_args(p, default="smollm2-135m")
    p.add_argument("--context", nargs="+", type=common.positive_int, default=[4096], help="context lengths in tokens")
    p.add_argument("--batch", nargs="+", type=common.positive_int, default=[1], help="batch sizes")
    common.add_methods_arg(p, common.PREFILL_METHODS, "measured")
    p.add_argument(
        "--budget",
        type=common.budget_arg,
        default=0.25,
        help=f"KV budget of methods not given one: {common.GRAMMAR_HELP}",
    )
    p.add_argument("--new-tokens", type=common.positive_int, default=64)
    p.add_argument("--repeats", type=common.positive_int, default=3)
    common.add_compile_arg(p)
    common.add_output_args(p, "results/bench")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("bench-long", help="throughput and KV memory of long generations (decode-time compression)")
    common.add_model_args(p, default="smollm2-135m")
    p.add_argument(
        "--lengths", nargs="+", type=common.positive_int, default=[2048, 4096, 7168], help="generated tokens per row"
    )
    p.add_argument("--batch", nargs="+", type=common.positive_int, default=[1, 4], help="batch sizes")
    common.add_methods_arg(p, common.DECODE_METHODS, "measured")
    p.add_argument("--prompt-tokens", type=common.positive_int, default=128, help="tokens of the (real text) prompt")
    p.add_argument(
        "--kv-budget",
        type=int,
        default=None,
        help="token cap of the budgeted methods (default: RPC's peak cache over the longest length)",
    )
    common.add_output_args(p, "results/bench-long")
    p.set_defaults(func=cmd_bench_long)

    p = sub.add_parser("bench-tsa", help="Token Sparse Attention vs dense: attention time in sparse layers, prefill")
    common.add_model_args(p, default="smollm2-135m")
    p.add_argument("--context", nargs="+", type=common.positive_int, default=[8192], help="prompt lengths in tokens")
    p.add_argument("--taus", nargs="+", type=float, default=[0.005])
    p.add_argument("--min-tokens", type=int, default=1024)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--layers", default=None, help="sparse layers, e.g. 15-29 (default: the saved profile)")
    p.add_argument("--repeats", type=common.positive_int, default=1)
    common.add_output_args(p, "results/bench-tsa")
    p.set_defaults(func=cmd_bench_tsa)

    p = sub.add_parser(
        "bench-binary",
        help="decode tokens/s (batch 1) and memory of packed 1-bit models beside the float32 and bf16 model",
    )
    p.add_argument("--model", default="smollm2-135m", help="the float model, measured in float32 and bfloat16")
    p.add_argument("--binary", nargs="+", required=True, help="folders written by `squeezegen binarize`")
    p.add_argument(
        "--binary-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="activations of the packed models (auto: bfloat16 where the CPU has native bf16, else float32)",
    )
    p.add_argument("--tokens", type=int, default=32, help="tokens decoded per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument(
        "--out",
        type=common.output_path,
        default=None,
        help="markdown file for the table; the rows go to the same name with .json (default: print only)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the files of --out")
    p.set_defaults(func=cmd_bench_binary)
