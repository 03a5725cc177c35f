"""One decode step, through the engine's fused forward or the HF layers, eager or through
`torch.compile` (inductor kernels on the CPU, CUDA graphs on a GPU).

The step is a pure function of the engine's device tensors (weights, decode buffers, method
state), which keep their shapes from step to step: one compiled function serves every engine, a
generation compiles once, and a second buffer size makes dynamo compile a dynamic graph that
later sizes reuse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

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


def compiled_step(engine: Engine, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`decode_step` compiled for the engine's device type (built on first use)."""
    kind = tokens.device.type
    if kind not in _COMPILED:
        mode = "reduce-overhead" if kind == "cuda" else None
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _COMPILED[kind] = torch.compile(decode_step, mode=mode, dynamic=None)
    return _COMPILED[kind](engine, tokens, positions)
