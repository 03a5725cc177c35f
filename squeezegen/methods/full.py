"""FullKV: keep every key and value. The reference for accuracy and speed."""

from dataclasses import dataclass

from squeezegen.runtime.hooks import Method


@dataclass
class Full(Method):
    """The full cache; every hook of `Method` already keeps everything."""
