"""Folders that appear whole or not at all: written under a temporary sibling name, then renamed."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to `target`; when the block succeeds it replaces
    `target`, when it fails it is removed, so an interrupted write never leaves half a folder.

    An existing `target` is renamed aside before the new one takes its name and is deleted only
    once it has, so a failed switch puts it back and nothing is lost. Callers decide whether
    `target` may be replaced at all.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        if not target.exists():
            tmp.rename(target)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
        target.rename(old / target.name)
        try:
            tmp.rename(target)
        except BaseException:
            (old / target.name).rename(target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes: what tells a corrupt or changed file from the one recorded."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
