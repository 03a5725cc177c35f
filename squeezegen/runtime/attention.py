"""Dense attention over the engine's cache, and the hook that routes HF attention modules to the engine.

`dense_attention` makes the same kernel calls as transformers' SDPA path (enable_gqa without a mask,
grouped queries for a masked single-token step, repeated K/V otherwise), so the full-cache engine
reproduces Hugging Face's numbers bit for bit; the exception is a bf16 prefill chunk on a CPU with
native bf16, which takes `blocked_attention` (about twice SDPA's speed there, within bf16 rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from squeezegen.runtime.device import native_bf16

ATTENTION_NAME = "squeezegen"


def visibility_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Which keys each query may attend to, from absolute positions alone.

    query_pos (B, Lq), key_pos (B, Hk, Lk) with -1 marking left padding -> bool (B, Hk, Lq, Lk).
    A real query sees real keys at or before its position (within `window` if given); a padding
    query sees only padding, which keeps its row finite without touching real rows.
    """
    q = query_pos[:, None, :, None]
    k = key_pos[:, :, None, :]
    visible = (k <= q) & ((k >= 0) | (q < 0))
    if window is not None:
        visible &= q - k < window
    return visible


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv * groups, L, D), each KV head repeated for its query heads."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """SDPA of query (B, H, Lq, D) over key/value (B, Hkv, Lk, D) -> (B, H, Lq, D).

    `mask` is a bool (B, 1|Hkv, Lq, Lk) visibility mask; without one, `causal` selects causal attention.
    """
    b, h, n_q, d = query.shape
    groups = h // key.shape[1]
    if n_q >= QUERY_BLOCK // 2 and query.dtype == torch.bfloat16 and query.device.type == "cpu" and native_bf16("cpu"):
        return blocked_attention(query, key, value, scaling, mask, causal)
    if mask is None:
        return F.scaled_dot_product_attention(
            query, key, value, is_causal=causal and n_q > 1, scale=scaling, enable_gqa=groups > 1
        )
    if n_q == 1:  # one token: attend per KV head with its query heads stacked, no K/V copies
        packed = query.reshape(b, key.shape[1], groups, d)
        out = F.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)
        return out.reshape(b, h, 1, d)
    if mask.shape[1] > 1:
        mask = mask.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask, scale=scaling
    )


QUERY_BLOCK = 128  # queries a block of blocked_attention (128 and 256 measured; 128 faster at 950 and 4000 tokens)


def blocked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """`dense_attention`'s result for a bf16 prefill chunk on a CPU with native bf16, as two matrix
    products per block of QUERY_BLOCK queries (the softmax between them in float32), each query
    head grouped under its KV head (no K/V copies) and a causal block reading only the keys up to
    its last query. SDPA's CPU kernel ran at about half the speed (SmolLM2-135M: 9.6 ms vs 4.1 a
    layer at 950 tokens, 124 vs 91 at 4,000, 2 AVX512-BF16 cores); the sums are in another order,
    so the output is within bf16 rounding of SDPA's, not equal to it (float32 keeps SDPA)."""
    b, h, n_q, d = query.shape
    kv_heads, n_k = key.shape[1], key.shape[2]
    groups = h // kv_heads
    out = torch.empty(b, kv_heads, groups, n_q, d, dtype=query.dtype, device=query.device)
    grouped = query.reshape(b, kv_heads, groups, n_q, d)
    for start in range(0, n_q, QUERY_BLOCK):
        end = min(start + QUERY_BLOCK, n_q)
        keys = min(end, n_k) if mask is None and causal else n_k  # causal as SDPA's: query i sees keys <= i
        block = grouped[:, :, :, start:end].reshape(b, kv_heads, groups * (end - start), d)
        scores = torch.matmul(block, key[:, :, :keys].transpose(-1, -2)).float().mul_(scaling)
        scores = scores.view(b, kv_heads, groups, end - start, keys)
        if mask is not None:
            scores.masked_fill_(~mask[:, :, None, start:end, :keys], float("-inf"))
        elif causal:
            later = torch.ones(end - start, keys, dtype=torch.bool, device=query.device).triu(start + 1)
            scores.masked_fill_(later, float("-inf"))
        probs = scores.softmax(dim=-1).to(value.dtype).view(b, kv_heads, groups * (end - start), keys)
        out[:, :, :, start:end] = torch.matmul(probs, value[:, :, :keys]).view(b, kv_heads, groups, end - start, d)
    return out.view(b, h, n_q, d)


def banded_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    positions: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """Sliding-window prefill attention in blocks of `window` queries, each over the keys that can
    fall in its window: O(L x window) instead of an L x L mask. query (B, H, L, D), keys the same L
    tokens (B, Hkv, L, D) at ascending `positions` (B, L)."""
    n = query.shape[2]
    groups = query.shape[1] // key.shape[1]
    out = torch.empty_like(query)
    for start in range(0, n, window):
        end = min(start + window, n)
        first = max(0, start - window + 1)  # positions ascend, so nothing earlier is in view
        mask = visibility_mask(positions[:, start:end], positions[:, None, first:end], window)
        out[:, :, start:end] = F.scaled_dot_product_attention(
            query[:, :, start:end],
            repeat_kv(key[:, :, first:end], groups),
            repeat_kv(value[:, :, first:end], groups),
            attn_mask=mask,
            scale=scaling,
        )
    return out


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor, scaling: float
) -> torch.Tensor:
    """One new token's attention: query (B, H, 1, D) over a decode buffer key/value (B, Hkv, C, D)
    whose slots are `visible` (B, Hkv, C) -> (B, H, 1, D). Query heads are stacked per KV head,
    so grouped-query attention needs no K/V copies."""
    b, h, _, d = query.shape
    packed = query.reshape(b, key.shape[1], h // key.shape[1], d)
    if query.dtype == torch.float32 or query.device.type != "cpu" or not native_bf16("cpu"):
        out = F.scaled_dot_product_attention(packed, key, value, attn_mask=visible[:, :, None, :], scale=scaling)
    else:
        # on a CPU with native bf16, SDPA's kernel for one query took 140 of 174.5 ms of a SmolLM2
        # step at 8K (AMX, benchmarks/decode_profile.py --dtype bfloat16): two matmuls use the
        # matrix units, the softmax in float32. Without native bf16 (AVX2) matmuls in bf16 are
        # emulated and SDPA is the faster of the two (7-9x at 2K and 8K, measured here)
        scores = torch.matmul(packed, key.transpose(-1, -2)).float() * scaling
        probs = scores.masked_fill(~visible[:, :, None, :], float("-inf")).softmax(dim=-1)
        out = torch.matmul(probs.to(value.dtype), value)
    return out.reshape(b, h, 1, d)


def _engine_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    sg_engine=None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Every HF attention module of a model the engine drives calls this: inside the engine it
    hands q, k, v over; outside (`model.generate`, `model(ids)`) it is transformers' own SDPA."""
    if sg_engine is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, sliding_window=sliding_window, **kwargs
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = sg_engine.attend(module.layer_idx, query, key, value, scaling, sliding_window)
    return out.transpose(1, 2), None


def route_attention(model: torch.nn.Module) -> None:
    """Point the model's attention at the engine, once: its own forward and `generate` keep
    computing what SDPA computes (the mask builder is SDPA's too)."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    for config in configs.values():
        if config._attn_implementation_internal != ATTENTION_NAME:
            config._attn_implementation_internal = ATTENTION_NAME


AttentionInterface.register(ATTENTION_NAME, _engine_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
