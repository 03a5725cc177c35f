"""vLLM's CPU attention backend with squeezegen's prefill-time selection for the requests that ask.

Rows without a method run vLLM's kernel untouched. A compressed request's prompt keys and values
(after RoPE) are also kept aside as its prompt chunks run, because the kernel's paged layout
depends on the CPU's ISA. The step that finishes the prompt runs the kernel as usual (the prompt
attends to itself in full), then each layer scores the prompt with the squeezegen method
(`compression.select`) and writes the entries each KV head keeps, in position order, into the
prompt's last slots [prompt - kept, prompt) through vLLM's own cache op. Every head keeps the
same count, so one slot range serves all heads even when they keep different tokens. Keys keep
their true positions (RoPE is in them) and new tokens go where vLLM puts them (slot = position),
so from then on the request's attention is vLLM's kernel with a sliding window that starts at the
first kept slot; the scheduler frees the blocks below the lowest such slot of any layer
(`scheduler.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from squeezegen.integrations.vllm.compression import select
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

    @property
    def compresses_now(self) -> bool:
        return self.start < self.prompt <= self.end


@dataclass
class SqueezeMetadata(CPUAttentionMetadata):
    squeeze: list[SqueezeRow] = field(default_factory=list)


class SqueezeMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> CPUAttentionMetadata:
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        requests = batch_requests(common_attn_metadata.num_reqs)
        if not requests or not any(method for _, _, method in requests):
            return meta
        starts = common_attn_metadata.query_start_loc_cpu.tolist()
        seq_lens = common_attn_metadata.seq_lens.tolist()
        rows = [
            SqueezeRow(i, req_id, method, prompt, seq_lens[i] - (starts[i + 1] - starts[i]), seq_lens[i])
            for i, (req_id, prompt, method) in enumerate(requests)
            if method is not None
        ]
        return SqueezeMetadata(**{f.name: getattr(meta, f.name) for f in fields(meta)}, squeeze=rows)


class SqueezeAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = get_current_vllm_config()
        self.num_layers = config.model_config.get_num_layers(config.parallel_config)
        self.dtype = config.model_config.dtype
        self.kept_from: dict[str, int] = {}  # request id -> first slot the request still reads in this layer
        self.pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # prompt chunks not yet scored
        if self.is_fp8_kv_cache:
            raise ValueError("the squeezegen plugin packs the KV cache as stored: serve with --kv-cache-dtype auto")

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        rows = getattr(attn_metadata, "squeeze", None)
        if not rows or self.sliding_window != -1:  # sliding-window layers already hold a bounded window
            return output
        num_blocks, heads, block_size, _ = kv_cache.shape
        caches = kv_cache.view(num_blocks, heads, 2 * block_size, -1).chunk(2, dim=2)
        starts = attn_metadata.query_start_loc.tolist()
        index = int(re.findall(r"\d+", layer.layer_name)[-1])
        for row in rows:
            first = starts[row.row]
            table = attn_metadata.block_table[row.row]
            if row.start < row.prompt:
                in_prompt = min(row.end, row.prompt) - row.start
                prompt_part = slice(first, first + in_prompt)
                self.pending.setdefault(row.req_id, []).append((key[prompt_part].clone(), value[prompt_part].clone()))
                if row.compresses_now:
                    self._compress(layer, row, index, query[prompt_part], caches, table, block_size)
                    first += in_prompt  # tokens past the prompt in this step (a preempted request's recompute)
                else:
                    continue
            if row.req_id in self.kept_from:
                for token in range(first, starts[row.row + 1]):  # one query at a time: each its own window
                    seq_len = row.end - (starts[row.row + 1] - 1 - token)
                    one = slice(token, token + 1)
                    self._attend(layer, row, query[one], seq_len, caches, table, output[one])
        if len(self.kept_from) + len(self.pending) > 4 * len(rows) + 256:  # forget finished requests
            live = live_requests()
            self.kept_from = {r: s for r, s in self.kept_from.items() if r in live}
            self.pending = {r: p for r, p in self.pending.items() if r in live}
        return output

    def _compress(self, layer, row, index, query, caches, table, block_size) -> None:
        """Score the prompt with the request's method; write each head's kept entries, in position
        order, into the prompt's last slots."""
        chunks = self.pending.pop(row.req_id)
        keys = torch.cat([k for k, _ in chunks]).transpose(0, 1)  # (Hkv, L, D)
        values = torch.cat([v for _, v in chunks]).transpose(0, 1)
        window = query[-max(row.method.window, 1) :].transpose(0, 1)  # (Hq, w, D)
        keep = select(row.method, index, self.num_layers, self.scale, window, keys, values)  # (Hkv, K)
        kept = keep.shape[1]
        gather = keep[..., None].expand(-1, -1, keys.shape[-1])
        dest = torch.arange(row.prompt - kept, row.prompt)
        slots = table[dest // block_size].long() * block_size + dest % block_size
        ops.cpu_attn_reshape_and_cache(
            keys.gather(1, gather).transpose(0, 1).contiguous(),
            values.gather(1, gather).transpose(0, 1).contiguous(),
            *caches,
            slots,
            layer.isa,
            k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        self.kept_from[row.req_id] = row.prompt - kept

    def _attend(self, layer, row, query, seq_len, caches, table, out) -> None:
        """vLLM's kernel for one query of the row, its window reaching back to the first kept slot."""
        window = seq_len - self.kept_from[row.req_id]
        query_start = torch.tensor([0, 1], dtype=torch.int32)
        seq_lens = torch.tensor([seq_len], dtype=torch.int32)
        metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=1,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_size,
            seq_lens=seq_lens,
            dtype=self.dtype,
            query_start_loc=query_start,
            causal=True,
            sliding_window_size=window,
            isa=layer.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            kv_cache_dtype=self.kv_cache_dtype,
        )
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
            sliding_window=window,
            block_table=table[None],
            softcap=self.logits_soft_cap,
            scheduler_metadata=metadata,
            s_aux=self.sinks,
            k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )


class SqueezeAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[SqueezeAttentionImpl]:
        return SqueezeAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SqueezeMetadataBuilder]:
        return SqueezeMetadataBuilder
