"""The `squeezegen` command."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import NoReturn

from squeezegen import __version__
from squeezegen.errors import SqueezegenError
from squeezegen.methods.spec import BUDGET_GRAMMAR, parse_budget, parse_params
from squeezegen.mobile.cli import add_mobile_parser

GRAMMAR_HELP = BUDGET_GRAMMAR.replace("%", "%%")  # argparse expands % in help


class _Parser(argparse.ArgumentParser):
    """argparse, with its complaints in the one-line form of every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"squeezegen: error: {message} (see `{self.prog} --help`)\n")


def _budget_arg(text: str) -> float | int:
    try:
        return parse_budget(text)
    except SqueezegenError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    """A count (tokens, samples, repeats): refused at parse time, before a model is loaded."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _finite_float(text: str) -> float:
    """nan and inf parse as floats but sample nothing sensible (inf silently meant uniform)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


DEVICES = "cpu, cuda, cuda:N, mps or auto"


def _device_arg(text: str) -> str:
    if not re.fullmatch(r"cpu|auto|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use {DEVICES}")
    return text


def _read_prompt(path: Path) -> str:
    """The prompt file as text; a folder, unreadable or non-UTF-8 file is the user's to fix."""
    if path.is_dir():
        raise SqueezegenError(f"prompt file {path} is a folder: pass the file holding the prompt")
    if not path.is_file():
        raise SqueezegenError(f"prompt file {path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SqueezegenError(f"cannot read prompt file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SqueezegenError(
            f"prompt file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}): "
            "save it as UTF-8"
        ) from None
    if "\0" in text:
        raise SqueezegenError(f"prompt file {path} holds NUL bytes: it looks binary, pass a text file")
    return text


def _add_model_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument(
        "--model",
        required=default is None,
        default=default,
        help="bundled name (see `squeezegen models`), tiny test model, or local HF folder",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", type=_device_arg, help=DEVICES)


def _add_method_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="full", help="KV/attention method (see `squeezegen methods`)")
    parser.add_argument(
        "--method-arg",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help=f"method parameters, e.g. budget=512 window=32; a budget is {GRAMMAR_HELP}",
    )


def _build_method(args: argparse.Namespace):
    from squeezegen.methods import method

    return method(args.method, **parse_params(args.method_arg))


def cmd_models(args: argparse.Namespace) -> None:
    from squeezegen.models import available_models

    for name, description in available_models().items():
        print(f"{name:16s} {description}")
    print("or a path to a local Hugging Face model folder (config.json + safetensors)")


def cmd_methods(args: argparse.Namespace) -> None:
    from squeezegen.methods import methods

    for name, params in methods().items():
        shown = " ".join(f"{k}={v}" for k, v in params.items()) or "(no parameters)"
        print(f"{name:16s} {shown}")


def cmd_generate(args: argparse.Namespace) -> None:
    if args.prompt_file is not None:
        prompt = _read_prompt(Path(args.prompt_file))
    else:
        prompt = args.prompt
    if not prompt or not prompt.strip():
        raise SqueezegenError("the prompt is empty: pass --prompt TEXT or --prompt-file FILE")
    if args.max_new_tokens < 1:
        raise SqueezegenError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    chosen = _build_method(args)

    import squeezegen as sg

    model, tok = sg.load(args.model, dtype=args.dtype, device=args.device)

    def stream(row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    res = sg.generate(
        model,
        tok,
        prompt,
        method=chosen,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop or None,
        ignore_eos=args.ignore_eos,
        chat=args.chat,
        stream=None if args.json else stream,
        progress=not args.json,
    )
    t = res.timings
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "method": args.method,
                    "method_args": parse_params(args.method_arg),
                    "text": res.texts[0],
                    "token_ids": res.token_ids[0],
                    "prompt_tokens": res.prompt_lengths[0],
                    "finish_reason": res.finish_reasons[0],
                    "prefill_s": t.prefill_s,
                    "decode_s": t.decode_s,
                    "decode_tokens_per_s": t.decode_tokens_per_s,
                    "kv_bytes": res.kv_bytes,
                },
                indent=2,
            )
        )
        return
    print()
    print(
        f"[{res.prompt_lengths[0]} prompt tokens, {len(res.token_ids[0])} new ({res.finish_reasons[0]}), "
        f"prefill {t.prefill_s:.2f} s, decode {t.decode_tokens_per_s:.1f} tok/s, "
        f"KV cache {res.kv_bytes / 2**20:.1f} MiB]",
        file=sys.stderr,
    )


def cmd_eval(args: argparse.Namespace) -> None:
    from squeezegen.evals.report import markdown_tables, report_files, summarize, write_report
    from squeezegen.evals.runner import EvalConfig, EvalFolder, run_eval
    from squeezegen.methods.spec import MethodSpec

    config = EvalConfig(
        tasks=args.tasks,
        contexts=args.contexts,
        methods=[MethodSpec.parse(m) for m in args.methods],
        budgets=args.budgets,
        samples=args.samples,
        modes=args.modes,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        chat=not args.no_chat,
    )
    settings = config.settings(args.model, args.dtype)
    out = Path(args.out)
    paths = report_files(out)
    with EvalFolder(out, settings, resume=args.resume, overwrite=args.overwrite) as folder:  # before any work
        import squeezegen as sg

        model, tok = sg.load(args.model, dtype=args.dtype, device=args.device)
        folder.start()
        total = len(config.contexts) * len(config.tasks) * config.samples
        try:
            records = run_eval(model, tok, config, done=dict(folder.done), save=folder.save)
        except KeyboardInterrupt:
            again = " instead of --overwrite" if args.overwrite else ""
            print(
                f"squeezegen: interrupted: {len(folder.done)} of {total} samples are saved in {folder.records_path}; "
                f"rerun the same command with --resume{again} to finish",
                file=sys.stderr,
            )
            raise
        meta = {
            "settings": settings,
            "command": " ".join(sys.argv),
            **{k: v for k, v in vars(args).items() if k != "func"},
        }
        write_report(records, paths, meta)
    print(markdown_tables(summarize(records)))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")


def cmd_report(args: argparse.Namespace) -> None:
    from squeezegen.evals.report import markdown_tables, merge_records, report_paths, summarize, write_report

    paths = report_paths(args.out, args.overwrite)
    settings, records = merge_records(args.merge)
    meta = {"command": " ".join(sys.argv), "merged": args.merge}
    if settings is not None:
        meta["settings"] = settings  # so that the merged report can be merged again
    write_report(records, paths, meta)
    print(markdown_tables(summarize(records)))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")


def cmd_perplexity(args: argparse.Namespace) -> None:
    from squeezegen.evals.perplexity import perplexity, plot_nll, run_nll
    from squeezegen.evals.report import claim
    from squeezegen.methods.spec import MethodSpec, expand

    methods = expand([MethodSpec.parse(m) for m in args.methods], args.budgets)
    labelled = {label if budget is None else f"{label}@{budget}": m for (label, budget), m in methods.items()}
    out = Path(args.out) if args.out else None
    paths = {"json": out, "plot": out.with_suffix(".png")} if out else {}
    claim(paths, args.overwrite)

    import squeezegen as sg

    model, tok = sg.load(args.model, dtype=args.dtype, device=args.device)
    nll = run_nll(model, tok, labelled, args.context, args.continuation, args.texts)
    ppl = {label: perplexity([x for text in per_text for x in text]) for label, per_text in nll.items()}
    lines = [
        f"perplexity of {args.continuation} tokens after {args.context} ({args.texts} held-out passages)",
        "",
        "| method | budget | mean NLL | perplexity | vs full |",
        "|---|---|---|---|---|",
    ]
    for label, value in ppl.items():
        name, _, budget = label.partition("@")
        budget = budget or ("all" if name == "full" else "own")  # RPC sizes its cache itself
        lines.append(f"| {name} | {budget} | {math.log(value):.4f} | {value:.2f} | {value / ppl['full']:.3f}x |")
    print("\n".join(lines))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in vars(args).items() if k != "func"}
        out.write_text(json.dumps({"meta": meta, "perplexity": ppl, "nll": nll}))
        plot_nll(nll, args.context, paths["plot"])
        print(f"wrote {out}, {paths['plot']}")


def _write_rows(paths: dict[str, Path], args: argparse.Namespace, rows: list[dict], table: str, plot) -> None:
    """A benchmark's table (markdown), rows with the command's arguments (JSON) and plot."""
    paths["table"].parent.mkdir(parents=True, exist_ok=True)
    paths["table"].write_text(table + "\n")
    meta = {k: v for k, v in vars(args).items() if k != "func"}
    paths["json"].write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, paths["plot"])
    print(table)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")


def cmd_bench(args: argparse.Namespace) -> None:
    from squeezegen.bench.runner import BenchConfig, markdown_table, plot_latency, run_bench
    from squeezegen.evals.report import claim
    from squeezegen.methods.spec import MethodSpec

    config = BenchConfig(
        contexts=args.context,
        methods=[MethodSpec.parse(m) for m in args.methods],
        batch_sizes=args.batch,
        budget=args.budget,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
    )
    out = Path(args.out)
    paths = {"table": out / "bench.md", "json": out / "bench.json", "plot": out / "latency_vs_context.png"}
    claim(paths, args.overwrite)

    import squeezegen as sg

    model, tok = sg.load(args.model, dtype=args.dtype, device=args.device)
    rows = run_bench(model, tok, config)
    _write_rows(paths, args, rows, markdown_table(rows), plot_latency)


def cmd_bench_long(args: argparse.Namespace) -> None:
    from squeezegen.bench.long_generation import (
        LongGenerationConfig,
        markdown_table,
        plot_throughput,
        run_long_generation,
    )
    from squeezegen.evals.report import claim
    from squeezegen.methods.spec import MethodSpec

    config = LongGenerationConfig(
        lengths=args.lengths,
        batch_sizes=args.batch,
        methods=[MethodSpec.parse(m) for m in args.methods],
        prompt_tokens=args.prompt_tokens,
        kv_budget=args.kv_budget,
    )
    out = Path(args.out)
    paths = {"table": out / "bench_long.md", "json": out / "bench_long.json", "plot": out / "throughput.png"}
    claim(paths, args.overwrite)

    import squeezegen as sg

    model, tok = sg.load(args.model, dtype=args.dtype, device=args.device)
    rows = run_long_generation(model, tok, config)
    _write_rows(paths, args, rows, markdown_table(rows), plot_throughput)


def cmd_reasoning_needle(args: argparse.Namespace) -> None:
    from squeezegen.evals.reasoning import accuracy_table, run_reasoning_needle
    from squeezegen.evals.report import claim
    from squeezegen.methods.spec import MethodSpec

    specs = [MethodSpec.parse(m) for m in args.methods]
    out = Path(args.out)
    paths = claim({"table": out / "table.md", "json": out / "records.json"}, args.overwrite)

    import squeezegen as sg

    model, tok = sg.load(args.model, dtype=args.dtype, device=args.device)
    records, budget = run_reasoning_needle(
        model, tok, specs, args.path_tokens, args.samples, args.batch_size, args.seed, kv_budget=args.kv_budget
    )
    table = accuracy_table(records)
    header = f"needle in a {args.path_tokens}-token forced reasoning path, {args.samples} samples, budget {budget}"
    out.mkdir(parents=True, exist_ok=True)
    paths["table"].write_text(f"{header}\n\n{table}\n")
    meta = {"kv_budget_used": budget, **{k: v for k, v in vars(args).items() if k != "func"}}
    paths["json"].write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    print(header, table, sep="\n\n")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")


def cmd_bench_tsa(args: argparse.Namespace) -> None:
    from squeezegen.bench.sparse_prefill import markdown_report, run_sparse_prefill
    from squeezegen.evals.report import claim
    from squeezegen.methods import method

    out = Path(args.out)
    paths = claim({"table": out / "bench_tsa.md", "json": out / "bench_tsa.json"}, args.overwrite)
    params = {"min_tokens": args.min_tokens, "window": args.window}
    if args.layers:
        params["layers"] = args.layers
    configs = [method("token_sparse", tau=tau, **params) for tau in args.taus]

    import squeezegen as sg

    model, tok = sg.load(args.model, dtype=args.dtype, device=args.device)
    results = [run_sparse_prefill(model, tok, n, tsa, args.repeats) for n in args.context for tsa in configs]
    report = "\n\n".join(markdown_report(r) for r in results)
    out.mkdir(parents=True, exist_ok=True)
    paths["table"].write_text(f"{args.model}\n\n{report}\n")
    meta = {k: v for k, v in vars(args).items() if k != "func"}
    paths["json"].write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(report)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")


def cmd_profile_layers(args: argparse.Namespace) -> None:
    import torch

    import squeezegen as sg
    from squeezegen.evals.corpus import prose
    from squeezegen.evals.layer_profile import choose_sparse, measure_drift, measure_sensitivity
    from squeezegen.methods.sparse_layers import save_profile

    model, tok = sg.load(args.model, dtype=args.dtype, device=args.device)
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


def cmd_binarize(args: argparse.Namespace) -> None:
    from squeezegen.quant.api import BinaryMoSConfig, OneBitConfig, SignConfig
    from squeezegen.quant.distill import DistillConfig
    from squeezegen.quant.pipeline import binarize_model, summary_lines

    config = {"binarymos": lambda: BinaryMoSConfig(experts=args.experts), "onebit": OneBitConfig, "sign": SignConfig}
    steps = args.steps
    if args.method == "sign" and steps:
        print("sign is the untrained floor: no distillation")
        steps = 0
    if steps < 0 or args.batch < 1 or args.block < 2:
        raise SqueezegenError("--steps must be >= 0, --batch >= 1 and --block >= 2")
    train = DistillConfig(
        steps=steps,
        batch=args.batch,
        block=args.block,
        lr=args.lr,
        hidden_weight=args.hidden_weight,
        checkpointing=not args.no_checkpointing,
        bf16=args.bf16,
        save_every=args.save_every,
        seed=args.seed,
    )
    report = binarize_model(
        args.model,
        config[args.method](),
        train,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        decode_tokens=args.decode_tokens,
        eval_blocks=args.eval_blocks,
        device=args.device,
    )
    if report is not None:
        print("\n".join(summary_lines(report)))
        print(f"wrote {args.out} (load it with sg.load) and {args.out}/binarize_report.json")


def cmd_bench_binary(args: argparse.Namespace) -> None:
    import squeezegen as sg
    from squeezegen.bench.binary_decode import compare_decode, markdown_table

    model, tok = sg.load(args.model)
    models = {args.model: model}
    for folder in args.binary:
        if not Path(folder).is_dir():
            raise SqueezegenError(f"{folder} is not a folder: pass folders written by `squeezegen binarize`")
        models[Path(folder).name] = sg.load(folder)[0]
    table = markdown_table(compare_decode(models, tok, args.tokens, args.rounds), reference=args.model)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


def cmd_demo(args: argparse.Namespace) -> None:
    from squeezegen.demo import run_demo

    run_demo(args.model, context_tokens=args.context, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="squeezegen", description="Make large generative models cheap to run.")
    parser.add_argument("--version", action="version", version=f"squeezegen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the models that can be loaded by name")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("methods", help="list the KV-cache / attention methods and their parameters")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("generate", help="generate text with the engine, optionally with a compression method")
    _add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="file holding the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    _add_method_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    p.add_argument("--temperature", type=_finite_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=_finite_float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", nargs="*", default=[], help="stop strings")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="RULER-style accuracy of methods x KV budgets x context lengths")
    _add_model_args(p, default="smollm2-135m")
    p.add_argument("--tasks", nargs="+", default=["niah_number"], help="see squeezegen/evals/tasks.py")
    p.add_argument("--contexts", nargs="+", type=_positive_int, default=[2048, 4096], help="context lengths in tokens")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["streaming_llm", "snapkv", "pyramidkv", "h2o", "tova"],
        help=f"NAME or NAME:key=value,key=value (full is always included); a budget is {GRAMMAR_HELP}",
    )
    p.add_argument(
        "--budgets",
        nargs="+",
        type=_budget_arg,
        default=[0.1, 0.25, 0.5, 0.75],
        help=f"KV budgets, each {GRAMMAR_HELP}",
    )
    p.add_argument("--samples", type=_positive_int, default=20, help="seeded samples per task and context")
    p.add_argument(
        "--modes",
        nargs="+",
        default=["seen", "unseen"],
        help="seen: question inside the compressed prompt; unseen: asked after compression",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.add_argument("--no-chat", action="store_true", help="plain prompts instead of the chat template")
    p.add_argument(
        "--out", default="results/eval", help="folder for records.jsonl (as it goes), records.json, table.md, the plot"
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (same flags)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="merge `squeezegen eval` reports (a sweep split across processes) into one")
    p.add_argument("--merge", nargs="+", required=True, help="folders written by `squeezegen eval`")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("perplexity", help="perplexity of held-out text with each method's compression applied")
    _add_model_args(p, default="smollm2-135m")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["streaming_llm", "snapkv", "pyramidkv", "h2o", "tova"],
        help=f"NAME or NAME:key=value,... (full is always scored); a budget is {GRAMMAR_HELP}",
    )
    p.add_argument("--budgets", nargs="+", type=_budget_arg, default=[0.1, 0.25, 0.5], help=f"each {GRAMMAR_HELP}")
    p.add_argument("--context", type=_positive_int, default=2048, help="tokens prefilled (and compressed) first")
    p.add_argument("--continuation", type=_positive_int, default=256, help="tokens scored after the context")
    p.add_argument("--texts", type=_positive_int, default=2, help="held-out passages")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("bench", help="prefill, TTFT, decode speed and memory of methods, as ratios to full")
    _add_model_args(p, default="smollm2-135m")
    p.add_argument("--context", nargs="+", type=_positive_int, default=[4096], help="context lengths in tokens")
    p.add_argument("--batch", nargs="+", type=_positive_int, default=[1], help="batch sizes")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["streaming_llm", "snapkv", "pyramidkv", "h2o", "tova"],
        help=f"NAME or NAME:key=value,... (full is always measured); a budget is {GRAMMAR_HELP}",
    )
    p.add_argument(
        "--budget", type=_budget_arg, default=0.25, help=f"KV budget of methods not given one: {GRAMMAR_HELP}"
    )
    p.add_argument("--new-tokens", type=_positive_int, default=64)
    p.add_argument("--repeats", type=_positive_int, default=3)
    p.add_argument("--out", default="results/bench")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("bench-long", help="throughput and KV memory of long generations (decode-time compression)")
    _add_model_args(p, default="smollm2-135m")
    p.add_argument(
        "--lengths", nargs="+", type=_positive_int, default=[2048, 4096, 7168], help="generated tokens per row"
    )
    p.add_argument("--batch", nargs="+", type=_positive_int, default=[1, 4], help="batch sizes")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["rpc", "h2o", "tova", "streaming_llm"],
        help=f"NAME or NAME:key=value,... (full is always measured); a budget is {GRAMMAR_HELP}",
    )
    p.add_argument("--prompt-tokens", type=_positive_int, default=128, help="tokens of the (real text) prompt")
    p.add_argument(
        "--kv-budget",
        type=int,
        default=None,
        help="token cap of the budgeted methods (default: RPC's peak cache over the longest length)",
    )
    p.add_argument("--out", default="results/bench-long")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    p.set_defaults(func=cmd_bench_long)

    p = sub.add_parser("reasoning-needle", help="recall of a fact stated early in a long forced generation")
    _add_model_args(p, default="smollm2-135m")
    p.add_argument("--path-tokens", type=int, default=2048, help="tokens of forced 'reasoning' before the question")
    p.add_argument("--samples", type=_positive_int, default=20)
    p.add_argument("--batch-size", type=_positive_int, default=20, help="samples decoded together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--methods",
        nargs="+",
        default=["rpc", "h2o", "tova", "streaming_llm"],
        help=f"NAME or NAME:key=value,... (full is always run); a budget is {GRAMMAR_HELP}",
    )
    p.add_argument(
        "--kv-budget", type=int, default=None, help="token cap of budgeted methods (default: RPC's peak cache)"
    )
    p.add_argument("--out", default="results/reasoning-needle")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    p.set_defaults(func=cmd_reasoning_needle)

    p = sub.add_parser("bench-tsa", help="Token Sparse Attention vs dense: attention time in sparse layers, prefill")
    _add_model_args(p, default="smollm2-135m")
    p.add_argument("--context", nargs="+", type=_positive_int, default=[8192], help="prompt lengths in tokens")
    p.add_argument("--taus", nargs="+", type=float, default=[0.005])
    p.add_argument("--min-tokens", type=int, default=1024)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--layers", default=None, help="sparse layers, e.g. 15-29 (default: the saved profile)")
    p.add_argument("--repeats", type=_positive_int, default=1)
    p.add_argument("--out", default="results/bench-tsa")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    p.set_defaults(func=cmd_bench_tsa)

    p = sub.add_parser("profile-layers", help="choose Token Sparse Attention's layers by inter-layer drift")
    _add_model_args(p, default="smollm2-135m")
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
    p.add_argument("--out", default=None, help="folder for the profile (default: the user cache, used by default)")
    p.set_defaults(func=cmd_profile_layers)

    p = sub.add_parser("binarize", help="1-bit weights (BinaryMoS, OneBit, plain sign), distilled from the float model")
    p.add_argument("--model", default="smollm2-135m", help="bundled name, tiny test model, or local HF folder")
    p.add_argument(
        "--device", default="cpu", type=_device_arg, help="cpu or cuda (under torchrun: one GPU per process)"
    )
    p.add_argument("--method", default="binarymos", choices=["binarymos", "onebit", "sign"])
    p.add_argument("--experts", type=int, default=4, help="BinaryMoS scaling experts")
    p.add_argument("--steps", type=int, default=150, help="distillation steps (0: binarize only)")
    p.add_argument("--batch", type=int, default=2, help="blocks per step and process")
    p.add_argument("--block", type=int, default=256, help="tokens per block (training and held-out)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--hidden-weight", type=float, default=10.0, help="weight of the hidden-state MSE")
    p.add_argument("--bf16", default="auto", choices=["auto", "on", "off"], help="bf16 autocast")
    p.add_argument("--no-checkpointing", action="store_true", help="keep activations (faster, more memory)")
    p.add_argument("--save-every", type=int, default=25, help="steps between resumable checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-blocks", type=int, default=None, help="held-out blocks scored (default: all)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens timed for decode speed (0: skip)")
    p.add_argument("--out", required=True, help="folder for the packed model")
    p.add_argument("--resume", action="store_true", help="continue from OUT.ckpt/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.set_defaults(func=cmd_binarize)

    p = sub.add_parser("bench-binary", help="decode tokens/s of packed 1-bit models beside the float model")
    p.add_argument("--model", default="smollm2-135m", help="the float model")
    p.add_argument("--binary", nargs="+", required=True, help="folders written by `squeezegen binarize`")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--out", default=None, help="markdown file for the table")
    p.set_defaults(func=cmd_bench_binary)

    add_mobile_parser(sub)

    p = sub.add_parser("demo", help="answer a long-context question with the bundled real model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=_positive_int, default=4000, help="context length in tokens")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        args.func(args)
    except SqueezegenError as exc:
        print(f"squeezegen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
