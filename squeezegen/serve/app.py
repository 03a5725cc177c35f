"""`squeezegen serve`: the OpenAI-compatible HTTP server (FastAPI, server-sent events) in front of
the scheduler thread that owns the model."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from squeezegen.runtime.generate import _eos_ids
from squeezegen.runtime.hooks import Method
from squeezegen.serve import protocol
from squeezegen.serve.protocol import ApiError
from squeezegen.serve.scheduler import Document, DocumentStore, Job, QueueFull, Scheduler, Summary

PLACEHOLDER = "\x00question\x00"


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


class Server:
    """The app's state: the model's tokenizer and limits, the scheduler, the documents."""

    def __init__(self, model, tokenizer, config: ServerConfig) -> None:
        self.tokenizer, self.config = tokenizer, config
        self.limit = model.config.max_position_embeddings
        self.eos = _eos_ids(model, tokenizer)
        self.documents = DocumentStore(config.cache_bytes)
        self.scheduler = Scheduler(model, tokenizer, config.max_batch, config.max_queue, self.documents)
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
    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model != self.config.model_name:
            raise ApiError(
                404,
                f"model {model!r} is not served here: this server serves {self.config.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def job(self, body: dict, chat: bool) -> tuple[Job, protocol.Decoding, asyncio.Queue, str]:
        protocol.check_keys(body, protocol.CHAT if chat else protocol.COMPLETION)
        self.check_model(body)
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

        def emit(kind: str, value: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        job = Job(
            chunks=chunks,
            method=ext.method or self.config.method,
            max_tokens=decoding.max_tokens,
            sampler=decoding.sampler,
            stops=decoding.stops,
            eos=self.eos,
            emit=emit,
            document=document,
        )
        label = ext.label or (document.method if document else self.config.method_label)
        return job, decoding, queue, label

    def prompt_chunks(self, body: dict, chat: bool, document: Document | None) -> list[list[int]]:
        """Token ids as `sg.generate` makes them: the chat template around the messages, or the prompt."""
        if chat:
            messages = protocol.chat_text(self.tokenizer, body.get("messages"))
            if self.chat_suffix is None:
                raise ApiError(400, "this model has no chat template: use /v1/completions")
            if document is None:
                return [self.encode(self.template(messages))]
            if len(messages) != 1 or messages[0]["role"] != "user" or document.format != "chat":
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

    def document_job(self, body: dict) -> tuple[Job, asyncio.Queue, str, str]:
        protocol.check_keys(body, {"model", "text", "format", "squeezegen"})
        self.check_model(body)
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, "text must be a non-empty string: the document to store", param="text")
        fmt = body.get("format", "chat")
        if fmt not in ("chat", "plain"):
            raise ApiError(400, "format is chat (questions on /v1/chat/completions) or plain", param="format")
        ext = protocol.extension(body)
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
            emit=lambda kind, value: loop.call_soon_threadsafe(queue.put_nowait, (kind, value)),
            store=fmt,
        )
        return job, queue, fmt, ext.label or self.config.document_label


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def create_app(server: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.scheduler.start()
        yield
        server.scheduler.stop()  # after uvicorn let in-flight responses finish (or cut them)
        await asyncio.get_running_loop().run_in_executor(None, server.scheduler.join, 30)

    app = FastAPI(title="squeezegen", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "running": server.scheduler.running(), "waiting": len(server.scheduler.waiting)}

    @app.get("/v1/models")
    async def models() -> dict:
        name = server.config.model_name
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "squeezegen"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    async def complete(request: Request, chat: bool):
        job, decoding, queue, label = server.job(await json_body(request), chat)
        submit(job)
        kind = "chat.completion" if chat else "text_completion"
        ident = protocol.completion_id("chatcmpl" if chat else "cmpl")
        meta = {"id": ident, "created": protocol.now(), "model": server.config.model_name}
        if decoding.stream:
            chunks = stream(request, job, queue, chat, kind, meta, decoding.include_usage, label)
            return StreamingResponse(chunks, media_type="text/event-stream")
        text, summary = [], None
        try:
            while True:
                event, value = await queue.get()
                if event == "token":
                    text.append(value)
                elif event == "done":
                    summary = value
                    break
                else:
                    raise failure(value)
        except asyncio.CancelledError:
            job.cancelled = True
            raise
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

    def submit(job: Job) -> None:
        try:
            server.scheduler.submit(job)
        except QueueFull as exc:
            raise ApiError(429, str(exc), type="rate_limit_error", code="queue_full") from None

    async def stream(request, job, queue, chat, kind, meta, include_usage, label) -> AsyncIterator[str]:
        def chunk(delta: dict | str | None, finish: str | None = None) -> str:
            if chat:
                choice = {"index": 0, "delta": delta or {}, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return "data: " + json.dumps({**meta, "object": f"{kind}.chunk", "choices": [choice]}) + "\n\n"

        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            while True:
                event, value = await queue.get()
                if event == "token":
                    yield chunk({"content": value} if chat else value)
                elif event == "done":
                    summary: Summary = value
                    yield chunk(None, protocol.FINISH[summary.finish_reason])
                    if include_usage:
                        record = {**meta, "object": f"{kind}.chunk", "choices": [], "usage": protocol.usage(summary)}
                        yield "data: " + json.dumps(record) + "\n\n"
                    break
                else:
                    yield "data: " + json.dumps(failure(value).body()) + "\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # also when the client goes away mid-stream: its slot frees at the next step
            job.cancelled = True

    @app.post("/v1/documents")
    async def create_document(request: Request):
        job, queue, fmt, label = server.document_job(await json_body(request))
        submit(job)
        event, value = await queue.get()
        if event != "done":
            raise failure(value)
        return document_info(value, label)

    @app.get("/v1/documents/{doc_id}")
    async def get_document(doc_id: str):
        doc = server.documents.get(doc_id)
        if doc is None:
            raise ApiError(404, f"document {doc_id!r} is not stored", code="document_not_found")
        return document_info(doc, doc.method)

    @app.delete("/v1/documents/{doc_id}")
    async def delete_document(doc_id: str):
        if not server.documents.delete(doc_id):
            raise ApiError(404, f"document {doc_id!r} is not stored", code="document_not_found")
        return {"id": doc_id, "object": "document", "deleted": True}

    return app


def document_info(doc: Document, label: str) -> dict:
    return {
        "id": doc.id,
        "object": "document",
        "created": doc.created,
        "tokens": doc.tokens,
        "kv_bytes": doc.nbytes,
        "method": label,
        "format": doc.format,
    }


def failure(value: tuple[int, str]) -> ApiError:
    """A request the scheduler could not finish: what it said, with its status."""
    status, message = value
    return ApiError(status, message, type="invalid_request_error" if status < 500 else "server_error")


def run(server: Server, host: str, port: int, grace_s: float = 30.0) -> None:
    """Serve until SIGINT / SIGTERM: then refuse new connections, let in-flight requests finish for
    up to `grace_s` seconds (cut after), stop the scheduler and return."""
    import signal

    import uvicorn

    config = uvicorn.Config(
        create_app(server), host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace_s
    )
    # uvicorn re-raises the signal once it has shut down, to the handler it found: make SIGTERM's a
    # quiet one, so that a clean shutdown exits with status 0
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
