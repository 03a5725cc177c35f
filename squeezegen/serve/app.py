"""`squeezegen serve`: the OpenAI-compatible HTTP server (FastAPI, server-sent events) in front of
the scheduler thread that owns the model."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import signal
import socket
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from squeezegen.errors import SqueezegenError
from squeezegen.runtime.generate import eos_ids
from squeezegen.runtime.hooks import Method
from squeezegen.serve import protocol
from squeezegen.serve.metrics import CONTENT_TYPE, ServerMetrics
from squeezegen.serve.protocol import ApiError
from squeezegen.serve.scheduler import (
    Document,
    DocumentStore,
    Done,
    Event,
    Failed,
    Job,
    QueueFull,
    Scheduler,
    Summary,
    Token,
)

PLACEHOLDER = "\x00question\x00"
ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/documents", "/health", "/metrics")
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away (nobody receives it)


@dataclass
class ServerConfig:
    model_name: str
    method: Method  # for requests that name none
    method_label: str
    document_method: Method  # documents are compressed once, for questions they never saw
    document_label: str
    max_batch: int = 8
    max_queue: int = 64
    cache_bytes: int = 2**30
    max_tokens: int = 256  # when a request gives none
    prefill_tokens: int = 1024  # an uncompressed prompt's chunk between decode steps (scheduler.py)


class Server:
    """The app's state: the model's tokenizer and limits, the scheduler, the documents."""

    def __init__(self, model, tokenizer, config: ServerConfig) -> None:
        self.tokenizer, self.config = tokenizer, config
        self.limit = model.config.max_position_embeddings
        self.eos = eos_ids(model, tokenizer)
        self.vocab = model.get_input_embeddings().num_embeddings
        self.documents = DocumentStore(config.cache_bytes)
        self.scheduler = Scheduler(
            model, tokenizer, config.max_batch, config.max_queue, self.documents, prefill_tokens=config.prefill_tokens
        )
        self.metrics = ServerMetrics(
            config.model_name,
            running=self.scheduler.running,
            waiting=self.scheduler.queued,
            kv_usage=lambda: (self.scheduler.kv_bytes() + self.documents.nbytes()) / config.cache_bytes,
        )
        self.scheduler.metrics = self.metrics
        template = getattr(tokenizer, "chat_template", None)
        self.chat_suffix = None
        if template:
            text = self.template([{"role": "user", "content": PLACEHOLDER}])
            self.chat_suffix = text.split(PLACEHOLDER, 1)[1]

    def template(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special).input_ids

    # --- requests to jobs -------------------------------------------------------------------------
    def check_served_model(self, body: dict) -> None:
        model = body.get("model")
        if model is None:
            raise ApiError(400, f"model is required: this server serves {self.config.model_name!r}", param="model")
        if not isinstance(model, str):
            raise ApiError(400, f"model is a name: this server serves {self.config.model_name!r}", param="model")
        if model != self.config.model_name:
            raise ApiError(
                404,
                f"model {model!r} is not served here: this server serves {self.config.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def job(self, body: dict, chat: bool) -> tuple[Job, protocol.Decoding, asyncio.Queue, str]:
        protocol.check_keys(body, protocol.CHAT if chat else protocol.COMPLETION)
        self.check_served_model(body)
        decoding = protocol.decoding(body, self.config.max_tokens)
        ext = protocol.extension(body)
        document = None
        if ext.document is not None:
            document = self.documents.get(ext.document)
            if document is None:
                raise ApiError(
                    404,
                    f"document {ext.document!r} is not stored (never made, deleted, or evicted to keep --cache-bytes): "
                    "POST it to /v1/documents again",
                    param="squeezegen",
                    code="document_not_found",
                )
        chunks = self.prompt_chunks(body, chat, document)
        total = sum(map(len, chunks)) + (document.tokens if document else 0)
        if total + decoding.max_tokens > self.limit:
            raise ApiError(
                400,
                f"the prompt holds {total} tokens and max_tokens is {decoding.max_tokens}: more than the model's "
                f"{self.limit}-token context; shorten the prompt or lower max_tokens",
                param="max_tokens" if decoding.max_tokens >= self.limit else ("messages" if chat else "prompt"),
                code="context_length_exceeded",
            )
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        job = Job(
            chunks=chunks,
            method=ext.method or self.config.method,
            max_tokens=decoding.max_tokens,
            sampler=decoding.sampler,
            stops=decoding.stops,
            eos=self.stop_ids(decoding),
            emit=emit,
            rules=decoding.rules,
            document=document,
        )
        label = ext.label or (document.method if document else self.config.method_label)
        return job, decoding, queue, label

    def stop_ids(self, decoding: protocol.Decoding) -> set[int]:
        """The tokens that end a request: the model's EOS (unless vLLM's ignore_eos) and its stop_token_ids."""
        for token in decoding.stop_token_ids:
            if token >= self.vocab:
                raise ApiError(
                    400,
                    f"stop_token_ids: {token} is not a token of this model's {self.vocab}",
                    "invalid_request_error",
                    "stop_token_ids",
                )
        return (set() if decoding.ignore_eos else set(self.eos)) | set(decoding.stop_token_ids)

    def prompt_chunks(self, body: dict, chat: bool, document: Document | None) -> list[list[int]]:
        """Token ids as `sg.generate` makes them: the chat template around the messages, or the prompt."""
        if chat:
            messages = protocol.chat_text(self.tokenizer, body.get("messages"))
            if self.chat_suffix is None:
                raise ApiError(400, "this model has no chat template: use /v1/completions")
            if document is None:
                return [self.encode(self.template(messages))]
            if document.format != "chat":
                raise ApiError(400, "this document was stored as plain text: ask it on /v1/completions")
            if len(messages) != 1 or messages[0]["role"] != "user":
                raise ApiError(400, "a question on a chat document is one user message", param="messages")
            return [self.encode(messages[0]["content"] + self.chat_suffix)]
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ApiError(400, "prompt must be a non-empty string", param="prompt")
        if document is None:
            return [self.encode(prompt, special=True)]
        if document.format != "plain":
            raise ApiError(400, "this document was stored for chat: ask it on /v1/chat/completions")
        return [self.encode("\n\n" + prompt)]

    def document_job(self, body: dict) -> tuple[Job, asyncio.Queue]:
        protocol.check_keys(body, {"model", "text", "format", "squeezegen"})
        self.check_served_model(body)
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, "text must be a non-empty string: the document to store", param="text")
        fmt = body.get("format", "chat")
        if fmt not in ("chat", "plain"):
            raise ApiError(400, "format is chat (questions on /v1/chat/completions) or plain", param="format")
        ext = protocol.extension(body)
        if ext.document is not None:
            raise ApiError(
                400,
                "squeezegen.document names a stored document to ask (on the completion routes); a new document "
                "is made from text: drop it",
                param="squeezegen",
            )
        if fmt == "chat":
            if self.chat_suffix is None:
                raise ApiError(400, "this model has no chat template: store the document with format plain")
            full = self.template([{"role": "user", "content": f"{text}\n\n{PLACEHOLDER}"}])
            ids = self.encode(full[: full.index(PLACEHOLDER)])
        else:
            ids = self.encode(text, special=True)
        if len(ids) + 16 > self.limit:
            raise ApiError(
                400,
                f"the document holds {len(ids)} tokens: more than the model's {self.limit}",
                param="text",
                code="context_length_exceeded",
            )
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Job(
            chunks=[ids],
            method=ext.method or self.config.document_method,
            max_tokens=1,
            sampler=None,
            stops=[],
            eos=set(),
            emit=lambda event: loop.call_soon_threadsafe(queue.put_nowait, event),
            store=fmt,
            label=ext.label or self.config.document_label,
        )
        return job, queue


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def create_app(server: Server) -> FastAPI:
    """The OpenAI-compatible app of a `Server`: its scheduler runs for the app's lifetime."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.scheduler.start()
        yield
        server.scheduler.stop()  # after uvicorn let in-flight responses finish (or cut them)
        await asyncio.get_running_loop().run_in_executor(None, server.scheduler.join, 30)

    # no redirect of /v1/completions/ to /v1/completions: a 307 a client follows with a GET is no answer
    app = FastAPI(title="squeezegen", docs_url=None, redoc_url=None, lifespan=lifespan, redirect_slashes=False)
    add_error_handlers(app)
    add_model_routes(app, server)
    add_completion_routes(app, server)
    add_document_routes(app, server)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, unknown routes and verbs, and bugs (500)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def route_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.url.path}: this server answers {', '.join(ROUTES)}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        response = error_response(
            ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)
        )
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))


def add_model_routes(app: FastAPI, server: Server) -> None:
    """/health, /metrics (Prometheus text under vLLM's names, serve/metrics.py) and /v1/models."""

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "running": server.scheduler.running(), "waiting": len(server.scheduler.waiting)}

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text, under vLLM's metric names (serve/metrics.py)."""
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": server.config.model_name, "object": "model", "created": 0, "owned_by": "squeezegen"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        server.check_served_model({"model": model})
        return model_card()


def add_completion_routes(app: FastAPI, server: Server) -> None:
    """/v1/chat/completions and /v1/completions, whole or streamed."""

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await complete(server, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(server, request, chat=False)


def submit(server: Server, job: Job) -> None:
    try:
        server.scheduler.submit(job)
    except QueueFull as exc:
        raise ApiError(429, str(exc), type="rate_limit_error", code="queue_full") from None


async def complete(server: Server, request: Request, chat: bool):
    """One completion request: the whole answer, or a stream of chunks."""
    job, decoding, queue, label = server.job(await json_body(request), chat)
    submit(server, job)
    kind = "chat.completion" if chat else "text_completion"
    ident = protocol.completion_id("chatcmpl" if chat else "cmpl")
    meta = {"id": ident, "created": protocol.now(), "model": server.config.model_name}
    if decoding.stream:
        chunks = stream(job, queue, chat, kind, meta, decoding.include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream")
    text, summary = [], None
    async with contextlib.aclosing(events(queue, request, job)) as answers:
        async for got in answers:
            if got is None:  # the client went away: nobody reads the answer
                return Response(status_code=CLIENT_CLOSED)
            if isinstance(got, Token):
                text.append(got.piece)
            elif isinstance(got, Done):
                summary = got.result
                break
            else:
                raise failure(got)
    body = "".join(text)
    choice = {"index": 0, "finish_reason": protocol.FINISH[summary.finish_reason]}
    choice.update({"message": {"role": "assistant", "content": body}} if chat else {"text": body, "logprobs": None})
    return {
        **meta,
        "object": kind,
        "choices": [choice],
        "usage": protocol.usage(summary),
        "squeezegen": {"method": label, "first_token_s": summary.first_token_s},
    }


async def stream(job: Job, queue, chat: bool, kind: str, meta: dict, include_usage: bool) -> AsyncIterator[str]:
    """The answer as server-sent events, ending with [DONE]."""

    def chunk(delta: dict | str | None, finish: str | None = None) -> str:
        if chat:
            choice = {"index": 0, "delta": delta or {}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return "data: " + json.dumps({**meta, "object": f"{kind}.chunk", "choices": [choice]}) + "\n\n"

    try:
        opening = chat  # the role chunk goes out with the first token, as vLLM's does: a client that
        while True:  # times the first chunk (vllm bench serve) then measures the time to first token
            event = await queue.get()
            if opening:
                opening = False
                yield chunk({"role": "assistant", "content": ""})
            if isinstance(event, Token):
                yield chunk({"content": event.piece} if chat else event.piece)
            elif isinstance(event, Done):
                summary: Summary = event.result
                yield chunk(None, protocol.FINISH[summary.finish_reason])
                if include_usage:
                    record = {**meta, "object": f"{kind}.chunk", "choices": [], "usage": protocol.usage(summary)}
                    yield "data: " + json.dumps(record) + "\n\n"
                break
            else:
                yield "data: " + json.dumps(failure(event).body()) + "\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:  # also when the client goes away mid-stream: its slot frees at the next step
        job.cancelled = True


def add_document_routes(app: FastAPI, server: Server) -> None:
    """/v1/documents: store a compressed context, read what is stored, delete it."""

    @app.post("/v1/documents")
    async def create_document(request: Request):
        job, queue = server.document_job(await json_body(request))
        submit(server, job)
        async with contextlib.aclosing(events(queue, request, job)) as answers:
            got = await anext(answers)
        if got is None:
            return Response(status_code=CLIENT_CLOSED)
        if not isinstance(got, Done):
            raise failure(got)
        return document_info(got.result)

    @app.get("/v1/documents/{doc_id}")
    async def get_document(doc_id: str):
        doc = server.documents.get(doc_id)
        if doc is None:
            raise ApiError(404, f"document {doc_id!r} is not stored", code="document_not_found")
        return document_info(doc)

    @app.delete("/v1/documents/{doc_id}")
    async def delete_document(doc_id: str):
        if not server.documents.delete(doc_id):
            raise ApiError(404, f"document {doc_id!r} is not stored", code="document_not_found")
        return {"id": doc_id, "object": "document", "deleted": True}


def document_info(doc: Document) -> dict:
    return {
        "id": doc.id,
        "object": "document",
        "created": doc.created,
        "tokens": doc.tokens,
        "kv_bytes": doc.nbytes,
        "method": doc.method,
        "format": doc.format,
    }


async def events(queue: asyncio.Queue, request: Request, job: Job) -> AsyncIterator[Event | None]:
    """The job's events as they come, then None (and the job cancelled, so that its slot frees at
    the next step) if the client closes its connection: a plain response is written only at its
    end, so nothing else would notice that nobody waits for it."""
    gone = asyncio.ensure_future(disconnected(request))
    try:
        while True:
            get = asyncio.ensure_future(queue.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                job.cancelled = True
                yield None
                return
            yield get.result()
    except asyncio.CancelledError:  # the server cut the request (a shutdown past its grace)
        job.cancelled = True
        raise
    finally:
        gone.cancel()


async def disconnected(request: Request) -> None:
    """Returns once the client has disconnected (the request's body already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def failure(event: Failed) -> ApiError:
    """A request the scheduler could not finish: what it said, with its status."""
    kind = "invalid_request_error" if event.status < 500 else "server_error"
    return ApiError(event.status, event.message, type=kind)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), made before the model loads so that a bad --host or a
    port in use is said at once (and the port is held until the server takes it)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise SqueezegenError(f"--port {port} is not a port: use a number from 1 to 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise SqueezegenError(f"--host {host!r} is not an address of this machine ({exc}): try 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise SqueezegenError(
                f"port {port} on {host} is in use: choose another --port, or stop what holds it"
            ) from None
        raise SqueezegenError(
            f"cannot listen on {host}:{port} ({exc.strerror}): choose another --host or --port"
        ) from None
    return sock


class GracefulServer(uvicorn.Server):
    """uvicorn that, at the first SIGINT or SIGTERM, gives in-flight requests `grace_s` seconds and
    then ends them itself (the scheduler stops: a plain request is answered 503 in OpenAI's shape,
    a stream gets that error as its last event and [DONE]), rather than have uvicorn cancel them
    into a bare 500 or a cut stream; uvicorn's own cut stays as a backstop a few seconds later."""

    BACKSTOP_S = 5.0

    def __init__(self, server: Server, sock: socket.socket, grace_s: float) -> None:
        config = uvicorn.Config(
            create_app(server), log_level="warning", timeout_graceful_shutdown=grace_s + self.BACKSTOP_S
        )
        super().__init__(config)
        self.scheduler, self.sock, self.grace_s = server.scheduler, sock, grace_s

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            timer = threading.Timer(self.grace_s, self.scheduler.stop)
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)

    def serve_until_stopped(self) -> None:
        """Serve until SIGINT / SIGTERM, then return (a clean shutdown: the command exits 0).
        uvicorn raises the signal again once it has shut down, to the handler it found: quiet
        ones are in place meanwhile."""
        quiet = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.run(sockets=[self.sock])
        finally:
            for sig, previous in quiet.items():
                signal.signal(sig, previous)
