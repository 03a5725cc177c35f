"""KV-cache and attention methods: one small file each, sharing the hooks in `base`.

`method(name, **params)` builds a configured method; `methods()` lists names and parameters.
"""

from __future__ import annotations

import dataclasses

from squeezegen.errors import SqueezegenError
from squeezegen.methods.base import Method

REGISTRY: dict[str, type[Method]] = {"full": Method}


def methods() -> dict[str, dict[str, object]]:
    """Every method name with its parameters and their defaults."""
    return {
        name: {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        for name, cls in REGISTRY.items()
    }


def method(name: str, **params: object) -> Method:
    """A configured method by name, e.g. `method("snapkv", budget=0.25)`."""
    if name not in REGISTRY:
        raise SqueezegenError(f"unknown method {name!r}; available: {', '.join(REGISTRY)}")
    cls = REGISTRY[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise SqueezegenError(f"method {name!r} has no parameter {', '.join(unknown)}; its parameters: {allowed}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise SqueezegenError(f"bad parameters for method {name!r}: {exc}") from exc


__all__ = ["Method", "method", "methods", "REGISTRY"]
