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


_KINDS = {  # a parameter's declared type -> the values it takes (bool is no number here)
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "None": lambda v: v is None,
}
_WANTED = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a name", "None": "none"}


def _check_types(name: str, cls: type, params: dict[str, object]) -> None:
    """Refuse a value of the wrong kind in one line (kernel=2.5, window='x'), before the method runs
    into it inside torch; types the table does not know are left to the method's own checks."""
    declared = {
        f.name: f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        for f in dataclasses.fields(cls)
    }
    for key, value in params.items():
        kinds = [k.strip() for k in str(declared[key]).split("|")]
        if not all(k in _KINDS for k in kinds) or any(_KINDS[k](value) for k in kinds):
            continue
        wanted = " or ".join(_WANTED[k] for k in kinds if not (k == "int" and "float" in kinds))
        raise SqueezegenError(f"method {name!r}: {key} must be {wanted}, got {value!r}")


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
    _check_types(name, cls, params)
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise SqueezegenError(f"bad parameters for method {name!r}: {exc}") from exc
