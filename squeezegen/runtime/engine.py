"""The inference engine: prefill and decode over a Hugging Face model's own decoder layers.

The engine owns positions, masks and the KV cache, so a method can drop tokens between layers,
replace a layer's attention or rewrite the cache between decode steps (see hooks.py). One
`Engine` serves one generation: `prefill` one or more chunks, then `decode` token by token. The
first decode step moves the cache into fixed-capacity buffers; from then on a step is a pure
function of device tensors (no host synchronisation), which `torch.compile` can capture whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from squeezegen.errors import SqueezegenError
from squeezegen.runtime.attention import (
    banded_attention,
    decode_attention,
    dense_attention,
    route_attention,
    visibility_mask,
)
from squeezegen.runtime.cache import EMPTY, HeadSplitCache, KVCache, LayerCache, padding_share
from squeezegen.runtime.decoder import DecoderParts
from squeezegen.runtime.fused import FusedDecoder
from squeezegen.runtime.hooks import LayerView, Method
from squeezegen.runtime.step import compiled_step, decode_step

# A layer whose slots are more than this share padding (heads kept uneven counts) gets a buffer per head.
SPLIT_PADDING = 0.2


def check_causal_lm(model: object) -> None:
    """The engine drives Hugging Face causal LMs (what `sg.load` returns)."""
    if isinstance(model, tuple):
        raise SqueezegenError("sg.load returns (model, tokenizer): pass the model, as in `model, tok = sg.load(name)`")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise SqueezegenError(
            f"model must be a Hugging Face causal LM (model, tok = sg.load(name)), got {type(model).__name__}"
        )


def check_method(method: object) -> None:
    """A method is a configured instance (what `sg.method` returns) or None for the full cache."""
    if method is not None and not isinstance(method, Method):
        hint = f"sg.method({method!r})" if isinstance(method, str) else "sg.method(name, ...)"
        raise SqueezegenError(f"method must be a configured method such as {hint}, got {type(method).__name__}")


class Engine:
    """State of one generation: the cache, token positions and the methods' states."""

    def __init__(
        self,
        model: torch.nn.Module,
        method: Method | None = None,
        reserve: int = 0,
        compile: bool = False,
        tokenizer=None,
        fused: bool = True,
        native: bool = True,
    ) -> None:
        """`reserve`: decode steps to size the decode buffers for (they grow if more come);
        `compile`: run decode steps through `torch.compile` (see runtime/step.py);
        `tokenizer`: for methods that write text of their own (KVzip's reconstruction prompt);
        `fused`: decode through the engine's own forward (runtime/fused.py) where the model has
        one; False decodes through the HF layers (the reference);
        `native`: run that forward's step in C (runtime/native_step.py) where it applies; False
        runs it as torch operations."""
        check_causal_lm(model)
        check_method(method)
        if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
            raise SqueezegenError(f"reserve is a number of decode steps (an int >= 0), got {reserve!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.parts = DecoderParts.of(model)
        self.fused_wanted = fused
        self.native = native
        self.fused: FusedDecoder | None = None  # made when decoding starts
        self.method = method if method is not None else Method()
        self.hooks = self.method.hooks()
        self.cache = KVCache(len(self.parts.layers))
        self.states: dict[int, object] = {}  # per method object: its per-generation state
        self.positions: torch.Tensor | None = None  # (B, L) positions of the tokens being run, -1 = padding
        self.next_pos: torch.Tensor | None = None  # (B,) position the next token of each row takes
        self.prompt_lengths: torch.Tensor | None = None  # (B,) real tokens per row after the prefill
        self.reserve = reserve
        self.compile = compile
        self.decode_steps = 0
        self._compress = False
        self._padded = False  # some token being run is padding
        self._row_tokens: list[int] = []  # real tokens per row in the layers being run
        # real tokens per row of the chunk being prefilled (after a prefill: its rows' lengths, what a
        # method's after_prefill reads as each row's prompt)
        self.chunk_lengths: list[int] = []
        # scratch shared by this engine and its forks until the next prefill: what methods compute
        # from the same prefilled context (KVzip's reconstruction scores in a budget sweep) is
        # computed once; keys begin with the method's class
        self.prefill_memo: dict = {}
        self._refill: torch.Tensor | None = None
        self._probe: tuple[int, Callable] | None = None
        self._masks: dict = {}
        self._memo: tuple[int, dict] = (-1, {})
        self._horizon = 0  # decode steps the buffers are sized for; 0 = not decoding yet
        self._start_live: list[int] = []
        route_attention(model)

    # --- what methods see -------------------------------------------------------------------------
    def state_of(self, method: Method) -> object:
        """The per-generation state of `method` (created on first use)."""
        key = id(method)
        if key not in self.states:
            self.states[key] = method.new_state()
        return self.states[key]

    def view(self, layer: int, method: Method | None = None) -> LayerView:
        """The narrow view of one layer a method's hooks receive."""
        method = self.method if method is None else method
        if self._memo[0] != layer:
            self._memo = (layer, {})
        return LayerView(
            index=layer,
            num_layers=len(self.parts.layers),
            layer_types=self.parts.layer_types,
            scaling=self.parts.scaling(layer),
            positions=self.positions,
            cache=self.cache.layers[layer],
            prompt_lengths=self.chunk_lengths,
            row_tokens=self._row_tokens,
            state=self.state_of(method),
            memo=self._memo[1],
            engine=self,
        )

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
        if self._horizon:
            raise SqueezegenError("prefill after decoding has started is not supported: start a new Engine")
        self._check_tokens(input_ids, "input_ids", 2)
        if attention_mask is not None:
            self._check_mask(attention_mask, input_ids)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        start = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        if self.next_pos is not None:
            start = self.next_pos
        positions = (start[:, None] + valid.long().cumsum(-1) - 1).masked_fill(~valid, EMPTY)
        self.next_pos = start + valid.sum(-1)
        self.prompt_lengths = self.next_pos.clone()
        self.chunk_ids = input_ids  # the chunk being prefilled (after_prefill hooks read it)
        self.chunk_lengths = valid.sum(-1).tolist()
        self.prefill_memo = {}  # a new one: forks of the last prefill keep theirs
        self._row_tokens = list(self.chunk_lengths)
        self._padded = not bool(valid.all())
        self._compress = compress and bool(self.hooks)
        logits = self._forward(self.parts.embed(input_ids), positions, progress, all_logits)
        if logits is not None:
            if self._compress and "after_prefill" in self.hooks:
                self.method.after_prefill(self)
            if self._compress:
                self._split_uneven_heads()
            self.cache.note_peak()
            return logits
        # the method stopped this pass and chose a shorter prompt to prefill instead (GemFilter)
        if bool((start > 0).any()):
            raise SqueezegenError(
                f"{type(self.method).__name__} prefills a shortened prompt from scratch, so it can only compress "
                "the first prefill chunk"
            )
        keep, self._refill = self._refill, None
        self.cache = KVCache(len(self.parts.layers))
        self.next_pos = None
        ids = input_ids.gather(1, keep.clamp(min=0))
        kept_valid = valid.gather(1, keep.clamp(min=0)) & (keep >= 0)
        return self.prefill(ids, kept_valid.long(), False, progress, all_logits)

    def _forward(
        self, hidden: torch.Tensor, positions: torch.Tensor, progress: bool = False, all_logits: bool = False
    ) -> torch.Tensor | None:
        """Run every layer over a prefill chunk; None if the method asked for a refill."""
        parts = self.parts
        self.positions = positions
        self._masks.clear()
        self._memo = (-1, {})
        rope = parts.rope(hidden, positions.clamp(min=0))
        layers = tqdm(parts.layers, desc="prefill", unit="layer", leave=False) if progress else parts.layers
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
            if "refill" in self.hooks:
                self._refill = self.method.refill(self.view(i))
                if self._refill is not None:
                    if progress:
                        layers.close()
                    return None
            keep = self.method.propagate(self.view(i), hidden) if "propagate" in self.hooks else None
            if keep is not None:
                hidden = hidden.gather(1, keep.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1]))
                positions = positions.gather(1, keep.clamp(min=0)).masked_fill(keep < 0, EMPTY)
                self.positions = positions
                self._row_tokens = (positions >= 0).sum(-1).tolist()
                self._padded = bool((positions < 0).any())
                self._masks.clear()
                rope = parts.rope(hidden, positions.clamp(min=0))
        return parts.logits(hidden) if all_logits else parts.logits(hidden[:, -1:])[:, -1]

    def _split_uneven_heads(self) -> None:
        """Give each KV head its own buffer in layers where heads kept very different counts, so
        their padding is not held; not for methods that rewrite the cache while decoding."""
        if self.hooks & {"after_decode_attention", "after_decode_step"}:
            return
        for i, cache in enumerate(self.cache.layers):
            if isinstance(cache, LayerCache) and cache.keys is not None and padding_share(cache) > SPLIT_PADDING:
                self.cache.layers[i] = HeadSplitCache.of(cache)

    @torch.inference_mode()
    def probe(
        self, input_ids: torch.Tensor, row: int, observe: Callable[[LayerView, torch.Tensor, torch.Tensor], None]
    ):
        """Run tokens (1, L) after row `row`'s prefilled cache, leaving no trace: they attend over
        what the row holds and to each other (causally) at the positions that follow it, and
        `observe(view, query, key)` sees each layer's post-RoPE query (1, H, L, D) and their own
        keys (1, Hkv, L, D); nothing is stored. For scoring passes (KVzip's reconstruction)."""
        saved = self.positions, self._probe
        start = self.next_pos[row : row + 1]
        self.positions = start[:, None] + torch.arange(input_ids.shape[1], device=input_ids.device)
        self._probe = (row, observe)
        try:
            hidden = self.parts.embed(input_ids)
            rope = self.parts.rope(hidden, self.positions)
            for i, layer in enumerate(self.parts.layers):
                hidden = layer(
                    hidden,
                    attention_mask=None,
                    position_ids=self.positions,
                    position_embeddings=rope[self.parts.layer_types[i]],
                    sg_engine=self,
                )
        finally:
            self.positions, self._probe = saved

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run one new token per row (B,); returns the logits (B, V) for the token after it."""
        if self.next_pos is None:
            raise SqueezegenError("decode needs a prefill first: call engine.prefill(input_ids)")
        self._check_tokens(tokens, "tokens", 1)
        tokens = tokens.long()
        if not self._horizon:
            self.start_decoding()
        elif self.decode_steps >= self._horizon:
            self._grow()
        step = compiled_step if self.compile else decode_step
        logits = step(self, tokens, self.next_pos)
        self.next_pos = self.next_pos + 1
        if "after_decode_step" in self.hooks:
            self.method.after_decode_step(self, self.decode_steps)
            self.cache.note_peak()
        self.decode_steps += 1
        return logits

    def _check_tokens(self, ids: object, name: str, dims: int) -> None:
        """Refuse token ids the layers (and the C step, which trusts its shapes) cannot take:
        `dims` = 2 for a prefill chunk (B, L), 1 for a decode step (B,), one row per prefilled row."""
        shape = "(rows, length)" if dims == 2 else "(rows,), one token per row"
        if not isinstance(ids, torch.Tensor):
            raise SqueezegenError(f"{name} must be a torch tensor of token ids {shape}, got {type(ids).__name__}")
        if ids.dtype not in (torch.long, torch.int32):
            raise SqueezegenError(f"{name} must hold integer token ids (torch.long), got {ids.dtype}")
        if ids.dim() != dims or 0 in ids.shape:
            raise SqueezegenError(f"{name} must have the shape {shape}, got {tuple(ids.shape)}")
        device = next(self.model.parameters()).device
        if ids.device != device:
            raise SqueezegenError(
                f"{name} is on {ids.device} but the model is on {device}: move it with .to({str(device)!r})"
            )
        if self.next_pos is not None and ids.shape[0] != self.next_pos.shape[0]:
            rows = self.next_pos.shape[0]
            raise SqueezegenError(f"{name} has {ids.shape[0]} row(s) but the engine holds {rows}: pass {rows}")
        if ids.device.type == "cpu":  # a check on a GPU would wait for the device every step
            vocab = self.model.get_input_embeddings().num_embeddings
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocab:
                raise SqueezegenError(
                    f"{name} holds token id {low if low < 0 else high}: ids run from 0 to {vocab - 1}"
                )

    @staticmethod
    def _check_mask(mask: object, input_ids: torch.Tensor) -> None:
        if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape or mask.device != input_ids.device:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise SqueezegenError(
                f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)} on its device, got {got}"
            )

    def start_decoding(self) -> None:
        """Move every layer into its decode buffer, sized for `reserve` steps (at least one)."""
        self._horizon = max(1, self.reserve)
        self._start_live = [int(c.live().max()) if c.keys is not None else 0 for c in self.cache.layers]
        for i, cache in enumerate(self.cache.layers):
            if cache.keys is None:
                raise SqueezegenError("decode needs a prefill first: call engine.prefill(input_ids)")
            if isinstance(cache, HeadSplitCache):
                cache.to_static_room(self._horizon)
            else:
                cache.to_static(self._capacity(i, self._horizon))
        self.cache.note_peak()
        self.cache.decode_bytes = self.cache.nbytes()
        if self.fused_wanted:
            self.fused = FusedDecoder.of(self.model, self.parts)
        self._cover_positions()
        if "start_decode" in self.hooks:
            self.method.start_decode(self)

    def _capacity(self, layer: int, steps: int) -> int:
        live, cache = self._start_live[layer], self.cache.layers[layer]
        if cache.window is not None:
            return min(live + steps, cache.window)
        return max(live, self.method.decode_capacity(self.view(layer), live, steps))

    def _grow(self) -> None:
        """More decode steps than reserved: give every layer that needs it more empty slots at the
        end (slots keep their places, so per-slot method state stays valid)."""
        self._horizon *= 2
        for i, cache in enumerate(self.cache.layers):
            if isinstance(cache, HeadSplitCache):
                cache.to_static_room(self._horizon - self.decode_steps)
                continue
            extra = self._capacity(i, self._horizon) - cache.used
            if extra > 0:
                cache.grow(extra)
        self._cover_positions()
        self.cache.note_peak()

    def _cover_positions(self) -> None:
        """The fused step's RoPE table reaches every position the steps reserved may take."""
        if self.fused is not None:
            last = int(self.next_pos.max()) + self._horizon - self.decode_steps
            self.fused.rope.cover(last + 1, self.parts.norm.weight)  # in the model's dtype and device

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
        if self._probe is not None:
            return self._probe_attend(layer, query, key, value, scaling, window)
        if isinstance(cache, HeadSplitCache):
            return self._split_attend(cache, query, key, value, scaling)
        if cache.static:  # a decode step
            cache.write(key, value, self.positions[:, 0])
            out = decode_attention(query, cache.keys, cache.values, cache.pos >= 0, scaling)
            if "after_decode_attention" in self.hooks:
                self.method.after_decode_attention(self.view(layer), query)
            return out

        cache.window = window
        fresh = cache.used == 0
        cache.append(key, value, self.positions)
        keys, values, key_pos = cache.held()
        n = query.shape[2]
        if window is not None and fresh and not self._padded and n > 2 * window:
            # a long prompt in a sliding-window layer: attend band by band (methods leave these
            # layers alone, their attention is local by construction)
            out = banded_attention(query, keys, values, scaling, self.positions, window)
        else:
            causal = fresh and not self._padded and (window is None or n <= window)
            mask = None if causal else self._prefill_mask(key_pos, fresh, window)
            if "prefill_attention" in self.hooks:
                out = self.method.prefill_attention(self.view(layer), query, keys, values, mask, causal)
            else:
                out = dense_attention(query, keys, values, scaling, mask, causal)
        if self._compress and "select_cache" in self.hooks:
            keep = self.method.select_cache(self.view(layer), query, keys, values)
            if keep is not None:
                cache.keep(keep)
        if window is not None:
            cache.drop_out_of_view(self.next_pos)
        # a layer's whole K/V before its selection is a transient of the forward, like any
        # activation; the cache's peak is what layers hold between steps
        self.cache.note_peak()
        return out

    def _split_attend(self, cache: HeadSplitCache, query, key, value, scaling):
        """Attention head by head over a layer whose heads have buffers of their own."""
        groups = query.shape[1] // len(cache.heads)
        if cache.static:
            cache.write(key, value, self.positions[:, 0])
        else:
            cache.append(key, value, self.positions)
        outs = []
        for h, head in enumerate(cache.heads):
            q = query[:, h * groups : (h + 1) * groups]
            k, v, pos = head.held()
            if cache.static:
                outs.append(decode_attention(q, k, v, pos >= 0, scaling))
            else:
                outs.append(dense_attention(q, k, v, scaling, visibility_mask(self.positions, pos)))
        return torch.cat(outs, dim=1)

    def _probe_attend(self, layer, query, key, value, scaling, window):
        """A probe's attention over its row's entries and its own keys; the cache is left as it is."""
        row, observe = self._probe
        held_k, held_v, held_pos = (x[row : row + 1] for x in self.cache.layers[layer].held())
        keys, values = torch.cat([held_k, key], dim=2), torch.cat([held_v, value], dim=2)
        key_pos = torch.cat([held_pos, self.positions[:, None].expand(-1, key.shape[1], -1)], dim=2)
        if bool((held_pos == held_pos[:, :1]).all()):  # heads hold the same positions: one mask for all
            key_pos = key_pos[:, :1]
        out = dense_attention(query, keys, values, scaling, visibility_mask(self.positions, key_pos, window))
        observe(self.view(layer), query, key)
        return out

    def _prefill_mask(self, key_pos: torch.Tensor, fresh: bool, window: int | None) -> torch.Tensor:
        """Masks of fresh layers depend only on this chunk's positions: build once per forward."""
        if not fresh:
            return visibility_mask(self.positions, key_pos, window)
        if window not in self._masks:
            self._masks[window] = visibility_mask(self.positions, self.positions[:, None], window)
        return self._masks[window]

    # --- evaluations share one prefill among methods ----------------------------------------------
    def fork(self, method: Method, keep: dict[int, torch.Tensor | None]) -> Engine:
        """A twin of this engine after its prefill, as if `method` had run that prefill itself:
        each layer keeps the entries `keep[layer]` (None or absent = all), the method keeps the
        state it built here, and its `after_prefill` hook then runs on the twin. Valid for methods
        that only select during the prefill or only act after it (see evals/fanout.py)."""
        twin = Engine(
            self.model,
            method,
            reserve=self.reserve,
            compile=self.compile,
            tokenizer=self.tokenizer,
            fused=self.fused_wanted,
            native=self.native,
        )
        twin.states[id(method)] = self.state_of(method)
        twin.next_pos = self.next_pos.clone()
        twin.prompt_lengths = self.prompt_lengths.clone()
        twin.chunk_lengths = list(self.chunk_lengths)
        twin.chunk_ids = self.chunk_ids
        twin.prefill_memo = self.prefill_memo
        for layer, (src, dst) in enumerate(zip(self.cache.layers, twin.cache.layers, strict=True)):
            dst.window = src.window
            if src.keys is None:
                continue
            dst._set(*src.held())  # shared: prefill-phase buffers are never written in place
            if keep.get(layer) is not None:
                dst.keep(keep[layer])  # gathers into new buffers
        twin._compress = True
        if "after_prefill" in twin.hooks:
            twin.cache.note_peak()  # the full cache, held while the method scores it
            method.after_prefill(twin)
        twin._split_uneven_heads()
        twin.cache.note_peak()
        return twin
