"""Shared pieces of the KV-selection methods: attention scores, pooling, GQA reduction, top-k.

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


def keep_top(
    scores: torch.Tensor, real: torch.Tensor, budgets: list[int], windows: list[int], chunk: int = 0
) -> torch.Tensor:
    """Indices (B, Hk, K) each row keeps, ascending, -1 after them where a row keeps fewer than
    the most any row keeps (K): its `windows[row]` newest real entries always, then the best-scored
    of its other real entries up to `budgets[row]` in all (every real entry if the budget holds all).

    scores (B, Hk, n); real (B, 1|Hk, n) marks entries that exist (not padding), newest last.
    Ties go to the earlier entry (a stable sort), so a row's choice does not depend on how much
    padding it carries in a batch. With `chunk` > 0, entries are ranked by the summed score of
    their chunk of `chunk` consecutive real entries (counted from the row's first one), so whole
    chunks are kept (ChunkKV); the last chunk taken may be cut short so that the count is exact.
    """
    b, h, n = scores.shape
    real = (real if real.shape[1] == h else real[:, :1]).expand(b, h, n)
    device = scores.device
    budget = torch.tensor(budgets, device=device)[:, None, None]
    window = torch.tensor(windows, device=device)[:, None, None]
    newest_first = real.sum(-1, keepdim=True) - real.long().cumsum(-1)  # 0 for a row's newest entry
    recent = real & (newest_first < window)
    if chunk:
        scores = chunk_scores(scores, real & ~recent, chunk)
    ranked = torch.where(recent, float("inf"), scores.float()).masked_fill(~real, float("-inf"))
    count = min(n, max(budgets))
    order = ranked.sort(dim=-1, descending=True, stable=True).indices[..., :count]
    taken = (torch.arange(count, device=device) < budget) & real.gather(-1, order)
    index = torch.where(taken, order, n).sort(dim=-1).values
    return index.masked_fill(index >= n, -1)


def keep_global(
    scores: torch.Tensor, real: torch.Tensor, must: torch.Tensor, totals: list[int], floors: list[int]
) -> torch.Tensor:
    """Which entries (B, U, n) each row keeps when its budget is shared by U units (the KV heads
    of a layer for AdaKV, every layer's heads for KVzip): `totals[row]` entries in all, at least
    `floors[row]` per unit (its best), the rest to the best-scored anywhere; `must` entries
    (sinks, a recent window) count as the best. Ties go to the earlier unit and entry."""
    b, u, n = scores.shape
    device = scores.device
    real, must = real.expand(b, u, n), must.expand(b, u, n)
    ranked = torch.where(must, float("inf"), scores.float()).masked_fill(~real, float("-inf"))
    floor = torch.tensor(floors, device=device)[:, None, None]
    total = torch.tensor(totals, device=device)[:, None]
    order = ranked.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=device).expand_as(order))
    kept = (rank < floor) & real
    rest = ranked.masked_fill(kept, float("-inf")).view(b, u * n)
    left = (total - kept.view(b, -1).sum(-1, keepdim=True)).clamp(min=0)
    order = rest.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(u * n, device=device).expand_as(order))
    return kept | ((rank < left) & real.reshape(b, u * n)).view(b, u, n)


def chunk_scores(scores: torch.Tensor, eligible: torch.Tensor, chunk: int) -> torch.Tensor:
    """Each eligible entry's score replaced by the sum over its chunk of `chunk` consecutive
    eligible entries, counted from the row's first one."""
    chunk_id = ((eligible.long().cumsum(-1) - 1) // chunk).clamp(min=0)
    sums = torch.zeros_like(scores, dtype=torch.float32).scatter_add_(
        -1, chunk_id, torch.where(eligible, scores.float(), 0.0)
    )
    return torch.where(eligible, sums.gather(-1, chunk_id), scores.float())


def check_budget(budget: int | float) -> None:
    """A budget is an int token count >= 1 or a float fraction in (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise SqueezegenError(f"budget must be a token count or a fraction in (0, 1], got {budget!r}")
    if isinstance(budget, float) and not 0 < budget <= 1:
        raise SqueezegenError(f"a fractional budget must be in (0, 1], got {budget}; give a token count as an int")
    if isinstance(budget, int) and budget < 1:
        raise SqueezegenError(f"budget must be at least 1 token, got {budget}")


def resolve_budget(budget: int | float, context: int) -> int:
    """Entries to keep of a `context`-token prompt: a float in (0, 1] is a fraction of it, an int
    a token count; a prompt within the budget keeps everything."""
    check_budget(budget)
    if isinstance(budget, float):
        return min(context, max(1, round(budget * context)))
    return min(budget, context)
