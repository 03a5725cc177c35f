"""The CPU worker, telling the attention backend which request each row of a batch is."""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker

from squeezegen.errors import SqueezegenError
from squeezegen.integrations.vllm.compression import parse_request
from squeezegen.methods.selection import ScoredSelection

_RUNNER = None  # the model runner of this process (one per worker process)
_METHODS: dict[str, ScoredSelection | None] = {}


class SqueezeWorker(CPUWorker):
    def load_model(self, *args, **kwargs) -> None:
        global _RUNNER
        super().load_model(*args, **kwargs)
        _RUNNER = self.model_runner


def batch_requests(num_reqs: int) -> list[tuple[str, int, ScoredSelection | None]] | None:
    """(request id, prompt tokens, method) of each row of the batch being built; None without the
    worker (the backend then acts as vLLM's own)."""
    if _RUNNER is None:
        return None
    requests = _RUNNER.requests
    if len(_METHODS) > 2 * len(requests) + 64:  # forget finished requests
        for req_id in set(_METHODS) - set(requests):
            del _METHODS[req_id]
    rows = []
    for req_id in _RUNNER.input_batch.req_ids[:num_reqs]:
        state = requests[req_id]
        if req_id not in _METHODS:
            try:
                _METHODS[req_id] = parse_request(state.sampling_params.extra_args if state.sampling_params else None)
            except SqueezegenError:  # validated in the API server; a direct engine user gets the full cache
                _METHODS[req_id] = None
        rows.append((req_id, state.num_prompt_tokens, _METHODS[req_id]))
    return rows


def live_requests() -> set[str]:
    """Ids of the requests this worker still holds (finished ones are gone)."""
    return set(_RUNNER.requests) if _RUNNER is not None else set()
