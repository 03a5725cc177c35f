"""Which layers Token Sparse Attention makes sparse: an offline profile on a long real prompt.

Two criteria, each choosing the global-attention layers at or below its delta-quantile:
- drift (the paper's): a layer whose output barely moves the residual stream (small
  ||h_out - h_in|| / ||h_in||, averaged over tokens) is taken to tolerate sparse attention;
- sensitivity (ours): the layer is made sparse alone, at the given tau, and the KL divergence of
  the model's next-token distributions over the last window of the prompt from the dense ones is
  measured directly. It costs one prefill per layer.
Profiles are saved per architecture (methods/sparse_layers.py).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from squeezegen.methods.token_sparse import TokenSparse
from squeezegen.runtime.engine import Engine


@torch.inference_mode()
def measure_drift(model, input_ids: torch.Tensor) -> list[float]:
    """Per layer, the mean over tokens of ||h_out - h_in|| / ||h_in|| during a full prefill."""
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


@torch.inference_mode()
def measure_sensitivity(
    model, input_ids: torch.Tensor, tau: float = 0.005, window: int = 128, min_tokens: int = 1024
) -> list[float | None]:
    """Per layer, KL(dense || TSA on that layer alone) of the next-token distributions over the
    last `window` prompt positions, mean per position; None for sliding-window layers."""
    parts = Engine(model).parts
    captured: list[torch.Tensor] = []

    def keep_last(module, args, output):
        captured.append((output[0] if isinstance(output, tuple) else output)[:, -window:])

    handle = parts.layers[-1].register_forward_hook(keep_last)

    def last_window_logprobs(method) -> torch.Tensor:
        captured.clear()
        Engine(model, method).prefill(input_ids)
        return torch.log_softmax(parts.logits(captured[-1]), dim=-1)

    try:
        dense = last_window_logprobs(None)
        scores: list[float | None] = []
        for i in tqdm(range(len(parts.layers)), desc="sensitivity", unit="layer"):
            if parts.is_sliding(i):
                scores.append(None)
                continue
            sparse = last_window_logprobs(TokenSparse(tau=tau, window=window, min_tokens=min_tokens, layers=[i]))
            scores.append(float((dense.exp() * (dense - sparse)).sum(-1).mean()))
    finally:
        handle.remove()
    return scores


def choose_sparse(drift: list[float], sliding: list[bool], delta: float = 0.5) -> list[int]:
    """Global-attention layers whose score (drift or sensitivity) is at or below the delta-quantile
    of theirs."""
    candidates = [i for i, s in enumerate(sliding) if not s]
    values = torch.tensor([drift[i] for i in candidates])
    cut = float(torch.quantile(values, delta))
    return [i for i in candidates if drift[i] <= cut]
