"""Which layers Token Sparse Attention makes sparse: an offline profile of inter-layer drift.

A layer whose output barely moves the residual stream (small ||h_out - h_in|| / ||h_in||,
averaged over the tokens of a long real prompt) tolerates sparse attention; layers at or below
the delta-quantile of the drift are chosen. Profiles are saved per architecture (model type,
depth, width, vocabulary) in the user's cache, and shipped for the bundled models.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHIPPED = Path(__file__).parent / "layer_profiles"


def profile_key(model) -> str:
    c = model.config
    return f"{c.model_type}-l{c.num_hidden_layers}-h{c.hidden_size}-v{c.vocab_size}"


def user_profiles() -> Path:
    from squeezegen.models.bundled import cache_dir

    return cache_dir() / "layer_profiles"


@torch.inference_mode()
def measure_drift(model, input_ids: torch.Tensor) -> list[float]:
    """Per layer, the mean over tokens of ||h_out - h_in|| / ||h_in|| during a full prefill."""
    from squeezegen.runtime.engine import Engine

    engine = Engine(model)
    drift: list[float] = []

    def record(module, args, kwargs, output):
        before = args[0] if args else kwargs["hidden_states"]
        after = output[0] if isinstance(output, tuple) else output
        change = (after - before).float().norm(dim=-1) / before.float().norm(dim=-1).clamp(min=1e-6)
        drift.append(float(change.mean()))

    handles = [layer.register_forward_hook(record, with_kwargs=True) for layer in engine.parts.layers]
    try:
        engine.prefill(input_ids, progress=True)
    finally:
        for handle in handles:
            handle.remove()
    return drift


def choose_sparse(drift: list[float], sliding: list[bool], delta: float = 0.5) -> list[int]:
    """Global-attention layers whose drift is at or below the delta-quantile of theirs."""
    candidates = [i for i, s in enumerate(sliding) if not s]
    values = torch.tensor([drift[i] for i in candidates])
    cut = float(torch.quantile(values, delta))
    return [i for i in candidates if drift[i] <= cut]


def save_profile(model, drift: list[float], layers: list[int], meta: dict, folder: Path | None = None) -> Path:
    folder = folder or user_profiles()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{profile_key(model)}.json"
    path.write_text(json.dumps({"sparse_layers": layers, "drift": drift, **meta}, indent=1))
    return path


def saved_sparse_layers(model) -> list[int] | None:
    """The sparse layers profiled for this architecture: the user's profile, else a shipped one."""
    for folder in (user_profiles(), SHIPPED):
        path = folder / f"{profile_key(model)}.json"
        if path.is_file():
            return json.loads(path.read_text())["sparse_layers"]
    return None
