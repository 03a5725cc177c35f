"""Where squeezegen keeps what it derives on the user's machine."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Dequantized models, tokenizers and layer profiles: $SQUEEZEGEN_CACHE, else ~/.cache/squeezegen."""
    root = os.environ.get("SQUEEZEGEN_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "squeezegen"
