"""vLLM's CPU attention backend with squeezegen's prefill-time selection for the requests that ask.

Rows without a method run vLLM's kernel untouched. A compressed request's prompt keys and values
(after RoPE) are also kept aside as its prompt chunks run, because the kernel's paged layout
depends on the CPU's ISA. The step that finishes the prompt runs the kernel as usual (the prompt
attends to itself in full), then each layer scores the prompt with the squeezegen method
(`compression.select`) and writes the K entries each KV head keeps, in position order, through
vLLM's own cache op at the start of the block holding slot `prompt - K` (`Layout`). Every head
keeps the same count, so one slot range serves all heads even when they keep different tokens.

From then on the request's rows stay in vLLM's one batched kernel call: for each layer, its row of
the metadata is rewritten so that the kernel reads its block table from that first kept block and
its sequence as K + the tokens generated, and each new token is written right after the kept
entries (r slots before vLLM's own slot for it, 0 <= r < block size). Keys keep their true
positions (RoPE is in them), so attention needs no positions of its own. Layers with the same
budgets share one rewritten metadata per step. The scheduler frees the blocks below the lowest
first kept block of any layer, and a rolling window's (StreamingLLM) blocks once it has left them,
which the rewritten block table then skips (`scheduler.py`, `compression.rolled_blocks`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from squeezegen.integrations.vllm.compression import layer_budgets, rolled_blocks, select
from squeezegen.integrations.vllm.worker import batch_requests, live_requests
from squeezegen.methods.selection import ScoredSelection


@dataclass
class SqueezeRow:
    """A row of the batch whose request asked for a method."""

    row: int
    req_id: str
    method: ScoredSelection
    prompt: int
    start: int  # position of the row's first token in this step
    end: int  # seq_len after this step
    budgets: list[int]  # entries each layer keeps of the prompt

    @property
    def compresses_now(self) -> bool:
        return self.start < self.prompt <= self.end

    def layout(self, layer: int, size: int) -> Layout:
        """Where the request's entries of `layer` sit after its prompt's compression, at this step."""
        kept = self.budgets[layer]
        return Layout.of(self.prompt, kept, size, rolled_blocks(self.method, self.prompt, kept, size, self.end))

    @property
    def compressed(self) -> bool:
        """Its prompt was compressed in an earlier step: every token of this step reads the kept entries."""
        return self.start >= self.prompt


@dataclass(frozen=True)
class Layout:
    """Where one layer of a compressed prompt sits in its request's blocks: its `kept` entries from
    the start of block `blocks`, and a token at position p >= prompt at slot p - `shift`, right
    after them (slots count from the request's first block, `size` to a block)."""

    blocks: int
    shift: int
    kept: int
    size: int
    dropped: int = 0  # blocks after the first kept one that a rolling window no longer reads

    @classmethod
    def of(cls, prompt: int, kept: int, size: int, dropped: int = 0) -> Layout:
        blocks, shift = divmod(prompt - kept, size)
        return cls(blocks, shift, kept, size, dropped)

    @property
    def first(self) -> int:
        """The slot of the first kept entry."""
        return self.blocks * self.size

    def seq_len(self, end: int) -> int:
        """What the kernel reads, from the first kept block, once the sequence holds `end` tokens."""
        return end - self.first - self.shift - self.dropped * self.size

    def table(self, own: torch.Tensor) -> torch.Tensor:
        """The request's block table as the kernel reads it: the first kept block, then the blocks
        after the dropped ones."""
        after = self.blocks + 1 + self.dropped
        return torch.cat([own[self.blocks : self.blocks + 1], own[after:], own[: after - 1]])  # the tail is never read

    def slots(self, own: torch.Tensor, logical: torch.Tensor) -> torch.Tensor:
        """Cache slots of the request's logical slots."""
        return own[logical // self.size].long() * self.size + logical % self.size


@dataclass
class SqueezeMetadata(CPUAttentionMetadata):
    squeeze: list[SqueezeRow] = field(default_factory=list)
    block_size: int = 0
    rewritten: dict[tuple, CPUAttentionMetadata] = field(default_factory=dict)  # per layer budgets, this step


class SqueezeMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> CPUAttentionMetadata:
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        requests = batch_requests(common_attn_metadata.num_reqs)
        if not requests or not any(method for _, _, method in requests):
            return meta
        starts = common_attn_metadata.query_start_loc_cpu.tolist()
        seq_lens = common_attn_metadata.seq_lens.tolist()
        layers = self.vllm_config.model_config.get_num_layers(self.vllm_config.parallel_config)
        rows = [
            SqueezeRow(
                i,
                req_id,
                method,
                prompt,
                seq_lens[i] - (starts[i + 1] - starts[i]),
                seq_lens[i],
                layer_budgets(method, prompt, layers),
            )
            for i, (req_id, prompt, method) in enumerate(requests)
            if method is not None
        ]
        fields_now = {f.name: getattr(meta, f.name) for f in fields(meta)}
        return SqueezeMetadata(**fields_now, squeeze=rows, block_size=self.block_size)


class SqueezeAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = get_current_vllm_config()
        self.num_layers = config.model_config.get_num_layers(config.parallel_config)
        self.dtype = config.model_config.dtype
        self.pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # prompt chunks not yet scored
        if self.is_fp8_kv_cache:
            raise ValueError("the squeezegen plugin packs the KV cache as stored: serve with --kv-cache-dtype auto")

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        meta = get_forward_context().attn_metadata
        meta = meta.get(layer.layer_name) if isinstance(meta, dict) else meta
        if isinstance(meta, SqueezeMetadata) and self.sliding_window == -1:
            slot_mapping = self._rewritten(meta, layer).slot_mapping
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        rows = getattr(attn_metadata, "squeeze", None)
        if not rows or self.sliding_window != -1:  # sliding-window layers already hold a bounded window
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        index = layer_index(layer)
        meta = self._rewritten(attn_metadata, layer)
        output = super().forward(layer, query, key, value, kv_cache, meta, output, *args, **kwargs)
        num_blocks, heads, size, _ = kv_cache.shape
        caches = kv_cache.view(num_blocks, heads, 2 * size, -1).chunk(2, dim=2)
        starts = attn_metadata.query_start_loc.tolist()
        for row in rows:
            if row.compressed:
                continue
            first, last = starts[row.row], starts[row.row + 1]
            in_prompt = min(row.end, row.prompt) - row.start
            prompt_part = slice(first, first + in_prompt)
            self.pending.setdefault(row.req_id, []).append((key[prompt_part].clone(), value[prompt_part].clone()))
            if not row.compresses_now:
                continue
            table = attn_metadata.block_table[row.row]
            place = row.layout(index, attn_metadata.block_size)
            self._compress(layer, row, index, query[prompt_part], caches, table, place)
            after = slice(first + in_prompt, last)  # past the prompt in this step: a preempted request's recompute
            if after.start < after.stop:
                self._recompute(layer, row, query[after], key[after], value[after], caches, table, place, output[after])
        if len(self.pending) > 2 * len(rows) + 64:  # forget finished requests
            live = live_requests()
            self.pending = {r: p for r, p in self.pending.items() if r in live}
        return output

    def _rewritten(self, meta: SqueezeMetadata, layer) -> CPUAttentionMetadata:
        """This step's metadata for `layer`: the rows of compressed requests read from their first
        kept block and write after their kept entries (shared by layers of equal budgets)."""
        moved = [row for row in meta.squeeze if row.compressed]
        if not moved:
            return meta
        index = layer_index(layer)
        size = meta.block_size
        places = [row.layout(index, size) for row in moved]
        key = tuple(places)
        if key in meta.rewritten:
            return meta.rewritten[key]
        seq_lens, table, slots = meta.seq_lens.clone(), meta.block_table.clone(), meta.slot_mapping.clone()
        starts = meta.query_start_loc.tolist()
        for row, place in zip(moved, places, strict=True):
            own, first, last = meta.block_table[row.row], starts[row.row], starts[row.row + 1]
            slots[first:last] = place.slots(own, torch.arange(row.end - (last - first), row.end) - place.shift)
            table[row.row] = place.table(own)
            seq_lens[row.row] = place.seq_len(row.end)
        schedule = self._schedule(layer, seq_lens, meta.query_start_loc, meta.causal, meta.dynamic_causal)
        rewritten = dataclasses.replace(
            meta, seq_lens=seq_lens, block_table=table, slot_mapping=slots, scheduler_metadata=schedule, rewritten={}
        )
        meta.rewritten[key] = rewritten
        return rewritten

    def _schedule(self, layer, seq_lens, query_start, causal=True, dynamic_causal=None) -> torch.Tensor:
        """vLLM's work split of its kernel for these sequence lengths."""
        return ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.shape[0],
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_size,
            seq_lens=seq_lens,
            dtype=self.dtype,
            query_start_loc=query_start,
            causal=causal,
            sliding_window_size=-1,
            isa=layer.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=dynamic_causal,
            kv_cache_dtype=self.kv_cache_dtype,
        )

    def _compress(self, layer, row, index, query, caches, table, place: Layout) -> None:
        """Score the prompt with the request's method; write each head's kept entries, in position
        order, where the layout puts them."""
        chunks = self.pending.pop(row.req_id)
        keys = torch.cat([k for k, _ in chunks]).transpose(0, 1)  # (Hkv, L, D)
        values = torch.cat([v for _, v in chunks]).transpose(0, 1)
        window = query[-max(row.method.window, 1) :].transpose(0, 1)  # (Hq, w, D)
        keep = select(row.method, index, self.num_layers, self.scale, window, keys, values)  # (Hkv, K)
        if keep.shape[1] != place.kept:
            raise RuntimeError(f"layer {index} kept {keep.shape[1]} entries where its budget is {place.kept}")
        gather = keep[..., None].expand(-1, -1, keys.shape[-1])
        kept_keys, kept_values = keys.gather(1, gather).transpose(0, 1), values.gather(1, gather).transpose(0, 1)
        self._store(layer, kept_keys, kept_values, caches, place.slots(table, place.first + torch.arange(place.kept)))

    def _store(self, layer, keys, values, caches, slots) -> None:
        """vLLM's cache op: entries (n, Hkv, D) into `slots`. The layer's `_k_scale_float` and
        `_v_scale_float` are what vLLM's `AttentionLayer` protocol gives every backend (its own CPU
        backend passes them the same way)."""
        ops.cpu_attn_reshape_and_cache(
            keys.contiguous(),
            values.contiguous(),
            *caches,
            slots,
            layer.isa,
            k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )

    def _recompute(self, layer, row, query, key, value, caches, table, place: Layout, out) -> None:
        """Tokens past the prompt in the step that compressed it (a preempted request computed
        again): stored after the kept entries and attending to them, as later steps will."""
        n = query.shape[0]
        self._store(layer, key, value, caches, place.slots(table, place.first + place.kept + torch.arange(n)))
        query_start = torch.tensor([0, n], dtype=torch.int32)
        seq_lens = torch.tensor([place.seq_len(row.end)], dtype=torch.int32)
        ops.cpu_attention_with_kv_cache(
            query=query,
            key_cache=caches[0],
            value_cache=caches[1],
            output=out,
            query_start_loc=query_start,
            seq_lens=seq_lens,
            scale=self.scale,
            causal=True,
            alibi_slopes=self.alibi_slopes,
            sliding_window=-1,
            block_table=place.table(table)[None],
            softcap=self.logits_soft_cap,
            scheduler_metadata=self._schedule(layer, seq_lens, query_start),
            s_aux=self.sinks,
            k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )


def layer_index(layer) -> int:
    """The decoder layer an attention layer belongs to (vLLM names it model.layers.N.self_attn.attn)."""
    return extract_layer_index(layer.layer_name)


class SqueezeAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[SqueezeAttentionImpl]:
        return SqueezeAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SqueezeMetadataBuilder]:
        return SqueezeMetadataBuilder
