"""The server's one owner of the model: a thread that admits requests, prefills them one by one,
and decodes every running request a step at a time, in one shared batch.

Rows of a batch are independent, so a row joins at a step boundary and leaves as soon as it is
done, whatever its method: one that only shapes the prompt's cache (full, SnapKV, PyramidKV,
FastKV, GemFilter, TSA, KVzip, questions on stored documents) or one that rewrites the cache while
decoding (H2O, TOVA, StreamingLLM, RPC), whose state and step count stay the request's own
(runtime/batching.py), each request at its own budget.

A prompt the method does not compress (the full cache, or a method that acts only while
decoding) is prefilled in chunks of `prefill_tokens` between decode steps while other requests
decode, so a long prompt arriving delays their next token by one chunk's prefill, not by its
whole prefill. A prompt that is compressed, or that arrives when nothing decodes, is prefilled
in one call. On a CPU a prefill is bound by arithmetic, so smaller chunks shorten the streams'
pauses and cost prefill throughput: with 32-token chunks the prefill-heavy load of
benchmarks/serve_vs_vllm.py lost more than half its tokens/s, so the server's default is 1024.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from squeezegen.errors import SqueezegenError
from squeezegen.runtime.batching import stack, take
from squeezegen.runtime.engine import Engine
from squeezegen.runtime.generate import prefill_rows
from squeezegen.runtime.hooks import PREFILL_HOOKS, Method
from squeezegen.runtime.rows import Row, choose, read
from squeezegen.runtime.sampling import LogitRules, Sampler
from squeezegen.runtime.text import RowText


class QueueFull(SqueezegenError):
    """More requests are waiting than the server takes (answered 429)."""


@dataclass
class Document:
    """A prefilled, compressed context that answers many questions."""

    id: str
    engine: Engine  # after the document's prefill (its compression done), before any question
    tokens: int
    method: str
    nbytes: int
    format: str  # "chat": questions come as chat messages; "plain": as completion prompts
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Summary:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length" (OpenAI's words: EOS and stop strings are both "stop")
    kv_bytes: int
    first_token_s: float


@dataclass(frozen=True)
class Token:
    """A piece of the answer's text."""

    piece: str


@dataclass(frozen=True)
class Done:
    """The job ended: the completion's summary, or the document it stored."""

    result: Summary | Document


@dataclass(frozen=True)
class Failed:
    """The job could not finish: the HTTP status to answer and what to tell the client."""

    status: int
    message: str


Event = Token | Done | Failed
Emit = Callable[[Event], None]


@dataclass
class Job:
    """One request: what to prefill, how to decode it, where its events go."""

    chunks: list[list[int]]  # [prompt] or [context, question]; the first chunk is compressed
    method: Method
    max_tokens: int
    sampler: Sampler
    stops: list[str]
    eos: set[int]
    emit: Emit
    rules: LogitRules = field(default_factory=LogitRules)  # vLLM's min_tokens and repetition_penalty
    document: Document | None = None  # a question on a stored document (chunks = [question])
    store: str | None = None  # the format of a document to store rather than answer
    label: str = ""  # the method's name as the request gave it (what a stored document reports)
    cancelled: bool = False
    started: float = field(default_factory=time.perf_counter)
    row: Row | None = None  # its decoding state, from its first token on
    last_token_at: float | None = None  # perf_counter of the previous token (inter-token latency)
    token: int = 0
    prompt_tokens: int = 0
    engine: Engine | None = None  # while its prompt is prefilled in chunks
    fed: int = 0  # prompt tokens prefilled so far (chunked)
    kv_bytes: int = 0
    first_token_s: float = 0.0


class DocumentStore:
    """Compressed documents in least-recently-used order under a byte budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.items: collections.OrderedDict[str, Document] = collections.OrderedDict()
        self.lock = threading.Lock()

    def add(self, doc: Document) -> None:
        if doc.nbytes > self.budget:
            raise SqueezegenError(
                f"the document's compressed cache holds {doc.nbytes} bytes, more than --cache-bytes {self.budget}: "
                "compress it harder (a smaller budget) or start the server with a larger --cache-bytes"
            )
        with self.lock:
            self.items[doc.id] = doc
            while sum(d.nbytes for d in self.items.values()) > self.budget:
                self.items.popitem(last=False)

    def get(self, doc_id: str) -> Document | None:
        with self.lock:
            doc = self.items.get(doc_id)
            if doc is not None:
                self.items.move_to_end(doc_id)
            return doc

    def delete(self, doc_id: str) -> bool:
        with self.lock:
            return self.items.pop(doc_id, None) is not None

    def nbytes(self) -> int:
        with self.lock:
            return sum(d.nbytes for d in self.items.values())


class Scheduler(threading.Thread):
    """Admits, prefills and steps requests until stopped; `submit` is safe from any thread."""

    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int,
        max_queue: int,
        documents: DocumentStore,
        metrics=None,
        prefill_tokens: int = 1024,
    ) -> None:
        super().__init__(name="squeezegen-scheduler", daemon=True)
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_tokens = prefill_tokens  # the most prompt tokens between two decode steps
        self.prefilling: Job | None = None  # the request whose prompt goes in chunks
        self.documents = documents
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.waiting: collections.deque[Job] = collections.deque()
        self.batch: Engine | None = None  # the shared decode batch
        self.batch_jobs: list[Job] = []
        self.wake = threading.Condition()
        self.stopping = False
        self.steps = 0
        self.metrics = metrics  # a ServerMetrics (serve/metrics.py), told of every token and finished request

    # --- called from the web side -----------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already (--max-queue): retry later")
            self.waiting.append(job)
            self.wake.notify()

    def stop(self) -> None:
        """Finish nothing more: running requests end with an error event, the thread exits."""
        with self.wake:
            self.stopping = True
            self.wake.notify()

    def running(self) -> int:
        return self.decoding() + (self.prefilling is not None)

    def decoding(self) -> int:
        return len(self.batch_jobs)

    def queued(self) -> int:
        return len(self.waiting)

    def kv_bytes(self) -> int:
        """KV bytes the running requests hold now (read from another thread: a snapshot of references)."""
        batch = self.batch
        return batch.cache.nbytes() if batch is not None else 0

    # --- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.wake:
                    while not self.stopping and not self.waiting and not self.running():
                        self.wake.wait()
                    if self.stopping:
                        break
                    free = self.prefilling is None and self.running() < self.max_batch
                    job = self.waiting.popleft() if self.waiting and free else None
                if job is not None:
                    self._admit(job)
                if self.prefilling is not None:
                    self._prefill_chunk()
                self._step()
        prefilling = [self.prefilling] if self.prefilling is not None else []
        for job in [*self.waiting, *prefilling, *self.batch_jobs]:
            job.emit(Failed(503, "the server is shutting down: retry on another server"))

    @staticmethod
    def _failed(job: Job, exc: Exception) -> None:
        """One failing request fails alone: a bad input is 400, a bug 500, and the server goes on."""
        if isinstance(exc, SqueezegenError):
            job.emit(Failed(400, str(exc)))
        else:
            job.emit(Failed(500, f"internal error: {type(exc).__name__}: {exc}"))

    def _admit(self, job: Job) -> None:
        """Prefill a new request and choose its first token, or start its chunked prefill."""
        if job.cancelled:
            return
        try:
            if job.store is not None:
                self._store(job)
                return
            if job.document is None and not job.method.hooks() & PREFILL_HOOKS:
                job.engine = Engine(self.model, job.method, reserve=job.max_tokens - 1, tokenizer=self.tokenizer)
                self.prefilling = job
                return
            engine = self._prefill(job)
        except Exception as exc:  # noqa: BLE001 - a bug in one request must not stop the server
            self._failed(job, exc)
            return
        self._start(job, engine)

    def _prefill_chunk(self) -> None:
        """The next chunk of the chunked prompt while others decode, or all the rest when none does."""
        job = self.prefilling
        ids = [t for chunk in job.chunks for t in chunk]  # nothing is compressed: the chunks are one text
        size = min(self.prefill_tokens if self.decoding() else len(ids), len(ids) - job.fed)
        try:
            if job.cancelled:
                self.prefilling = None
                return
            logits = job.engine.prefill(torch.tensor([ids[job.fed : job.fed + size]]), compress=False)
            job.fed += size
            if job.fed < len(ids):
                return
            self.prefilling, engine, job.engine = None, job.engine, None
            self._first_token(job, engine, logits)
        except Exception as exc:  # noqa: BLE001
            self.prefilling = None
            self._failed(job, exc)
            return
        self._start(job, engine)

    def _start(self, job: Job, engine: Engine) -> None:
        """A prefilled request: finished already, or into the shared batch."""
        if job.row.finish:
            job.kv_bytes = engine.cache.peak_bytes
            self._finish(job)
            return
        engine.start_decoding()
        job.kv_bytes = engine.cache.peak_bytes  # what the request holds alone (prefill, then its buffers)
        self.batch = engine if self.batch is None else stack([self.batch, engine])
        self.batch_jobs.append(job)

    def _prefill(self, job: Job) -> Engine:
        reserve = job.max_tokens - 1
        if job.document is not None:
            engine = job.document.engine.fork(Method(), {})
            engine.reserve = reserve
            logits = engine.prefill(torch.tensor([job.chunks[0]]), compress=False)
        else:
            engine = Engine(self.model, job.method, reserve=reserve, tokenizer=self.tokenizer)
            logits = prefill_rows(engine, [job.chunks], self.pad_id)
        self._first_token(job, engine, logits)
        return engine

    def _first_token(self, job: Job, engine: Engine, logits: torch.Tensor) -> None:
        """The prompt's logits (1, V) given: the request's text, its first token and its TTFT."""
        job.prompt_tokens = int(engine.prompt_lengths[0])
        text = RowText(self.tokenizer, job.eos, job.stops, job.rules.min_tokens)
        job.row = Row(text, job.max_tokens, job.sampler, job.rules)
        if job.rules.repetition_penalty != 1.0:  # a stored document's own tokens are not kept: its question's are
            job.row.seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
            job.row.seen[[t for chunk in job.chunks for t in chunk]] = True
        job.token = int(choose([job.row], logits)[0])
        self._read([job], [job.token])
        job.first_token_s = time.perf_counter() - job.started

    def _store(self, job: Job) -> None:
        engine = Engine(self.model, job.method, tokenizer=self.tokenizer)
        engine.prefill(torch.tensor([job.chunks[0]]))
        doc = Document(
            id=f"doc-{uuid.uuid4().hex[:24]}",
            engine=engine,
            tokens=len(job.chunks[0]),
            method=job.label or type(job.method).__name__,
            nbytes=engine.cache.nbytes(),
            format=job.store,
        )
        self.documents.add(doc)
        job.emit(Done(doc))

    def _read(self, jobs: list[Job], tokens: list[int]) -> None:
        """Read each job's chosen token into its text, streaming the pieces."""
        read([job.row for job in jobs], [[t] for t in tokens], lambda i, piece: jobs[i].emit(Token(piece)))
        if self.metrics is not None:
            for job in jobs:
                job.last_token_at = self.metrics.token(job.last_token_at)

    def _finish(self, job: Job) -> None:
        reason = "length" if job.row.finish == "length" else "stop"
        if self.metrics is not None:
            self.metrics.finished(reason, job.prompt_tokens, job.first_token_s, job.started)
        job.emit(Done(Summary(job.prompt_tokens, len(job.row.ids), reason, job.kv_bytes, job.first_token_s)))

    def _step(self) -> None:
        """One decode step of the shared batch; a step that fails ends the requests it was running
        (with an error) and the server goes on."""
        self.steps += 1
        try:
            self._step_batch()
        except Exception as exc:  # noqa: BLE001
            for job in self.batch_jobs:
                job.emit(Failed(500, f"internal error while decoding: {type(exc).__name__}: {exc}"))
            self.batch, self.batch_jobs = None, []

    def _step_batch(self) -> None:
        if self.batch is None:
            return
        logits = self.batch.decode(torch.tensor([j.token for j in self.batch_jobs]))
        live = [row for row, job in enumerate(self.batch_jobs) if not job.cancelled]  # a gone client's slot frees now
        jobs = [self.batch_jobs[row] for row in live]
        if len(live) < len(self.batch_jobs):
            logits = logits[live]
        tokens = choose([job.row for job in jobs], logits).tolist() if jobs else []
        for job, token in zip(jobs, tokens, strict=True):
            job.token = token
        self._read(jobs, tokens)
        keep = []
        for row, job in zip(live, jobs, strict=True):
            if job.row.finish:
                self._finish(job)
            else:
                keep.append(row)
        if len(keep) < len(self.batch_jobs):
            self.batch_jobs = [self.batch_jobs[r] for r in keep]
            self.batch = take(self.batch, keep)
