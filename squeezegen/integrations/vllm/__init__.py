"""squeezegen's prefill-time KV compression inside vLLM (CPU backend), as a `vllm.general_plugins` plugin.

Pieces, each a public vLLM extension point:
- `register` (the entry point) puts `attention.SqueezeAttentionBackend` in place of vLLM's CPU
  attention backend; without the worker below it changes nothing.
- `worker.SqueezeWorker` (`--worker-cls`) lets the backend see which request each row is.
- `scheduler.SqueezeScheduler` (`--scheduler-cls`) returns the blocks a compressed prompt no longer
  needs to vLLM's block pool.
- `validate.SqueezeArgs` (`--logits-processors`) rejects a bad request field with HTTP 400.
`python -m squeezegen.integrations.vllm serve MODEL` is `vllm serve` with all four (docs/serving.md).
"""


def register() -> None:
    """vLLM's general-plugin hook: runs in every vLLM process before any work (idempotent)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, "squeezegen.integrations.vllm.attention.SqueezeAttentionBackend")
