"""`squeezegen serve`: the model behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse

from squeezegen.cli import common


def cmd_serve(args: argparse.Namespace) -> None:
    from squeezegen.methods.registry import method
    from squeezegen.methods.spec import parse_params
    from squeezegen.serve.app import GracefulServer, Server, ServerConfig, listening_socket

    default = method(args.method, **parse_params(args.method_arg))
    document = method(args.document_method, **parse_params(args.document_arg))
    sock = listening_socket(args.host, args.port)  # a bad --host or a port in use: said before the model loads
    model, tok = common.load_model(args)
    config = ServerConfig(
        model_name=args.model,
        method=default,
        method_label=args.method,
        document_method=document,
        document_label=args.document_method,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        cache_bytes=args.cache_bytes,
        max_tokens=args.max_tokens,
        prefill_tokens=args.prefill_tokens,
    )
    server = GracefulServer(Server(model, tok, config), sock, args.grace)
    print(f"{common.dtype_line(args)}; serving on http://{args.host}:{args.port}/v1 (Ctrl-C or SIGTERM stops)")
    server.serve_until_stopped()


def port_arg(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, got {port}")
    return port


def grace_arg(text: str) -> float:
    seconds = common.finite_float(text)
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text}")
    return seconds


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server: continuous batching, per-request methods, documents")
    common.add_model_args(p, default="smollm2-135m")
    common.add_method_args(p)
    p.add_argument("--document-method", default="kvzip", help="how POST /v1/documents compresses (query-agnostic)")
    p.add_argument("--document-arg", nargs="*", default=["budget=0.25"], metavar="KEY=VALUE")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_arg, default=8000)
    p.add_argument("--max-batch", type=common.positive_int, default=16, help="requests decoding at once")
    p.add_argument("--max-queue", type=common.positive_int, default=64, help="requests waiting; more get 429")
    p.add_argument("--cache-bytes", type=common.positive_int, default=2**30, help="bytes of stored documents (LRU)")
    p.add_argument("--max-tokens", type=common.positive_int, default=256, help="for requests that give none")
    p.add_argument(
        "--prefill-tokens",
        type=common.positive_int,
        default=1024,
        help="prompt tokens prefilled between two decode steps while other requests decode: a longer "
        "uncompressed prompt goes in chunks of this many, so running streams pause for a chunk, not a whole prompt",
    )
    p.add_argument(
        "--grace",
        type=grace_arg,
        default=30.0,
        help="seconds in-flight requests get at shutdown; then they are answered 503 (streams: an error event, [DONE])",
    )
    p.set_defaults(func=cmd_serve)
