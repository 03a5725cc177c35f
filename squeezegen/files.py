"""Files a user keeps: folders that appear whole or not at all, content hashes, JSON read with a one-line error.

Below every layer (models, quant and mobile all write and check folders), so none of them imports another for it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from squeezegen.errors import UnsupportedModelError, one_line


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


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a one-line error naming the file (not a decoder traceback)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise UnsupportedModelError(
            f"{path} is not readable JSON ({one_line(exc)}): restore the file, or save or download the model again"
        ) from exc
    if not isinstance(data, dict):
        raise UnsupportedModelError(
            f"{path} holds a JSON {type(data).__name__}, not an object: restore the file, or save the model again"
        )
    return data
