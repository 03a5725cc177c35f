"""`squeezegen eval`, `report`, `perplexity`, `reasoning-needle`, `profile-layers`: what compression costs."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from squeezegen.cli import common
from squeezegen.evals.report import refuse_unwritable

if TYPE_CHECKING:
    from squeezegen.evals.runner import EvalConfig


def cmd_eval(args: argparse.Namespace) -> None:
    from squeezegen.evals.math_problems import math_table, run_math
    from squeezegen.evals.report import average_table, markdown_tables, report_files, summarize, write_report
    from squeezegen.evals.runner import MATH, EvalFolder, run_eval

    config, settings = eval_settings(args)
    if args.kvpress_layout:
        refuse_unwritable(Path(args.kvpress_layout), "--kvpress-layout")
    out = Path(args.out)
    outputs = common.Outputs(report_files(out))  # claimed by EvalFolder, which knows --resume
    with EvalFolder(out, settings, resume=args.resume, overwrite=args.overwrite) as folder:  # before any work
        model, tok = common.load_model(args)
        folder.start()
        total = config.samples * (1 if config.benchmark in MATH else len(config.contexts) * len(config.tasks))
        try:
            if config.benchmark in MATH:
                records = run_math(
                    model,
                    tok,
                    config.benchmark,
                    config.methods,
                    config.samples,
                    config.batch_size,
                    config.max_new_tokens,
                    config.seed,
                    config.chat,
                    done=dict(folder.done),
                    save=folder.save,
                )
            else:
                records = run_eval(model, tok, config, done=dict(folder.done), save=folder.save)
        except KeyboardInterrupt:
            again = " instead of --overwrite" if args.overwrite else ""
            print(
                f"squeezegen: interrupted: {len(folder.done)} of {total} samples are saved in {folder.records_path}; "
                f"rerun the same command with --resume{again} to finish",
                file=sys.stderr,
            )
            raise
        meta = {"settings": settings, "command": " ".join(sys.argv), **common.command_meta(args)}
        write_report(records, outputs.paths, meta)
        if config.benchmark in MATH:  # accuracy with what it cost: tokens, speed, memory
            table = math_table(records)
            outputs.paths["table"].write_text(f"**{config.benchmark}**, batch {config.batch_size}\n\n{table}\n")
            outputs.show(table, args)
            return
    write_kvpress(records, args)
    tables = markdown_tables(summarize(records))
    if config.benchmark == "ruler":  # the leaderboard's number first: the mean over tasks
        tables = f"{average_table(summarize(records))}\n\n{tables}"
        outputs.paths["table"].write_text(tables + "\n")
    outputs.show(tables, args)


def eval_settings(args: argparse.Namespace) -> tuple[EvalConfig, dict]:
    """The run's config and the settings that decide its records (what --resume must find again):
    every flag of `eval` but where its files go."""
    from squeezegen.evals.runner import EvalConfig

    tasks = args.tasks or {"squeezegen": ["niah_number"], "ruler": ["all"]}.get(args.benchmark, [args.benchmark])
    config = common.settings_from(
        EvalConfig, args, methods=common.method_specs(args), chat=not args.no_chat, tasks=tasks
    )
    from squeezegen.models.loading import resolve_device

    device = str(resolve_device(args.device)) if args.device in (None, "auto") else args.device  # as --dtype auto
    return config, config.settings(args.model, common.resolve_dtype_arg(args), args.weights, device)


def write_kvpress(records: list[dict], args: argparse.Namespace) -> None:
    """--kvpress-layout: the records again, in kvpress's evaluation layout."""
    if args.kvpress_layout:
        from squeezegen.evals.kvpress_layout import write_kvpress_layout

        folders = write_kvpress_layout(records, args.model, args.kvpress_layout)
        print(f"wrote {len(folders)} kvpress-style runs under {args.kvpress_layout}")


def cmd_report(args: argparse.Namespace) -> None:
    from squeezegen.evals.report import markdown_tables, merge_records, report_paths, summarize, write_report

    outputs = common.Outputs(report_paths(args.out, args.overwrite))
    if args.kvpress_layout:
        refuse_unwritable(Path(args.kvpress_layout), "--kvpress-layout")
    settings, records = merge_records(args.merge)
    meta = {"command": " ".join(sys.argv), "merged": args.merge}
    if settings is not None:
        meta["settings"] = settings  # so that the merged report can be merged again
    write_report(records, outputs.paths, meta)
    args.model = (settings or {}).get("model") or "model"
    write_kvpress(records, args)
    outputs.show(markdown_tables(summarize(records)))


def cmd_perplexity(args: argparse.Namespace) -> None:
    from squeezegen.evals.perplexity import labelled, markdown_table, plot_nll, pooled_perplexity, run_nll

    methods = labelled(common.method_specs(args), args.budgets)
    out = Path(args.out) if args.out else None
    outputs = common.Outputs.claimed({"json": out, "plot": out.with_suffix(".png")} if out else {}, args.overwrite)
    model, tok = common.load_model(args)
    nll = run_nll(model, tok, methods, args.context, args.continuation, args.texts)
    ppl = pooled_perplexity(nll)
    table = markdown_table(ppl, args.context, args.continuation, args.texts)
    outputs.write(args, table, {"perplexity": ppl, "nll": nll}, plot=partial(plot_nll, nll, args.context))


def cmd_reasoning_needle(args: argparse.Namespace) -> None:
    from squeezegen.evals.reasoning import accuracy_table, run_reasoning_needle

    specs = common.method_specs(args)
    outputs = common.Outputs.under(args, table="table.md", json="records.json")
    model, tok = common.load_model(args)
    records, budget = run_reasoning_needle(
        model, tok, specs, args.path_tokens, args.samples, args.batch_size, args.seed, kv_budget=args.kv_budget
    )
    header = f"needle in a {args.path_tokens}-token forced reasoning path, {args.samples} samples, budget {budget}"
    table = f"{header}\n\n{accuracy_table(records)}"
    outputs.write(args, table, {"records": records}, meta={"kv_budget_used": budget})


def cmd_profile_layers(args: argparse.Namespace) -> None:
    import torch

    from squeezegen.evals.corpus import prose
    from squeezegen.evals.layer_profile import choose_sparse, measure_drift, measure_sensitivity
    from squeezegen.methods.sparse_layers import save_profile

    if args.out:
        refuse_unwritable(Path(args.out))
    model, tok = common.load_model(args)
    ids = tok(prose(tok, args.tokens + 2048, seed=args.seed)).input_ids[: args.tokens]
    input_ids = torch.tensor([ids], device=next(model.parameters()).device)
    if args.criterion == "drift":
        score = measure_drift(model, input_ids)
    else:
        score = measure_sensitivity(model, input_ids, tau=args.tau)
    sliding = [t == "sliding_attention" for t in getattr(model.config, "layer_types", None) or [""] * len(score)]
    values = [0.0 if s is None else s for s in score]
    layers = choose_sparse(values, sliding, args.delta)
    top = max(values) or 1.0
    for i, d in enumerate(values):
        kind = "sliding" if sliding[i] else ("sparse" if i in layers else "dense")
        print(f"layer {i:3d}  {args.criterion} {d:.4f}  {'#' * round(30 * d / top):30s}  {kind}")
    meta = {"model": args.model, "tokens": len(ids), "delta": args.delta, "criterion": args.criterion}
    if args.criterion == "sensitivity":
        meta["tau"] = args.tau
    path = save_profile(model, values, layers, meta, Path(args.out) if args.out else None)
    print(f"sparse layers: {','.join(map(str, layers))}\nwrote {path} (token_sparse uses it for this architecture)")


def add_kvpress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kvpress-layout",
        metavar="DIR",
        default=None,
        help="also write kvpress's evaluation layout under DIR (DATASET/MODEL__PRESS__RATIO/predictions.csv, "
        "metrics.json; ratio = fraction removed = 1 - budget; seen mode = query_aware)",
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy of methods x KV budgets x context lengths: RULER, needles, GSM8K, AIME")
    common.add_model_args(p, default="smollm2-135m")
    p.add_argument(
        "--benchmark",
        default="squeezegen",
        choices=["squeezegen", "ruler", "gsm8k", "aime2025"],
        help="squeezegen: needles in CPython's docs (evals/tasks.py); ruler: NVIDIA's RULER (its 13 tasks, "
        "generators and scoring; pip install 'squeezegen[benchmarks]'); gsm8k, aime2025: math reasoning",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help="task names of the benchmark, or all (default: niah_number; ruler: all)",
    )
    p.add_argument(
        "--contexts", nargs="+", type=common.positive_int, default=[2048, 4096], help="context lengths in tokens"
    )
    common.add_methods_arg(p, common.PREFILL_METHODS, "included")
    p.add_argument(
        "--budgets",
        nargs="+",
        type=common.budget_arg,
        default=[0.1, 0.25, 0.5, 0.75],
        help=f"KV budgets, each {common.GRAMMAR_HELP}",
    )
    p.add_argument("--samples", type=common.positive_int, default=20, help="seeded samples per task and context")
    p.add_argument(
        "--modes",
        nargs="+",
        default=["seen", "unseen"],
        help="seen: question inside the compressed prompt; unseen: asked after compression",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-new-tokens",
        type=common.positive_int,
        default=None,
        help="answer length cap (default: 32; ruler: each task's own tokens_to_generate; gsm8k 512, aime2025 2048)",
    )
    p.add_argument(
        "--batch-size", type=common.positive_int, default=8, help="gsm8k/aime2025: problems decoded together"
    )
    p.add_argument("--no-chat", action="store_true", help="plain prompts instead of the chat template")
    common.add_output_args(p, "results/eval", "folder for records.jsonl (as it goes), records.json, table.md, the plot")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (same flags)")
    add_kvpress_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="merge `squeezegen eval` reports (a sweep split across processes) into one")
    p.add_argument("--merge", nargs="+", required=True, help="folders written by `squeezegen eval`")
    common.add_output_args(p, None)
    add_kvpress_arg(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("perplexity", help="perplexity of held-out text with each method's compression applied")
    common.add_model_args(p, default="smollm2-135m")
    common.add_methods_arg(p, common.PREFILL_METHODS, "scored")
    p.add_argument(
        "--budgets", nargs="+", type=common.budget_arg, default=[0.1, 0.25, 0.5], help=f"each {common.GRAMMAR_HELP}"
    )
    p.add_argument("--context", type=common.positive_int, default=2048, help="tokens prefilled (and compressed) first")
    p.add_argument("--continuation", type=common.positive_int, default=256, help="tokens scored after the context")
    p.add_argument("--texts", type=common.positive_int, default=2, help="held-out passages")
    p.add_argument("--out", type=common.output_path, default=None, help="JSON file for the results")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("reasoning-needle", help="recall of a fact stated early in a long forced generation")
    common.add_model_args(p, default="smollm2-135m")
    p.add_argument("--path-tokens", type=int, default=2048, help="tokens of forced 'reasoning' before the question")
    p.add_argument("--samples", type=common.positive_int, default=20)
    p.add_argument("--batch-size", type=common.positive_int, default=20, help="samples decoded together")
    p.add_argument("--seed", type=int, default=0)
    common.add_methods_arg(p, common.DECODE_METHODS, "run")
    p.add_argument(
        "--kv-budget", type=int, default=None, help="token cap of budgeted methods (default: RPC's peak cache)"
    )
    common.add_output_args(p, "results/reasoning-needle")
    p.set_defaults(func=cmd_reasoning_needle)

    p = sub.add_parser("profile-layers", help="choose Token Sparse Attention's layers by inter-layer drift")
    common.add_model_args(p, default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=8192, help="length of the real-text prompt profiled")
    p.add_argument("--delta", type=float, default=0.5, help="layers at or below this quantile are sparse")
    p.add_argument(
        "--criterion",
        default="sensitivity",
        choices=["sensitivity", "drift"],
        help="sensitivity: KL of the output when the layer alone is sparse (one prefill per layer); "
        "drift: the paper's ||h_out - h_in|| / ||h_in||",
    )
    p.add_argument("--tau", type=float, default=0.005, help="tau used to measure sensitivity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        type=common.output_path,
        default=None,
        help="folder for the profile (default: the user cache, used by default)",
    )
    p.set_defaults(func=cmd_profile_layers)
