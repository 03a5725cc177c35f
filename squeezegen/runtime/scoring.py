"""Shared pieces of every KV-selection method: attention scores, pooling, GQA reduction, top-k.

Each function is small and tested by hand on tiny tensors; methods compose them. Shapes:
query (B, H, Lq, D) post-RoPE, key (B, Hkv, Lk, D), positions (B, Lq) and (B, Hkv, Lk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from squeezegen.errors import SqueezegenError
from squeezegen.runtime.attention import visibility_mask


def attention_probs(
    query: torch.Tensor, key: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Softmax attention (B, H, Lq, Lk) in fp32, masked by positions (causal, padding).

    Query heads are grouped onto their KV head rather than repeating K, so GQA costs no copies.
    """
    b, h, n_q, d = query.shape
    h_kv, n_k = key.shape[1], key.shape[2]
    groups = h // h_kv
    grouped = query.float().reshape(b, h_kv, groups * n_q, d)
    scores = (grouped @ key.float().transpose(-1, -2)).view(b, h_kv, groups, n_q, n_k) * scaling
    visible = visibility_mask(query_pos, key_pos)  # (B, Hkv or 1, Lq, Lk)
    scores = scores.masked_fill(~visible[:, :, None], float("-inf"))
    return scores.softmax(dim=-1).view(b, h, n_q, n_k)


def window_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    window: int,
    scaling: float,
) -> torch.Tensor:
    """Attention of the last `window` queries to every key, summed over those queries: (B, H, Lk).

    The SnapKV observation window: causal inside the window, fp32 softmax over all keys.
    """
    w = min(window, query.shape[2])
    probs = attention_probs(query[:, :, -w:], key, query_pos[:, -w:], key_pos, scaling)
    return probs.sum(dim=2)


def column_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    scaling: float,
    block: int = 256,
) -> torch.Tensor:
    """Attention received by each key summed over ALL queries (H2O's heavy-hitter score): (B, H, Lk).

    Computed in query blocks so the Lq x Lk matrix never exists whole.
    """
    total = None
    for start in range(0, query.shape[2], block):
        part = attention_probs(
            query[:, :, start : start + block], key, query_pos[:, start : start + block], key_pos, scaling
        ).sum(dim=2)
        total = part if total is None else total + part
    return total


def pool1d(scores: torch.Tensor, kernel: int, kind: str = "avg") -> torch.Tensor:
    """Smooth scores (..., L) along the sequence with a centred window (stride 1, same length)."""
    if kernel <= 1:
        return scores
    if kernel % 2 == 0:
        raise SqueezegenError(f"pooling kernel must be odd, got {kernel}")
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    if kind == "avg":
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    elif kind == "max":
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        raise SqueezegenError(f"pooling must be 'avg' or 'max', got {kind!r}")
    return pooled.reshape(shape)


def reduce_gqa(scores: torch.Tensor, num_kv_heads: int, how: str = "mean") -> torch.Tensor:
    """(B, H, L) -> (B, Hkv, L): combine the query heads that share a KV head."""
    b, h, n = scores.shape
    grouped = scores.view(b, num_kv_heads, h // num_kv_heads, n)
    if how == "mean":
        return grouped.mean(dim=2)
    if how == "sum":
        return grouped.sum(dim=2)
    if how == "max":
        return grouped.amax(dim=2)
    raise SqueezegenError(f"GQA reduction must be 'mean', 'sum' or 'max', got {how!r}")


def topk_keep_window(scores: torch.Tensor, budget: int, window: int) -> torch.Tensor:
    """Indices (B, Hk, budget), ascending: the last `window` positions always, the best of the rest.

    scores (B, Hk, L) cover every position; those of the window are ignored.
    """
    n = scores.shape[-1]
    window = min(window, budget)
    if budget >= n:
        return torch.arange(n, device=scores.device).expand(*scores.shape[:-1], n)
    head = scores[..., : n - window]
    chosen = head.topk(budget - window, dim=-1).indices
    recent = torch.arange(n - window, n, device=scores.device).expand(*scores.shape[:-1], window)
    return torch.cat([chosen, recent], dim=-1).sort(dim=-1).values


def topk_chunks_keep_window(scores: torch.Tensor, budget: int, window: int, chunk: int) -> torch.Tensor:
    """Like `topk_keep_window`, but positions are ranked by the summed score of their chunk of
    `chunk` consecutive positions, so whole chunks are kept or dropped (ChunkKV); the last chunk
    taken may be cut short so that the count is exact."""
    n = scores.shape[-1]
    span = n - min(window, budget)
    n_chunks = -(-span // chunk)
    per_chunk = F.pad(scores[..., :span], (0, n_chunks * chunk - span)).view(*scores.shape[:-1], n_chunks, chunk)
    spread = per_chunk.sum(-1).repeat_interleave(chunk, dim=-1)[..., :span]
    return topk_keep_window(torch.cat([spread, scores[..., span:]], dim=-1), budget, window)


def check_budget(budget: int | float) -> None:
    """A budget is an int token count >= 1 or a float fraction in (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise SqueezegenError(f"budget must be a token count or a fraction in (0, 1], got {budget!r}")
    if isinstance(budget, float) and not 0 < budget <= 1:
        raise SqueezegenError(f"a fractional budget must be in (0, 1], got {budget}; give a token count as an int")
    if isinstance(budget, int) and budget < 1:
        raise SqueezegenError(f"budget must be at least 1 token, got {budget}")


def resolve_budget(budget: int | float, context: int) -> int:
    """A float in (0, 1] is a fraction of the context, an int a token count."""
    check_budget(budget)
    if isinstance(budget, float):
        return max(1, round(budget * context))
    if budget > context:
        raise SqueezegenError(
            f"budget of {budget} tokens is larger than the {context}-token context: lower it or pass a fraction"
        )
    return budget
