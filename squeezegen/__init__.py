"""squeezegen: make large generative models cheap to run.

import squeezegen as sg
model, tok = sg.load("smollm2-135m")
res = sg.generate(model, tok, ["prompt text"], max_new_tokens=16)
"""

from squeezegen.errors import SqueezegenError
from squeezegen.methods import Compose, Method, method, methods
from squeezegen.models import available_models, load
from squeezegen.runtime.engine import Engine
from squeezegen.runtime.generate import GenerationResult, Timings, generate

__version__ = "0.1.0"

__all__ = [
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
