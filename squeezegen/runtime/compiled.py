"""The decode step through `torch.compile`: inductor kernels on the CPU, CUDA graphs on a GPU.

One compiled function serves every engine: its inputs are the engine's device tensors (weights,
decode buffers, method state), which keep their shapes from step to step, so a generation
compiles once and later generations with the same buffer sizes reuse the graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from squeezegen.runtime.engine import Engine

_COMPILED: dict[str, object] = {}


def compiled_step(engine: Engine, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`decode_step` compiled for the engine's device type (built on first use)."""
    from squeezegen.runtime.engine import decode_step

    kind = tokens.device.type
    if kind not in _COMPILED:
        mode = "reduce-overhead" if kind == "cuda" else None
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _COMPILED[kind] = torch.compile(decode_step, mode=mode, dynamic=False)
    return _COMPILED[kind](engine, tokens, positions)
