"""squeezegen: make large generative models cheap to run.

import squeezegen as sg
model, tok = sg.load("smollm2-135m")
res = sg.generate(model, tok, ["prompt text"], max_new_tokens=16)
sg.binarize_(model, sg.BinaryMoSConfig(experts=4)); sg.save(model, tok, "out"); sg.load("out")
sg.quantize_(model, sg.Int4WeightOnlyConfig())  # 4-bit weights (GGUF Q4_1's layout)
"""

import squeezegen.quiet_imports  # noqa: F401  (first: silences optional dependencies' import noise)
from squeezegen.errors import SqueezegenError
from squeezegen.methods import Compose, Method, method, methods
from squeezegen.models import available_models, load
from squeezegen.quant import (
    BinaryMoSConfig,
    Int4WeightOnlyConfig,
    OneBitConfig,
    SignConfig,
    binarize_,
    bits_per_weight,
    pack_,
    quantize_,
    save,
    stored_bytes,
)
from squeezegen.runtime.engine import Engine
from squeezegen.runtime.generate import GenerationResult, Timings, generate
from squeezegen.version import __version__

__all__ = [
    "__version__",
    "BinaryMoSConfig",
    "Int4WeightOnlyConfig",
    "OneBitConfig",
    "SignConfig",
    "binarize_",
    "bits_per_weight",
    "pack_",
    "quantize_",
    "save",
    "stored_bytes",
    "Compose",
    "Engine",
    "GenerationResult",
    "Method",
    "SqueezegenError",
    "Timings",
    "available_models",
    "generate",
    "load",
    "method",
    "methods",
]
