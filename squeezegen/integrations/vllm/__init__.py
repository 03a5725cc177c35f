"""squeezegen's prefill-time KV compression inside vLLM (CPU backend), as a `vllm.general_plugins` plugin.

Pieces, each a public vLLM extension point:
- `register` (the entry point) puts `attention.SqueezeAttentionBackend` in place of vLLM's CPU
  attention backend; without the worker below it changes nothing. It also lets the OpenAI server
  take the body field `squeezegen` that `squeezegen serve` takes (see `_carry_body_field`).
- `worker.SqueezeWorker` (`--worker-cls`) lets the backend see which request each row is.
- `scheduler.SqueezeScheduler` (`--scheduler-cls`) returns the blocks a compressed prompt no longer
  needs to vLLM's block pool.
- `validate.SqueezeArgs` (`--logits-processors`) rejects a bad request field with HTTP 400.
`python -m squeezegen.integrations.vllm serve MODEL` is `vllm serve` with all four (docs/serving.md).
"""

from squeezegen.integrations.vllm.compression import FIELD


def register() -> None:
    """vLLM's general-plugin hook: runs in every vLLM process before any work (idempotent)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, "squeezegen.integrations.vllm.attention.SqueezeAttentionBackend")
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    except ImportError:  # a vLLM without the OpenAI server: vllm_xargs / extra_args only
        return
    for request_class in (ChatCompletionRequest, CompletionRequest):
        _carry_body_field(request_class)


def _carry_body_field(request_class: type) -> None:
    """vLLM's OpenAI requests keep unknown body fields (`extra="allow"`) but pass only `vllm_xargs`
    on to `SamplingParams.extra_args`; this wraps `to_sampling_params` so that a top-level
    `squeezegen` object reaches it too (the one patch the plugin makes to vLLM)."""
    original = request_class.to_sampling_params
    if getattr(original, "carries_squeezegen", False):
        return

    def to_sampling_params(self, *args, **kwargs):
        params = original(self, *args, **kwargs)
        field = (self.model_extra or {}).get(FIELD)
        if field is not None:
            params.extra_args = {**(params.extra_args or {}), FIELD: field}
        return params

    to_sampling_params.carries_squeezegen = True
    request_class.to_sampling_params = to_sampling_params
