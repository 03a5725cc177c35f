"""Token Sparse Attention (TSA): in the sparse layers, each query head runs prefill attention over
its own subset of tokens, and the tokens it dropped come back in the next layer.

The full K/V still go to the cache (TSA saves prefill compute, not KV memory). Per head, Q, K and V
are gathered to the kept positions, any dense kernel runs on the compact tensors (causal: the
indices are sorted, so compact order is position order), and the output is scattered back; a
dropped (token, head) pair outputs exactly zero, while the residual stream and the MLP keep every
token. Decoding is untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from squeezegen.errors import SqueezegenError
from squeezegen.methods.scoring import attention_probs, pool1d
from squeezegen.methods.sparse_layers import saved_sparse_layers
from squeezegen.runtime.attention import dense_attention
from squeezegen.runtime.hooks import Method
from squeezegen.runtime.timing import PhaseClock

# The kernel run on the compact tensors: (q, k, v) of shape (B, H, n, D), all heads alike, causal.
CompactKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def sdpa_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)


def coverage_index(
    query: torch.Tensor,
    key: torch.Tensor,
    positions: torch.Tensor,
    key_positions: torch.Tensor,
    scaling: float,
    tau: float,
    min_tokens: int,
    window: int,
    kernel: int = 7,
) -> torch.Tensor | None:
    """Positions (B, H, k + window) each query head keeps, ascending; None when nothing is dropped.

    Dynamic token coverage: the last `window` queries' attention (fp32, causal inside the window)
    averaged per head over those queries and pooled; the layer drops the least important tokens
    whose summed share of the head-averaged distribution stays below `tau`, every head the same
    count, each head its own tokens. Costs O(window x L) per head, never L x L. Batch rows agree on
    the smallest drop any of them allows (TokenSparse calls it row by row).
    """
    n = query.shape[2]
    span = n - window
    probs = attention_probs(query[:, :, -window:], key, positions[:, -window:], key_positions, scaling)
    scores = pool1d(probs[..., :span].mean(dim=2), kernel, "avg")  # (B, H, span)
    per_head = scores / scores.sum(dim=-1, keepdim=True)
    layer = scores.mean(dim=1)
    layer = layer / layer.sum(dim=-1, keepdim=True)
    dropped = int((layer.sort(dim=-1).values.cumsum(dim=-1) < tau).sum(dim=-1).min())
    if dropped == 0:
        return None
    k = max(min_tokens, span - (dropped + 1))
    if k >= span:
        return None
    top = per_head.topk(k, dim=-1).indices
    recent = torch.arange(span, n, device=query.device).expand(*top.shape[:2], window)
    return torch.cat([top, recent], dim=-1).sort(dim=-1).values


def gather_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, index: torch.Tensor):
    """Q (B, H, L, D) and K/V (B, Hkv, L, D) at each query head's positions `index` (B, H, m):
    compact (B, H, m, D) tensors; a KV head is read by its query heads without repeating it."""
    b, h, _, d = query.shape
    h_kv, n = key.shape[1], key.shape[2]
    groups = h // h_kv
    at = index[..., None].expand(-1, -1, -1, d)
    grouped_at = at.reshape(b, h_kv, groups, -1, d)

    def per_query_head(x: torch.Tensor) -> torch.Tensor:
        return x[:, :, None].expand(b, h_kv, groups, n, d).gather(3, grouped_at).reshape(b, h, -1, d)

    return query.gather(2, at), per_query_head(key), per_query_head(value)


def scatter_heads(compact: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    """Compact outputs (B, H, m, D) back to (B, H, length, D), zero where a head dropped a token."""
    b, h, _, d = compact.shape
    return compact.new_zeros(b, h, length, d).scatter_(2, index[..., None].expand(-1, -1, -1, d), compact)


def parse_layers(layers: object) -> list[int] | None:
    """None, an int, a list, or text like "8-15,20" (as the CLI passes it) -> sorted layer ids."""
    if layers is None:
        return None
    if isinstance(layers, int):
        return [layers]
    if isinstance(layers, (list, tuple)):
        return sorted(int(x) for x in layers)
    chosen = set()
    try:
        for part in str(layers).split(","):
            first, _, last = part.strip().partition("-")
            chosen.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise SqueezegenError(f"layers must look like '8-15,20', got {layers!r}") from None
    return sorted(chosen)


@dataclass
class TSAState:
    layers: set[int] | None = None  # the sparse layers, resolved once per generation
    stats: dict[int, dict] = field(default_factory=dict)  # per sparse layer: kept share, phase seconds


@dataclass
class TokenSparse(Method):
    """tau: share of attention mass the dropped tokens may hold (0 = dense); min_tokens: per head
    floor of kept tokens beyond the window, and no sparsity unless the prompt exceeds
    min_tokens + window; window: last queries that score, always kept; kernel: score pooling;
    layers: sparse layers ("8-15,20"), default the model's saved drift profile (`squeezegen
    profile-layers`), else the second half; timings: record per-layer phase times (syncs a GPU)."""

    tau: float = 0.005
    min_tokens: int = 1024
    window: int = 128
    kernel: int = 7
    layers: object = None
    timings: bool = False
    # the kernel on the compact tensors (Python API only): SDPA now, a block-sparse kernel later
    kernel_fn: CompactKernel = field(default=sdpa_causal, repr=False, metadata={"api_only": True})

    def __post_init__(self) -> None:
        if not 0 <= self.tau < 1:
            raise SqueezegenError(f"tau must be in [0, 1), got {self.tau}")
        if self.min_tokens < 1 or self.window < 1:
            raise SqueezegenError("min_tokens and window must be >= 1")
        if self.kernel < 1 or (self.kernel > 1 and self.kernel % 2 == 0):
            raise SqueezegenError(f"pooling kernel must be 1 (off) or odd, got {self.kernel}")
        self.layers = parse_layers(self.layers)

    def new_state(self) -> TSAState:
        return TSAState()

    def sparse_layers(self, view) -> set[int]:
        """The layers TSA applies to: given, saved for this model, or the second half; never a
        sliding-window layer (its attention is already local)."""
        state = view.state
        if state.layers is None:
            count = view.num_layers
            chosen = self.layers or saved_sparse_layers(view.engine.model) or range(count // 2, count)
            if max(chosen) >= count:
                raise SqueezegenError(f"sparse layer {max(chosen)} does not exist in a {count}-layer model")
            state.layers = {i for i in chosen if view.layer_types[i] != "sliding_attention"}
        return state.layers

    def prefill_attention(self, view, query, key, value, mask, causal):
        n = query.shape[2]
        # only a fresh chunk (the layer holds just these tokens) can be made sparse; later chunks
        # run dense. Each row is sparse on its own tokens, so a padded batch row is what it is alone.
        if view.index not in self.sparse_layers(view) or key.shape[2] != n:
            return dense_attention(query, key, value, view.scaling, mask, causal)
        clock = PhaseClock(query.device, self.timings)
        stats = view.state.stats.setdefault(view.index, {})
        if query.shape[0] == 1 and view.row_tokens[0] == n:
            out, kept = self._row(view, query, key, value, view.positions, clock)
            stats.update(kept=kept, **clock.laps)
            return out
        out = torch.zeros_like(query)
        kept_rows = []
        for row, m in enumerate(view.row_tokens):
            part = slice(row, row + 1), slice(None), slice(n - m, n)
            out[part], kept = self._row(
                view, query[part], key[part], value[part], view.positions[row : row + 1, n - m :], clock
            )
            kept_rows.append(kept)
        stats.update(kept=sum(kept_rows) / len(kept_rows), **clock.laps)
        return out

    def _row(self, view, query, key, value, positions, clock) -> tuple[torch.Tensor, float]:
        """One row's attention (1, H, m, D) over its own m tokens, and the share each head kept."""
        m = query.shape[2]
        index = None
        if m > self.min_tokens + self.window:
            index = coverage_index(
                query,
                key,
                positions,
                positions[:, None],
                view.scaling,
                self.tau,
                self.min_tokens,
                self.window,
                self.kernel,
            )
        clock.lap("score")
        if index is None:  # nothing to drop: exactly the dense path
            out = dense_attention(query, key, value, view.scaling, None, True)
            clock.lap("attend")
            return out, 1.0
        compact = gather_heads(query, key, value, index)
        clock.lap("gather")
        out_compact = self.kernel_fn(*compact, view.scaling)
        clock.lap("attend")
        out = scatter_heads(out_compact, index, m)
        clock.lap("scatter")
        return out, index.shape[-1] / m
