"""The scheduler side: a compressed request's leading prompt blocks go back to vLLM's block pool.

The attention backend packs each layer's K kept entries from the start of the block holding slot
`prompt - K`, so no layer reads the blocks wholly inside the first `prompt - max kept over layers`
slots. Once the prompt is processed, those blocks are freed and replaced by vLLM's null block, as
its sliding window and R-SWA managers free blocks out of view; a rolling window (StreamingLLM) also
frees, while decoding, the blocks after its first kept one that it has left
(`compression.rolled_blocks`). Both follow from the method, the prompt length and the tokens
processed alone, so the scheduler and the workers agree without talking.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from squeezegen.errors import SqueezegenError
from squeezegen.integrations.vllm.compression import freeable_tokens, layer_budgets, parse_request, rolled_blocks
from squeezegen.methods.selection import ScoredSelection


@dataclass(frozen=True)
class Gap:
    """What a compressed request's blocks no longer hold: its leading prompt blocks, and for a
    rolling window (StreamingLLM) the blocks after its first kept one that the window has left."""

    method: ScoredSelection
    prompt: int
    freeable: int  # leading prompt tokens no layer reads
    kept: int  # entries every layer keeps (a rolling window's budget is the same in every layer)


class PromptGapManager(FullAttentionManager):
    """Full attention whose compressed requests free their leading prompt blocks (and, rolling,
    the blocks their window has left)."""

    gaps: dict[str, Gap]

    def remove_skipped_blocks(self, request_id, processed_computed_tokens, num_prompt_tokens=None) -> None:
        super().remove_skipped_blocks(request_id, processed_computed_tokens, num_prompt_tokens)
        gap = self.gaps.get(request_id)
        if gap is None or processed_computed_tokens < gap.prompt:
            return
        self._remove_blocks_in_range(request_id, 0, gap.freeable // self.block_size)
        rolled = rolled_blocks(gap.method, gap.prompt, gap.kept, self.block_size, processed_computed_tokens)
        if rolled:
            first = (gap.prompt - gap.kept) // self.block_size + 1  # the block after the first kept one
            self._remove_blocks_in_range(request_id, first, first + rolled)


class SqueezeScheduler(AsyncScheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.cache_config.enable_prefix_caching:
            raise ValueError(
                "the squeezegen plugin rewrites a compressed prompt's blocks in place, which cached prefixes "
                "share: serve with --no-enable-prefix-caching"
            )
        self.num_layers = self.vllm_config.model_config.get_num_layers(self.vllm_config.parallel_config)
        self.gap_managers = []
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            if type(manager) is FullAttentionManager:  # sliding-window groups keep their own manager
                manager.__class__ = PromptGapManager
                manager.gaps = {}
                self.gap_managers.append(manager)

    def add_request(self, request) -> None:
        try:
            method = parse_request(request.sampling_params.extra_args if request.sampling_params else None)
        except SqueezegenError:
            method = None
        for manager in self.gap_managers:  # finished ones; a preempted request keeps its gap for its recompute
            for req_id in [r for r in manager.gaps if r not in self.requests]:
                del manager.gaps[req_id]
        if method is not None:
            prompt = request.num_prompt_tokens
            kept = max(layer_budgets(method, prompt, self.num_layers))
            gap = Gap(method, prompt, freeable_tokens(method, prompt, self.num_layers), kept)
            for manager in self.gap_managers:
                manager.gaps[request.request_id] = gap
        super().add_request(request)
