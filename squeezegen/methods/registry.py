"""Every KV / attention method by name: `method(name, **params)` builds one, `methods()` lists them."""

from __future__ import annotations

import dataclasses

from squeezegen.errors import SqueezegenError
from squeezegen.methods.fastkv import FastKV
from squeezegen.methods.full import Full
from squeezegen.methods.gemfilter import GemFilter
from squeezegen.methods.h2o import H2O
from squeezegen.methods.kvzip import KVzip
from squeezegen.methods.pyramidkv import PyramidKV
from squeezegen.methods.rpc import RPC
from squeezegen.methods.snapkv import SnapKV
from squeezegen.methods.streaming_llm import StreamingLLM
from squeezegen.methods.token_sparse import TokenSparse
from squeezegen.methods.tova import TOVA
from squeezegen.runtime.hooks import Method

REGISTRY: dict[str, type[Method]] = {
    "full": Full,
    "streaming_llm": StreamingLLM,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "h2o": H2O,
    "tova": TOVA,
    "fastkv": FastKV,
    "gemfilter": GemFilter,
    "rpc": RPC,
    "token_sparse": TokenSparse,
    "kvzip": KVzip,
}


def methods() -> dict[str, dict[str, object]]:
    """Every method name with its parameters and their defaults."""
    return {
        name: {
            f.name: f.default
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING and not f.metadata.get("api_only")
        }
        for name, cls in REGISTRY.items()
    }


def method(name: str, **params: object) -> Method:
    """A configured method by name, e.g. `method("snapkv", budget=0.25)`."""
    if not isinstance(name, str) or name not in REGISTRY:
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
