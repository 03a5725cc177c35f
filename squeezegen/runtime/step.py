"""One decode step, through the engine's fused forward or the HF layers, eager or through
`torch.compile` (inductor kernels on the CPU, CUDA graphs on a GPU).

The step is a pure function of the engine's device tensors (weights, decode buffers, method
state), which keep their shapes from step to step: one compiled function serves every engine, a
generation compiles once, and a second buffer size makes dynamo compile a dynamic graph that
later sizes reuse. Inductor keeps what it compiles in squeezegen's cache (`compile_cache_dir`),
keyed by the graph, its input shapes and dtypes and the compiler's settings, so a second process
that decodes the same model in the same dtype starts warm (dynamo still traces; inductor does not
compile again).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from squeezegen.paths import cache_dir

if TYPE_CHECKING:
    from squeezegen.runtime.engine import Engine

_COMPILED: dict[str, object] = {}


def decode_step(engine: Engine, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One decode step over every layer: tokens (B,) at positions (B,) -> next-token logits (B, V).
    Device tensors in, device tensors out; the caches are written in place. The engine's fused
    forward (runtime/fused.py) where the model has one, else the HF layers."""
    engine.positions = positions[:, None]
    if engine.fused is not None:
        return engine.fused.step(engine, tokens, positions)
    parts = engine.parts
    hidden = parts.embed(tokens[:, None])
    rope = parts.rope(hidden, engine.positions)
    for i, layer in enumerate(parts.layers):
        hidden = layer(
            hidden,
            attention_mask=None,
            position_ids=engine.positions,
            position_embeddings=rope[parts.layer_types[i]],
            sg_engine=engine,
        )
    return parts.logits(hidden[:, -1])


def compile_cache_dir() -> Path:
    """Inductor's on-disk cache: $TORCHINDUCTOR_CACHE_DIR where the user chose one, else
    `<squeezegen cache>/compile` rather than torch's default under /tmp, which a reboot empties
    (importing inductor writes that default into the variable, so it is told apart by value)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return Path(chosen)
    return cache_dir() / "compile"


def compiled_step(engine: Engine, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`decode_step` compiled for the engine's device type (built on first use)."""
    kind = tokens.device.type
    if kind not in _COMPILED:
        mode = "reduce-overhead" if kind == "cuda" else None
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())  # read by inductor when it compiles
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _COMPILED[kind] = torch.compile(decode_step, mode=mode, dynamic=None)
    return _COMPILED[kind](engine, tokens, positions)
