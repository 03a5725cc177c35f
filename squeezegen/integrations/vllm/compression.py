"""What a vLLM request asks of squeezegen, and the selection it gets (no vLLM import here).

A request names its method in `SamplingParams.extra_args["squeezegen"]`: the JSON text (or, from
Python, the dict) `{"method": "snapkv", "args": {"budget": 0.25}}`, the body field that
`squeezegen serve` takes. The OpenAI server passes `extra_body={"vllm_xargs": {"squeezegen":
"<that JSON>"}}` into `extra_args`. The selection is the squeezegen method's own scoring and top-k
(`ScoredSelection.kv_scores`/`choose`) over the request's prompt, so a request selects what
`squeezegen serve` would select for the same keys.
"""

from __future__ import annotations

import json

import torch

from squeezegen.errors import SqueezegenError
from squeezegen.methods.registry import method as build_method
from squeezegen.methods.selection import ScoredSelection
from squeezegen.methods.streaming_llm import StreamingLLM
from squeezegen.runtime.cache import LayerCache
from squeezegen.runtime.hooks import LayerView

# prefill-time selections whose layers each keep the same count in every KV head: kept entries can
# be packed into fewer paged blocks (StreamingLLM also rolls while decoding, a block at a time).
# Adaptive budgets (AdaKV), KVzip's probes and per-token decode-time eviction (H2O, TOVA, RPC) are
# not offered: see docs/serving.md.
SUPPORTED = ("snapkv", "pyramidkv", "streaming_llm")
FIELD = "squeezegen"


def parse_request(extra_args: dict | None) -> ScoredSelection | None:
    """The method a request asks for, None for the full cache; SqueezegenError (one line) if bad."""
    spec = (extra_args or {}).get(FIELD)
    if spec is None:
        return None
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError:
            raise SqueezegenError(
                f'{FIELD} must be JSON such as {{"method": "snapkv", "args": {{"budget": 0.25}}}}, got {spec!r}'
            ) from None
    if not isinstance(spec, dict) or set(spec) - {"method", "args"} or not isinstance(spec.get("args", {}), dict):
        raise SqueezegenError(f'{FIELD} must be an object {{"method": name, "args": {{...}}}}, got {spec!r}')
    name = spec.get("method")
    if name in (None, "full"):
        return None
    if name not in SUPPORTED:
        raise SqueezegenError(f"the vLLM plugin runs {', '.join(SUPPORTED)} (or full); got method {name!r}")
    built = build_method(name, **spec.get("args", {}))
    if built.adaptive:
        raise SqueezegenError("adaptive=True gives KV heads uneven budgets, which paged blocks cannot free: drop it")
    return built


def layer_budgets(method: ScoredSelection, prompt: int, num_layers: int) -> list[int]:
    """Entries each layer keeps of a `prompt`-token prompt (every layer sees the whole prompt)."""
    views = (LayerView.outside_engine(i, num_layers, LayerCache()) for i in range(num_layers))
    return [min(prompt, method.layer_budget(view, prompt, prompt)) for view in views]


def freeable_tokens(method: ScoredSelection, prompt: int, num_layers: int) -> int:
    """Leading prompt slots no layer needs once its kept entries sit at the end of the prompt."""
    return prompt - max(layer_budgets(method, prompt, num_layers))


def rolled_blocks(method: ScoredSelection, prompt: int, kept: int, block_size: int, end: int) -> int:
    """Whole blocks a rolling window (StreamingLLM) no longer reads once the sequence holds `end`
    tokens: the kept entries start a block, the first block (the sinks with it) always stays, and of
    the blocks after it at most ceil(kept / block_size) stay, the newest. 0 for other methods."""
    if not isinstance(method, StreamingLLM):
        return 0
    held = kept + max(0, end - prompt)  # entries from the first kept slot on
    return max(0, -(-held // block_size) - 1 - -(-kept // block_size))


def select(
    method: ScoredSelection,
    layer: int,
    num_layers: int,
    scaling: float,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """Positions (Hkv, K) each KV head of one layer keeps, ascending, K the layer's budget.

    query (Hq, Lq, D): the last Lq prompt tokens' queries (the observation window); keys and values
    (Hkv, L, D): the whole prompt's, at positions 0..L-1.
    """
    prompt = keys.shape[1]
    cache = LayerCache()
    cache.append(keys[None], values[None], torch.arange(prompt)[None])
    view = LayerView.outside_engine(layer, num_layers, cache, query.shape[1], scaling, method.new_state())
    scores = method.kv_scores(view, query[None], keys[None])
    keep = method.choose(view, scores, method.row_budgets(view))[0]
    return keep.expand(keys.shape[0], -1)
