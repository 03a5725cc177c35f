"""`squeezegen models`, `methods`, `generate` and `demo`: what can run, and running it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from squeezegen.cli import common
from squeezegen.errors import SqueezegenError
from squeezegen.methods.spec import parse_params

ANSWER_TOKENS = 32
ROOM = 100  # tokens of chat template and question around the demo's context

# (label, method name, parameters): the reference, SnapKV and FastKV keeping the same 25% of the
# prompt's KV (FastKV also propagates 25% past its middle layer), and FastKV at its defaults
DEMO_METHODS = (
    ("full", "full", {}),
    ("snapkv 25%", "snapkv", {"budget": 0.25}),
    ("fastkv 25%", "fastkv", {"retain_rate": 0.25, "tsp_rate": 0.25}),
    ("fastkv 10% (tsp 20%)", "fastkv", {"retain_rate": 0.1, "tsp_rate": 0.2}),
)


def cmd_models(args: argparse.Namespace) -> None:
    from squeezegen.models.loading import available_models, load
    from squeezegen.models.tiny import TINY_CONFIGS
    from squeezegen.runtime.fused import decode_path

    for name, description in available_models().items():
        print(f"{name:16s} {description}")
    print("or a path to a local Hugging Face model folder (config.json + safetensors)")
    print("\nwhere each family decodes (its tiny model, in the dtype auto gives here):")
    for name, config in TINY_CONFIGS.items():
        print(f"  {config['model_type']:12s} {decode_path(load(name)[0])}")


def cmd_methods(args: argparse.Namespace) -> None:
    from squeezegen.methods import methods

    for name, params in methods().items():
        shown = " ".join(f"{k}={v}" for k, v in params.items()) or "(no parameters)"
        print(f"{name:16s} {shown}")


def cmd_generate(args: argparse.Namespace) -> None:
    from squeezegen.runtime.generate import generate

    if args.prompt_file is not None:
        prompt = common.read_prompt(Path(args.prompt_file))
    else:
        prompt = args.prompt
    if not prompt or not prompt.strip():
        raise SqueezegenError("the prompt is empty: pass --prompt TEXT or --prompt-file FILE")
    if args.max_new_tokens < 1:
        raise SqueezegenError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    chosen = common.build_method(args)
    model, tok = common.load_model(args)

    def stream(row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    res = generate(
        model,
        tok,
        prompt,
        method=chosen,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        compile=common.compile_flag(args),
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
                    "dtype": args.dtype,
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


def cmd_demo(args: argparse.Namespace) -> None:
    """A long-context question answered by the bundled real model under each of `DEMO_METHODS`, with its costs."""

    from squeezegen.evals.tasks import make_sample
    from squeezegen.methods import method
    from squeezegen.runtime.generate import generate

    print(f"loading {args.model} ...")
    model, tok = common.load_model(args)
    most = model.config.max_position_embeddings - ANSWER_TOKENS - ROOM
    if args.context > most:
        raise SqueezegenError(f"--context {args.context} is beyond what {args.model} takes: use at most {most}")
    sample = make_sample("niah_number", tok, args.context, args.seed)
    # untimed: the first decode on a machine builds the C kernels (seconds, once), which no row should pay
    generate(model, tok, sample.question, max_new_tokens=2, ignore_eos=True)  # a decode step, even after an EOS
    print(common.dtype_line(args))
    print(f"question after ~{args.context} tokens of Python documentation prose: {sample.question}")
    print(f"expected answer: {sample.answers[0]}\n")
    rows = []
    for label, name, params in DEMO_METHODS:
        res = generate(
            model,
            tok,
            sample.prompt,
            method=method(name, **params),
            max_new_tokens=ANSWER_TOKENS,
            chat=True,
            progress=True,
        )
        answer = res.texts[0].strip().replace("\n", " ")
        rows.append((label, answer, sample.score(answer) == 1, res.prompt_lengths[0], res.timings, res.kv_bytes))
    full_t, full_kv = rows[0][4], rows[0][5]
    print("| method | answer | correct | prompt tokens | prefill s | decode tok/s | KV cache MiB | vs full |")
    print("|---|---|---|---|---|---|---|---|")
    for label, answer, ok, n, t, kv in rows:
        ratios = (
            f"prefill {full_t.prefill_s / t.prefill_s:.2f}x, decode "
            f"{t.decode_tokens_per_s / full_t.decode_tokens_per_s:.2f}x, KV {kv / full_kv:.0%}"
        )
        print(
            f"| {label} | {answer} | {'yes' if ok else 'no'} | {n} | {t.prefill_s:.2f} "
            f"| {t.decode_tokens_per_s:.1f} | {kv / 2**20:.1f} | {ratios} |"
        )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models that can be loaded by name")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("methods", help="list the KV-cache / attention methods and their parameters")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("generate", help="generate text with the engine, optionally with a compression method")
    common.add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="file holding the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    common.add_method_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    p.add_argument("--temperature", type=common.finite_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=common.finite_float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", nargs="*", default=[], help="stop strings")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    common.add_compile_arg(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="answer a long-context question with the bundled real model")
    common.add_model_args(p, default="smollm2-135m")
    p.add_argument("--context", type=common.positive_int, default=4000, help="context length in tokens")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
