"""The `squeezegen` command: one module per family of subcommands, each adding its parsers."""

from __future__ import annotations

import argparse
import sys

from squeezegen.cli import bench, generate, kv, mobile, quant, serve
from squeezegen.cli.common import Parser
from squeezegen.errors import SqueezegenError
from squeezegen.runtime.allocator import reuse_freed_memory
from squeezegen.version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="squeezegen", description="Make large generative models cheap to run.")
    parser.add_argument("--version", action="version", version=f"squeezegen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for family in (generate, kv, bench, quant, serve, mobile):
        family.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    reuse_freed_memory()
    try:
        args.func(args)
    except SqueezegenError as exc:
        print(f"squeezegen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
