"""The engine's KV cache: one growable buffer per layer, each free to hold its own length.

Every entry keeps the absolute position of its token (-1 for left padding), so masks follow from
positions alone whatever a method evicted, and sliding-window layers drop what falls out of view.
"""

from __future__ import annotations

import torch

# Decode steps a sliding-window layer runs before it compacts its buffer again.
WINDOW_SLACK = 64


class LayerCache:
    """Keys/values (B, Hkv, T, D) of one layer in a preallocated buffer, with positions (B, Hkv, T)."""

    def __init__(self, reserve: int = 0) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.length = 0
        self.reserve = reserve  # room kept free for tokens still to come (decode)
        self.window: int | None = None  # sliding-window layer: entries older than this are dropped
        self.shared_heads = True  # every KV head holds the same positions
        self.padded = False  # some entry is left padding (pos < 0)

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.length
        return self.keys[:, :, :n], self.values[:, :, :n], self.pos[:, :, :n]

    def _realloc(self, capacity: int, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor) -> None:
        b, h, n, d = keys.shape
        self.keys = keys.new_empty(b, h, capacity, d)
        self.values = values.new_empty(b, h, capacity, d)
        self.pos = pos.new_empty(b, h, capacity)
        self.keys[:, :, :n] = keys
        self.values[:, :, :n] = values
        self.pos[:, :, :n] = pos
        self.length = n

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Add new entries (B, Hkv, L, D) for tokens at `positions` (B, L)."""
        b, h, n_new, _ = keys.shape
        pos = positions[:, None, :].expand(b, h, n_new)
        if self.keys is None:
            # Hold the prefill's tensors as they are: copying them into a bigger buffer now would
            # interleave long-lived blocks with the forward's activations on the heap, and the
            # fragmentation costs ~10% of a long prefill. The first decode step moves them.
            self.keys, self.values, self.pos = keys, values, pos
            self.length = n_new
            self.padded = bool((positions < 0).any())
            return
        if self.window is not None and self.length + n_new > self.keys.shape[2]:
            self.drop_out_of_window()
        if self.length + n_new > self.keys.shape[2]:
            k, v, p = self.view()
            self._realloc(self.length + n_new + (self.reserve or self.length), k, v, p)
        end = self.length + n_new
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.pos[:, :, self.length : end] = pos
        self.length = end
        self.padded = self.padded or bool((positions < 0).any())

    def drop_out_of_window(self) -> None:
        """Keep the last window-1 entries, all the next token can see (positions grow with index)."""
        keep = min(self.length, self.window - 1)
        k, v, p = self.view()
        n = self.length
        self._realloc(keep + WINDOW_SLACK, k[:, :, n - keep :], v[:, :, n - keep :], p[:, :, n - keep :])
        self.padded = bool((self.pos[:, :, :keep] < 0).any())

    def keep(self, index: torch.Tensor, room: int | None = None) -> None:
        """Retain only the entries at `index` (B, Hkv or 1, T'), sorted ascending per head, in a
        buffer with `room` free slots (default: the reserve), so what is dropped is freed."""
        k, v, p = self.view()
        b, h, _, d = k.shape
        index = index.expand(b, h, index.shape[-1])
        kept_pos = p.gather(2, index)
        kept_k = k.gather(2, index[..., None].expand(-1, -1, -1, d))
        kept_v = v.gather(2, index[..., None].expand(-1, -1, -1, d))
        self._realloc(index.shape[-1] + (self.reserve if room is None else room), kept_k, kept_v, kept_pos)
        self.shared_heads = self.shared_heads and bool((kept_pos == kept_pos[:, :1]).all())
        self.padded = bool((kept_pos < 0).any())

    def evict(self, slot: torch.Tensor) -> None:
        """Remove one entry per row and KV head, `slot` (B, Hkv or 1), in O(1): the newest entry
        moves into the hole. Order inside the cache carries no meaning, masks use positions."""
        b, h = self.keys.shape[:2]
        slot = slot.expand(b, h)
        rows = torch.arange(b, device=slot.device)[:, None]
        heads = torch.arange(h, device=slot.device)[None]
        last = self.length - 1
        for buf in (self.keys, self.values, self.pos):
            buf[rows, heads, slot] = buf[:, :, last]
        self.length = last
        self.shared_heads = self.shared_heads and bool((slot == slot[:, :1]).all())


class KVCache:
    """Per-layer caches plus the peak of what they held together (the KV memory a method needs)."""

    def __init__(self, num_layers: int, reserve: int = 0) -> None:
        self.layers = [LayerCache(reserve) for _ in range(num_layers)]
        self.peak_bytes = 0

    def layer_bytes(self, layer: int) -> int:
        """Bytes of the keys and values one layer holds now (buffer slack not counted)."""
        cache = self.layers[layer]
        if cache.keys is None:
            return 0
        b, h, _, d = cache.keys.shape
        return 2 * b * h * cache.length * d * cache.keys.element_size()

    def nbytes(self) -> int:
        """Bytes of keys and values held now in all layers."""
        return sum(self.layer_bytes(i) for i in range(len(self.layers)))

    def note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.nbytes())

    def lengths(self) -> list[int]:
        return [layer.length for layer in self.layers]
