"""What every `squeezegen` command shares: the parser, argument types and groups, and its output files."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

from squeezegen.errors import SqueezegenError
from squeezegen.evals.report import claim
from squeezegen.methods.spec import BUDGET_GRAMMAR, MethodSpec, parse_budget, parse_params
from squeezegen.runtime.allocator import release_freed_memory
from squeezegen.runtime.hooks import Method

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

GRAMMAR_HELP = BUDGET_GRAMMAR.replace("%", "%%")  # argparse expands % in help
DEVICES = "cpu, cuda, cuda:N, mps or auto"
PREFILL_METHODS = ["streaming_llm", "snapkv", "pyramidkv", "h2o", "tova"]
DECODE_METHODS = ["rpc", "h2o", "tova", "streaming_llm"]

Settings = TypeVar("Settings")


class Parser(argparse.ArgumentParser):
    """argparse, with its complaints in the one-line form of every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"squeezegen: error: {message} (see `{self.prog} --help`)\n")


def budget_arg(text: str) -> float | int:
    try:
        return parse_budget(text)
    except SqueezegenError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    """A count (tokens, samples, repeats): refused at parse time, before a model is loaded."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def finite_float(text: str) -> float:
    """nan and inf parse as floats but sample nothing sensible (inf silently meant uniform)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def device_arg(text: str) -> str:
    if not re.fullmatch(r"cpu|auto|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use {DEVICES}")
    return text


def read_prompt(path: Path) -> str:
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


def add_model_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument(
        "--model",
        required=default is None,
        default=default,
        help="bundled name (see `squeezegen models`), tiny test model, or local HF folder",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 where the hardware has native bf16 (CUDA, AMX / AVX512-BF16 CPUs), else float32",
    )
    parser.add_argument("--device", default="cpu", type=device_arg, help=DEVICES)
    parser.add_argument(
        "--weights",
        default="model",
        choices=["model", "int4"],
        help="model: the weights as loaded (in --dtype); int4: the decoder's linear layers and the LM head "
        "quantized to 4 bits after loading (sg.quantize_, GGUF Q4_1's layout: a decode step reads about a "
        "third of bf16's bytes; activations stay in --dtype)",
    )


def add_compile_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="decode steps through torch.compile (auto: on a GPU; off on the CPU, where the C decode step "
        "decodes faster than the compiled one: docs/engine.md)",
    )


def compile_flag(args: argparse.Namespace) -> bool | None:
    return {"auto": None, "on": True, "off": False}[args.compile]


def resolve_dtype_arg(args: argparse.Namespace) -> str:
    """--dtype as the name of the dtype it means on this machine (auto resolved), kept in `args`
    (so the command's JSON records what ran)."""
    from squeezegen.models.loading import model_dtype, resolve_device

    if args.dtype == "auto":
        args.dtype_auto = True
        args.dtype = str(model_dtype(args.model, "auto", resolve_device(args.device))).removeprefix("torch.")
    return args.dtype


def load_model(args: argparse.Namespace) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model, tokenizer) as `add_model_args` chose them (--dtype auto resolved in `args`)."""
    from squeezegen.models.loading import load

    model, tok = load(args.model, dtype=resolve_dtype_arg(args), device=args.device)
    if getattr(args, "weights", "model") == "int4":
        from squeezegen.quant.int4 import Int4WeightOnlyConfig, group_misfit, quantize_

        config = Int4WeightOnlyConfig()
        misfit = group_misfit(model, config)
        if misfit is not None:
            raise SqueezegenError(
                f"{args.model} cannot use --weights int4: {misfit}, which 4-bit groups of {config.group_size} do "
                "not divide; run it with --weights model"
            )
        quantize_(model, config)
    release_freed_memory()  # what loading (and quantizing) freed goes back: the heap keeps it otherwise
    return model, tok


def dtype_line(args: argparse.Namespace) -> str:
    """What ran, for the reports: the dtype (and whether auto chose it) and the device."""
    chosen = " (auto)" if getattr(args, "dtype_auto", False) else ""
    weights = ", 4-bit weights" if getattr(args, "weights", "model") == "int4" else ""
    return f"{args.model} in {args.dtype}{chosen}{weights} on {args.device}, {torch_threads()} threads"


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """One method and its parameters (generate)."""
    parser.add_argument("--method", default="full", help="KV/attention method (see `squeezegen methods`)")
    parser.add_argument(
        "--method-arg",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help=f"method parameters, e.g. budget=512 window=32; a budget is {GRAMMAR_HELP}",
    )


def build_method(args: argparse.Namespace) -> Method:
    from squeezegen.methods import method

    return method(args.method, **parse_params(args.method_arg))


def add_methods_arg(parser: argparse.ArgumentParser, default: list[str], full: str) -> None:
    """--methods: what a sweep compares with the full cache; `full` says what it always does with that one."""
    parser.add_argument(
        "--methods",
        nargs="+",
        default=default,
        help=f"NAME or NAME:key=value,... (full is always {full}); a budget is {GRAMMAR_HELP}",
    )


def method_specs(args: argparse.Namespace) -> list[MethodSpec]:
    """The methods of `add_methods_arg`, parsed."""
    return [MethodSpec.parse(m) for m in args.methods]


def settings_from(cls: type[Settings], args: argparse.Namespace, **given: object) -> Settings:
    """A sweep's settings dataclass: each field is `given` or else the flag of the same name, so that a
    field without a flag is an error here rather than a default the command silently never sets."""
    return cls(**{f.name: given[f.name] if f.name in given else getattr(args, f.name) for f in dataclasses.fields(cls)})


def output_path(text: str) -> str:
    """--out: a path, never empty (which would scatter the results in the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: name a folder for the results, e.g. --out results/run1")
    return text


def add_output_args(parser: argparse.ArgumentParser, default: str | None, about: str | None = None) -> None:
    """--out (a folder; required without a default) and --overwrite, for `Outputs`."""
    parser.add_argument("--out", type=output_path, required=default is None, default=default, help=about)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")


def command_meta(args: argparse.Namespace) -> dict:
    """The command's arguments and the machine it ran on, stored with its results so that they say
    how they were made (a speed ratio holds for its machine class: `runtime.device.host`)."""
    from squeezegen.runtime.device import host

    return {**{k: v for k, v in vars(args).items() if k != "func"}, "host": host()}


class Outputs:
    """A command's result files by role (table, json, plot), claimed before any work, so that a taken
    --out is refused (by `claim`, unless --overwrite) before a model is loaded; written at the end."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths  # claimed by the caller (an eval's folder, `report_paths`)

    @classmethod
    def claimed(cls, paths: dict[str, Path], overwrite: bool) -> Outputs:
        return cls(claim(paths, overwrite))

    @classmethod
    def under(cls, args: argparse.Namespace, **names: str) -> Outputs:
        """The files named by role in the folder of `add_output_args`, claimed."""
        return cls.claimed({role: Path(args.out) / name for role, name in names.items()}, args.overwrite)

    def write(
        self,
        args: argparse.Namespace,
        table: str,
        data: dict,
        plot: Callable[[Path], None] | None = None,
        heading: str | None = None,
        meta: dict | None = None,
    ) -> None:
        """Whichever of these the paths name: the table (markdown, under `heading` in the file only),
        `data` with `meta` and the command's arguments (JSON), the plot; then `show` the table."""
        for path in self.paths.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        if "table" in self.paths:
            self.paths["table"].write_text(f"{heading}\n\n{table}\n" if heading else table + "\n")
        if "json" in self.paths:
            record = {"meta": {**(meta or {}), **command_meta(args)}, **data}
            self.paths["json"].write_text(json.dumps(record, indent=1))
        if "plot" in self.paths:
            plot(self.paths["plot"])
        self.show(table, args)

    def show(self, table: str, args: argparse.Namespace | None = None) -> None:
        """The table on stdout (after what ran, for commands that load a model), then where the files are."""
        if args is not None and hasattr(args, "dtype") and hasattr(args, "model"):
            print(dtype_line(args))
        print(table)
        if self.paths:
            print(f"wrote {', '.join(str(p) for p in self.paths.values())}")
