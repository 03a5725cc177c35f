"""The engine's KV cache: one buffer per layer, each free to hold its own length.

Every slot keeps the absolute position of its token, -1 for none (left padding, a row that kept
fewer entries than another, an evicted or not yet written slot), so masks follow from positions
alone whatever a method kept, per row and per KV head.

Two phases. While prefilling, a layer holds its chunks in order (a fresh layer holds the
forward's own tensors, no copy) and methods select from them. When decoding starts, every layer
moves once into a fixed-capacity buffer: a decode step then writes its token into the first empty
slot of every (row, KV head), evicts by marking a slot empty, and never reallocates, so the step
has static shapes and no host synchronisation (it can be compiled). Slot order carries no meaning
once decoding has begun; positions do.
"""

from __future__ import annotations

import torch

EMPTY = -1


def compact_index(keep: torch.Tensor, empty_first: bool = False) -> torch.Tensor:
    """Indices (..., T') of the True entries of `keep` (..., T), ascending, padded with -1 where a
    row keeps fewer than T' (the most any row keeps): after them, or before with `empty_first`."""
    n = keep.shape[-1]
    slots = torch.arange(n, device=keep.device)
    count = int(keep.sum(-1).max()) if keep.numel() else 0
    if empty_first:
        order = torch.where(keep, slots, slots - n).sort(dim=-1).values[..., n - count :]
        return order.masked_fill(order < 0, EMPTY)
    order = torch.where(keep, slots, slots + n).sort(dim=-1).values[..., :count]
    return order.masked_fill(order >= n, EMPTY)


def gather_entries(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) at index (B, H, T') (-1 reads slot 0; callers mask it) -> (B, H, T', D)."""
    return x.gather(2, index.clamp(min=0)[..., None].expand(*index.shape, x.shape[-1]))


def _scatter_bits(buffer: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """`buffer.scatter_(2, index, src)`, moving 16-bit floats as int16: the CPU's scatter kernel
    for bf16/fp16 is ~20x slower than for integers (117 vs 6 us per layer and step, measured)."""
    if buffer.element_size() == 2:
        buffer, src = buffer.view(torch.int16), src.view(torch.int16)
    buffer.scatter_(2, index, src)


class LayerCache:
    """Keys/values (B, Hkv, C, D) of one layer and their positions (B, Hkv, C), -1 = no entry."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.used = 0  # prefill: slots [0, used) hold entries (or padding); decode: the capacity
        self.window: int | None = None  # sliding-window layer: entries out of view are dropped
        self.static = False  # in its decode buffer

    def held(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values (B, Hkv, T, D) and positions (B, Hkv, T) of the slots in use."""
        n = self.used
        return self.keys[:, :, :n], self.values[:, :, :n], self.pos[:, :, :n]

    def live(self) -> torch.Tensor:
        """Entries per row and KV head (B, Hkv)."""
        return (self.held()[2] >= 0).sum(-1)

    def _set(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor) -> None:
        self.keys, self.values, self.pos, self.used = keys, values, pos, keys.shape[2]

    # --- prefill ---------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Add a chunk (B, Hkv, L, D) of tokens at `positions` (B, L) after what the layer holds."""
        b, h, n, _ = keys.shape
        pos = positions[:, None, :].expand(b, h, n)
        if self.keys is None:
            # Hold the forward's tensors as they are: copying them into a bigger buffer now would
            # interleave long-lived blocks with the forward's activations on the heap, and the
            # fragmentation costs ~10% of a long prefill. Decoding moves them once.
            self._set(keys, values, pos)
            return
        k, v, p = self.held()
        self._set(torch.cat([k, keys], dim=2), torch.cat([v, values], dim=2), torch.cat([p, pos], dim=2))
        self.static = False

    def keep(self, index: torch.Tensor, room: int = 0) -> None:
        """Retain the entries at `index` (B, Hkv or 1, T'), -1 = none, in a buffer with `room`
        empty slots after them, so that what is dropped is freed."""
        k, v, p = self.held()
        b, h = k.shape[:2]
        index = index.expand(b, h, index.shape[-1])
        kept_pos = p.gather(2, index.clamp(min=0)).masked_fill(index < 0, EMPTY)
        kept_k, kept_v = gather_entries(k, index), gather_entries(v, index)
        if room:
            pad = (0, 0, 0, room)
            kept_k, kept_v = torch.nn.functional.pad(kept_k, pad), torch.nn.functional.pad(kept_v, pad)
            kept_pos = torch.nn.functional.pad(kept_pos, (0, room), value=EMPTY)
        self._set(kept_k, kept_v, kept_pos)

    def drop_out_of_view(self, next_pos: torch.Tensor) -> None:
        """Sliding-window layer after a prefill chunk: keep only what the tokens at `next_pos`
        (B,) and later can still see."""
        pos = self.held()[2]
        visible = pos > (next_pos - self.window)[:, None, None]
        if not bool(visible.all()):
            self.keep(compact_index(visible, empty_first=True))

    # --- decode ----------------------------------------------------------------------------------
    def to_static(self, capacity: int) -> None:
        """Move into a decode buffer of `capacity` slots (at least those in use): every slot keeps
        its place, so decode steps fill the empty ones (padding first) and then the room after."""
        k, v, p = self.held()
        b, h, n, d = k.shape
        capacity = max(capacity, n)
        self.keys, self.values = k.new_zeros(b, h, capacity, d), v.new_zeros(b, h, capacity, d)
        self.pos = p.new_full((b, h, capacity), EMPTY)
        self.keys[:, :, :n], self.values[:, :, :n], self.pos[:, :, :n] = k, v, p
        self.used, self.static = capacity, True

    def grow(self, extra: int) -> None:
        """`extra` more empty slots at the end of the decode buffer; the others keep their places."""
        self.to_static(self.used + extra)

    def write(self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor) -> None:
        """Put one token's keys/values (B, Hkv, 1, D) at `position` (B,) into the first empty slot
        of every row and KV head (after dropping what a sliding window no longer shows)."""
        if self.window is not None:
            self.pos.masked_fill_(self.pos <= (position - self.window)[:, None, None], EMPTY)
        slot = (self.pos < 0).to(torch.int8).argmax(dim=-1, keepdim=True)  # (B, Hkv, 1)
        at = slot[..., None].expand(*slot.shape, keys.shape[-1])
        _scatter_bits(self.keys, at, keys)
        _scatter_bits(self.values, at, values)
        self.pos.scatter_(2, slot, position[:, None, None].expand_as(slot))

    def evict(self, slot: torch.Tensor, where: torch.Tensor | None = None) -> None:
        """Mark one slot per row and KV head (B, Hkv) empty, only where `where` (B, Hkv) holds."""
        b, h = self.pos.shape[:2]
        slot = slot.expand(b, h)[..., None]
        drop = torch.full_like(slot, EMPTY)
        if where is not None:
            drop = torch.where(where.expand(b, h)[..., None], drop, self.pos.gather(2, slot))
        self.pos.scatter_(2, slot, drop)

    def evict_where(self, drop: torch.Tensor) -> None:
        """Mark every slot where `drop` (B, Hkv, C) holds empty."""
        self.pos.masked_fill_(drop, EMPTY)

    def nbytes(self) -> int:
        """Bytes of keys and values the layer's buffers hold (empty decode slots included)."""
        if self.keys is None:
            return 0
        b, h, _, d = self.keys.shape
        return 2 * b * h * self.used * d * self.keys.element_size()


class KVCache:
    """Per-layer caches plus the peak of what they held together (the KV memory a method needs)."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(num_layers)]
        self.peak_bytes = 0
        self.decode_bytes = 0  # what the decode buffers hold (a compressed document's cost)

    def nbytes(self) -> int:
        """Bytes of keys and values held now in all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.nbytes())

    def lengths(self) -> list[int]:
        """The most entries any row and KV head holds, per layer."""
        return [int(layer.live().max()) if layer.keys is not None else 0 for layer in self.layers]


class HeadSplitCache:
    """A layer whose KV heads hold very different numbers of entries (head-adaptive budgets),
    each head in a buffer of its own (B, 1, T_h, D): the memory held is what the heads keep, not
    the largest head's count times the heads. Attention runs head by head."""

    def __init__(self, heads: list[LayerCache]) -> None:
        self.heads = heads
        self.window = None
        self.static = False

    @classmethod
    def of(cls, cache: LayerCache) -> HeadSplitCache:
        k, v, p = cache.held()
        heads = []
        for h in range(k.shape[1]):
            index = compact_index(p[:, h : h + 1] >= 0)
            part = LayerCache()
            part._set(k[:, h : h + 1], v[:, h : h + 1], p[:, h : h + 1])
            part.keep(index)
            heads.append(part)
        return cls(heads)

    @property
    def keys(self) -> torch.Tensor | None:  # a layer is in use when its heads are
        return self.heads[0].keys

    def live(self) -> torch.Tensor:
        return torch.cat([head.live() for head in self.heads], dim=1)

    def held(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The heads side by side (B, Hkv, T, D), padded to the longest (for inspection: it copies)."""
        parts = [head.held() for head in self.heads]
        width = max(p[0].shape[2] for p in parts)
        pad = torch.nn.functional.pad
        k = torch.cat([pad(p[0], (0, 0, 0, width - p[0].shape[2])) for p in parts], dim=1)
        v = torch.cat([pad(p[1], (0, 0, 0, width - p[1].shape[2])) for p in parts], dim=1)
        pos = torch.cat([pad(p[2], (0, width - p[2].shape[2]), value=EMPTY) for p in parts], dim=1)
        return k, v, pos

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        for h, head in enumerate(self.heads):
            head.append(keys[:, h : h + 1], values[:, h : h + 1], positions)

    def to_static_room(self, steps: int) -> None:
        """Decode buffers with room for `steps` more tokens in every head."""
        for head in self.heads:
            head.to_static(int(head.live().max()) + steps)
        self.static = True

    def write(self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor) -> None:
        for h, head in enumerate(self.heads):
            head.write(keys[:, h : h + 1], values[:, h : h + 1], position)

    def nbytes(self) -> int:
        return sum(head.nbytes() for head in self.heads)


def padding_share(cache: LayerCache) -> float:
    """The share of a layer's slots that hold no entry (what splitting its heads would save)."""
    pos = cache.held()[2]
    return float((pos < 0).float().mean()) if pos.numel() else 0.0
