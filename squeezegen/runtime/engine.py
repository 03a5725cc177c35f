"""The inference engine: prefill and decode over a Hugging Face model's own decoder layers.

The engine owns positions, masks and the KV cache, so a method can drop tokens between layers,
replace a layer's attention or rewrite the cache between decode steps (see methods/base.py).
One `Engine` serves one generation: `prefill` one or more chunks, then `decode` token by token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from squeezegen.errors import SqueezegenError
from squeezegen.methods.base import Method
from squeezegen.runtime.attention import ATTENTION_NAME, banded_attention, dense_attention, visibility_mask
from squeezegen.runtime.cache import KVCache
from squeezegen.runtime.decoder import DecoderParts


class Engine:
    """State of one generation: the cache, token positions and the method's scratch space."""

    def __init__(self, model: torch.nn.Module, method: Method | None = None, reserve: int = 0) -> None:
        """`reserve`: decode tokens to leave room for in each layer's buffer (max_new_tokens)."""
        self.model = model
        self.parts = DecoderParts.of(model)
        self.method = method if method is not None else Method()
        self.cache = KVCache(len(self.parts.layers), reserve)
        self.state: dict = {}  # the method's per-generation state
        self.positions: torch.Tensor | None = None  # (B, L) positions of the tokens being run, -1 = padding
        self.next_pos: torch.Tensor | None = None  # (B,) position the next token of each row takes
        self.prompt_lengths: torch.Tensor | None = None  # (B,) real tokens per row after the prefill
        self.decode_steps = 0
        self._compress = False
        self._refill: torch.Tensor | None = None
        self._masks: dict = {}
        self._memo: tuple[int, dict] = (-1, {})
        self._decode_hook = type(self.method).on_decode_attention is not Method.on_decode_attention

    # --- the loop -------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        compress: bool = True,
        progress: bool = False,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run a chunk of tokens (B, L), left-padded where `attention_mask` is 0; returns the
        last position's logits (B, V), or every position's (B, L, V) with `all_logits`.
        `compress=False` appends the chunk without letting the method select or propagate (a
        question asked after a compressed context, or text scored by teacher forcing)."""
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        start = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        if self.next_pos is not None:
            start = self.next_pos
        positions = (start[:, None] + valid.long().cumsum(-1) - 1).masked_fill(~valid, -1)
        self.next_pos = start + valid.sum(-1)
        self.prompt_lengths = self.next_pos.clone()
        self._compress = compress
        logits = self._forward(self.parts.embed(input_ids), positions, progress, all_logits)
        if logits is not None:
            return logits
        # the method stopped this pass and chose a shorter prompt to prefill instead (GemFilter)
        if bool((start > 0).any()):
            raise SqueezegenError(
                f"{type(self.method).__name__} prefills a shortened prompt from scratch, so it can only compress "
                "the first prefill chunk"
            )
        keep, self._refill = self._refill, None
        self.cache = KVCache(len(self.parts.layers), self.cache.layers[0].reserve)
        self.next_pos = None
        return self.prefill(input_ids.gather(1, keep), valid.gather(1, keep).long(), False, progress, all_logits)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run one new token per row (B,); returns the logits (B, V) for the token after it."""
        positions = self.next_pos[:, None]
        self.next_pos = self.next_pos + 1
        self._compress = False
        logits = self._forward(self.parts.embed(tokens[:, None]), positions)
        self.cache.note_peak()
        self.method.on_decode_step(self, self.decode_steps)
        self.decode_steps += 1
        return logits

    def _forward(
        self, hidden: torch.Tensor, positions: torch.Tensor, progress: bool = False, all_logits: bool = False
    ) -> torch.Tensor | None:
        """Run every layer; None if the method asked for a refill (its indices in `_refill`)."""
        parts = self.parts
        self.positions = positions
        self._masks.clear()
        self._memo = (-1, {})
        rope = parts.rope(hidden, positions.clamp(min=0))
        layers = tqdm(parts.layers, desc="prefill", unit="layer", leave=False) if progress else parts.layers
        with self._routed_attention():
            for i, layer in enumerate(layers):
                hidden = layer(
                    hidden,
                    attention_mask=None,
                    position_ids=positions,
                    position_embeddings=rope[parts.layer_types[i]],
                    sg_engine=self,
                )
                if not self._compress:
                    continue
                self._refill = self.method.refill(self, i)
                if self._refill is not None:
                    if progress:
                        layers.close()
                    return None
                keep = self.method.propagate(self, i, hidden)
                if keep is not None:
                    hidden = hidden.gather(1, keep[..., None].expand(-1, -1, hidden.shape[-1]))
                    positions = positions.gather(1, keep)
                    self.positions = positions
                    self._masks.clear()
                    rope = parts.rope(hidden, positions.clamp(min=0))
        return parts.logits(hidden) if all_logits else parts.logits(hidden[:, -1:])[:, -1]

    def layer_memo(self, layer: int) -> dict:
        """Scratch space shared by everything that scores this layer during the current forward."""
        if self._memo[0] != layer:
            self._memo = (layer, {})
        return self._memo[1]

    def fork(self, method: Method, state: dict, keep: dict[int, torch.Tensor | None]) -> Engine:
        """A twin of this engine after its prefill, as if `method` had run that prefill itself:
        each layer keeps the entries `keep[layer]` (None = all) and the method gets `state`.

        Valid for methods that only select (no `propagate`, no own `prefill_attention`), whose
        prefill computes exactly what the full cache computes; evaluations use it to share one
        prefill among many methods and budgets.
        """
        twin = Engine(self.model, method, reserve=self.cache.layers[0].reserve)
        twin.state = state
        twin.next_pos = self.next_pos.clone()
        twin.prompt_lengths = self.prompt_lengths.clone()
        for layer, (src, dst) in enumerate(zip(self.cache.layers, twin.cache.layers, strict=True)):
            dst.window = src.window
            if src.keys is None:
                continue
            dst.shared_heads, dst.padded = src.shared_heads, src.padded
            if keep.get(layer) is None:
                dst._realloc(src.length + dst.reserve, *src.view())  # own buffers: decoding writes in place
            else:  # `keep` gathers into new buffers and leaves the source untouched
                dst.keys, dst.values, dst.pos, dst.length = src.keys, src.values, src.pos, src.length
                dst.keep(keep[layer])
        twin.cache.note_peak()
        return twin

    # --- called by every attention module (runtime/attention.py) ---------------------------------
    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        window: int | None,
    ) -> torch.Tensor:
        """Add this step's keys/values to the layer's cache and attend over all it holds."""
        cache = self.cache.layers[layer]
        cache.window = window
        fresh = cache.length == 0
        cache.append(key, value, self.positions)
        keys, values, key_pos = cache.view()
        if query.shape[2] == 1:
            mask = None
            if cache.padded or (window is not None and int(key_pos.min()) <= int(self.positions.max()) - window):
                mask = visibility_mask(self.positions, key_pos[:, :1] if cache.shared_heads else key_pos, window)
            out = dense_attention(query, keys, values, scaling, mask)
            if self._decode_hook:
                self.method.on_decode_attention(self, layer, query)
            return out

        if window is not None and fresh and not cache.padded and query.shape[2] > 2 * window:
            # a long prompt in a sliding-window layer: attend band by band (methods leave these
            # layers alone, their attention is local by construction)
            out = banded_attention(query, keys, values, scaling, self.positions, window)
        else:
            causal = fresh and not cache.padded and (window is None or query.shape[2] <= window)
            mask = None if causal else self._prefill_mask(cache, key_pos, fresh, window)
            out = self.method.prefill_attention(self, layer, query, keys, values, mask, causal, scaling)
        if self._compress:
            keep = self.method.select_cache(self, layer, query, keys, values)
            if keep is not None:
                cache.keep(keep)
        if window is not None and cache.length >= window:
            cache.drop_out_of_window()
        # a layer's whole K/V before its selection is a transient of the forward, like any
        # activation; the cache's peak is what layers hold between steps
        self.cache.note_peak()
        return out

    def _prefill_mask(self, cache, key_pos: torch.Tensor, fresh: bool, window: int | None) -> torch.Tensor:
        """Masks of fresh layers depend only on this chunk's positions: build once per forward."""
        if not (fresh and cache.shared_heads):
            return visibility_mask(self.positions, key_pos[:, :1] if cache.shared_heads else key_pos, window)
        if window not in self._masks:
            self._masks[window] = visibility_mask(self.positions, self.positions[:, None], window)
        return self._masks[window]

    @contextmanager
    def _routed_attention(self) -> Iterator[None]:
        """Point the model's attention modules at the engine for the duration of a forward."""
        configs = {id(layer.self_attn.config): layer.self_attn.config for layer in self.parts.layers}
        saved = {key: config._attn_implementation_internal for key, config in configs.items()}
        for config in configs.values():
            config._attn_implementation_internal = ATTENTION_NAME
        try:
            yield
        finally:
            for key, config in configs.items():
                config._attn_implementation_internal = saved[key]
