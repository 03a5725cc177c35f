"""The `squeezegen` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from squeezegen.errors import SqueezegenError


def _parse_value(text: str) -> object:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_method_args(pairs: list[str]) -> dict[str, object]:
    """`["budget=512", "window=32"]` -> `{"budget": 512, "window": 32}`."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SqueezegenError(f"--method-arg takes key=value pairs, got {pair!r}")
        params[key] = _parse_value(value)
    return params


def _add_model_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument(
        "--model",
        required=default is None,
        default=default,
        help="bundled name (see `squeezegen models`), tiny test model, or local HF folder",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")


def _add_method_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="full", help="KV/attention method (see `squeezegen methods`)")
    parser.add_argument(
        "--method-arg", nargs="*", default=[], metavar="KEY=VALUE", help="method parameters, e.g. budget=512 window=32"
    )


def _build_method(args: argparse.Namespace):
    from squeezegen.methods import method

    return method(args.method, **parse_method_args(args.method_arg))


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
        path = Path(args.prompt_file)
        if not path.is_file():
            raise SqueezegenError(f"prompt file {path} does not exist")
        prompt = path.read_text()
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
                    "method_args": parse_method_args(args.method_arg),
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


def cmd_demo(args: argparse.Namespace) -> None:
    from squeezegen.demo import run_demo

    run_demo(args.model, context_tokens=args.context, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="squeezegen", description="Make large generative models cheap to run.")
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
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", nargs="*", default=[], help="stop strings")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="answer a long-context question with the bundled real model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=4000, help="context length in tokens")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
