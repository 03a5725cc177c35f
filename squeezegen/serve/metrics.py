"""Prometheus metrics under vLLM's names (`vllm:...`, labels model_name and engine) where they mean
the same, so dashboards and load tools written for vLLM read `squeezegen serve` unchanged; what
vLLM has no word for is `squeezegen:...`.

KV usage is the KV bytes the running requests and stored documents hold over `--cache-bytes`: there
is no fixed block pool here, so it can pass 1 while requests run beside a full document store.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """One server's metrics in a registry of its own. The scheduler thread reports tokens and finished
    requests; the gauges read the scheduler's state when scraped."""

    def __init__(self, model_name: str, running: Callable[[], int], waiting: Callable[[], int], kv_usage) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name, "engine": "0"}
        names = list(labels)

        def gauge(name: str, doc: str, read: Callable[[], float]) -> None:
            Gauge(name, doc, names, registry=self.registry).labels(**labels).set_function(read)

        gauge("vllm:num_requests_running", "Requests in the decode batch.", running)
        gauge("vllm:num_requests_waiting", "Requests admitted but not yet prefilled.", waiting)
        gauge("vllm:kv_cache_usage_perc", "KV bytes of running requests and documents / --cache-bytes.", kv_usage)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]):
            return Histogram(name, doc, names, buckets=buckets, registry=self.registry).labels(**labels)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between two tokens of a request.", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival to last token.", LATENCY_BUCKETS)
        prompt = Counter("vllm:prompt_tokens", "Prompt tokens prefilled.", names, registry=self.registry)
        generation = Counter("vllm:generation_tokens", "Tokens generated.", names, registry=self.registry)
        self.prompt_tokens = prompt.labels(**labels)
        self.generation_tokens = generation.labels(**labels)
        self._success = Counter(
            "vllm:request_success", "Requests finished.", [*names, "finished_reason"], registry=self.registry
        )
        self._labels = labels

    def token(self, since: float | None) -> float:
        """A token was emitted; `since` is the request's previous token time (None: its first). Returns now."""
        now = time.perf_counter()
        self.generation_tokens.inc()
        if since is not None:
            self.itl.observe(now - since)
        return now

    def finished(self, reason: str, prompt_tokens: int, first_token_s: float, started: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.ttft.observe(first_token_s)
        self.e2e.observe(time.perf_counter() - started)
        self._success.labels(**self._labels, finished_reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
