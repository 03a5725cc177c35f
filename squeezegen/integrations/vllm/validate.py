"""Request validation in vLLM's API server: a logits processor that only checks the squeezegen field.

vLLM runs every custom logits processor's `validate_params` when a request is admitted and answers
a ValueError with HTTP 400, so a bad method never reaches the engine core.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from squeezegen.errors import SqueezegenError
from squeezegen.integrations.vllm.compression import parse_request


class SqueezeArgs(LogitsProcessor):
    """Leaves logits alone; validates `extra_args["squeezegen"]`."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        try:
            parse_request(sampling_params.extra_args)
        except SqueezegenError as exc:
            raise ValueError(f"squeezegen field: {exc}") from None

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass
