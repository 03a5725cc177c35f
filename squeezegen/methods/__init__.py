"""KV-cache and attention methods: one small file each, on the hook contract of `runtime/hooks.py`.

`method(name, **params)` builds a configured method; `methods()` lists names and parameters;
`spec` parses them from text (one budget grammar everywhere).
"""

from squeezegen.methods.compose import Compose
from squeezegen.methods.fastkv import FastKV
from squeezegen.methods.full import Full
from squeezegen.methods.gemfilter import GemFilter
from squeezegen.methods.h2o import H2O
from squeezegen.methods.kvzip import KVzip
from squeezegen.methods.pyramidkv import PyramidKV
from squeezegen.methods.registry import REGISTRY, method, methods
from squeezegen.methods.rpc import RPC
from squeezegen.methods.snapkv import SnapKV
from squeezegen.methods.spec import MethodSpec, expand, matched_budget, parse_budget, parse_params
from squeezegen.methods.streaming_llm import StreamingLLM
from squeezegen.methods.token_sparse import TokenSparse
from squeezegen.methods.tova import TOVA
from squeezegen.runtime.hooks import Method

__all__ = [
    "REGISTRY",
    "H2O",
    "RPC",
    "TOVA",
    "Compose",
    "FastKV",
    "Full",
    "GemFilter",
    "KVzip",
    "Method",
    "MethodSpec",
    "PyramidKV",
    "SnapKV",
    "StreamingLLM",
    "TokenSparse",
    "expand",
    "matched_budget",
    "method",
    "methods",
    "parse_budget",
    "parse_params",
]
