"""Which layers Token Sparse Attention makes sparse, per architecture: profiles measured once
(`squeezegen profile-layers`, evals/layer_profile.py) and kept in the user's cache, or shipped
for the bundled models."""

from __future__ import annotations

import json
from pathlib import Path

from squeezegen.paths import cache_dir

SHIPPED = Path(__file__).parent / "layer_profiles"


def profile_key(model) -> str:
    c = model.config
    return f"{c.model_type}-l{c.num_hidden_layers}-h{c.hidden_size}-v{c.vocab_size}"


def user_profiles() -> Path:
    return cache_dir() / "layer_profiles"


def save_profile(model, scores: list[float], layers: list[int], meta: dict, folder: Path | None = None) -> Path:
    folder = folder or user_profiles()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{profile_key(model)}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"sparse_layers": layers, "scores": scores, **meta}, indent=1))
    tmp.replace(path)
    return path


def saved_sparse_layers(model) -> list[int] | None:
    """The sparse layers profiled for this architecture: the user's profile, else a shipped one."""
    for folder in (user_profiles(), SHIPPED):
        path = folder / f"{profile_key(model)}.json"
        if path.is_file():
            return json.loads(path.read_text())["sparse_layers"]
    return None
