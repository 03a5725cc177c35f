"""The OpenAI API as the server speaks it: request bodies checked into jobs, responses and stream
chunks built, errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`).

A request picks its KV method in the body's `squeezegen` field (the openai client sends it with
`extra_body={"squeezegen": {...}}`): `{"method": "snapkv", "args": {"budget": 0.25}}`, or
`{"document": "doc-..."}` to answer from a stored, compressed document.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from squeezegen.errors import SqueezegenError
from squeezegen.methods.registry import method as build_method
from squeezegen.runtime.hooks import Method
from squeezegen.runtime.sampling import LogitRules, Sampler

COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options", "user"}
# vLLM's sampling extensions that load generators and `vllm bench serve` send
VLLM = {"top_k", "ignore_eos", "min_tokens", "repetition_penalty", "stop_token_ids"}
COMMON |= VLLM
CHAT = COMMON | {"messages", "max_completion_tokens", "squeezegen"}
COMPLETION = COMMON | {"prompt", "squeezegen"}
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": None}  # accepted at these values only


class ApiError(Exception):
    """An error answered as OpenAI does: an HTTP status and an error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Decoding:
    max_tokens: int
    sampler: Sampler
    stops: list[str]
    stream: bool
    include_usage: bool
    rules: LogitRules
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()


def check_keys(body: dict, allowed: set[str]) -> None:
    for key, neutral in NEUTRAL.items():
        if key in body and body[key] not in (neutral, None, False):
            raise ApiError(400, f"{key}={body[key]!r} is not supported: leave it out", param=key)
    unknown = sorted(set(body) - allowed - set(NEUTRAL))
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]!r}", param=unknown[0], code="unknown_parameter")


def _number(body: dict, key: str, default, low, high, kind=float):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ApiError(400, f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}", param=key)
    if not (math.isfinite(value) and low <= value <= high):
        raise ApiError(400, f"{key} must be between {low} and {high}, got {value}", param=key)
    return value


def decoding(body: dict, default_max_tokens: int) -> Decoding:
    """Sampling and stopping settings of a chat or completion request."""
    if _number(body, "n", 1, 1, 1, int) != 1:
        raise ApiError(400, "n must be 1", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, 1, 1 << 20, int)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p must be above 0", param="top_p")
    seed = _number(body, "seed", None, -(1 << 63), (1 << 63) - 1, int)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else [] if stop is None else [None]
    if len(stops) > 4 or any(not isinstance(s, str) or not s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4 of them", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ApiError(400, 'stream_options must be an object such as {"include_usage": true}', param="stream_options")
    if set(options) - {"include_usage"}:
        raise ApiError(400, "stream_options takes only include_usage", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "stream_options.include_usage must be true or false", param="stream_options")
    top_k = _number(body, "top_k", 0, -1, 1 << 31, int)  # vLLM: -1 (or 0) is off
    sampler = Sampler(temperature=float(temperature), top_p=float(top_p), top_k=max(top_k, 0), seed=seed)
    min_tokens = _number(body, "min_tokens", 0, 0, max_tokens, int)
    penalty = _number(body, "repetition_penalty", 1.0, 0.0, 100.0)
    if penalty == 0:
        raise ApiError(400, "repetition_penalty must be above 0 (1 = off)", param="repetition_penalty")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "ignore_eos must be true or false", param="ignore_eos")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in stop_ids):
        raise ApiError(400, "stop_token_ids must be a list of token ids", param="stop_token_ids")
    rules = LogitRules(repetition_penalty=float(penalty), min_tokens=min_tokens)
    return Decoding(max_tokens, sampler, stops, stream, include_usage, rules, ignore_eos, tuple(stop_ids))


@dataclass
class Extension:
    method: Method | None  # None: the server's default
    label: str | None
    document: str | None


def extension(body: dict) -> Extension:
    """The `squeezegen` field: a method with its arguments, or a stored document."""
    ext = body.get("squeezegen") or {}
    if not isinstance(ext, dict):
        raise ApiError(400, 'squeezegen must be an object such as {"method": "snapkv"}', param="squeezegen")
    unknown = sorted(set(ext) - {"method", "args", "document"})
    if unknown:
        raise ApiError(400, f"unknown squeezegen field {unknown[0]!r}: use method, args, document", param="squeezegen")
    document = ext.get("document")
    if document is not None and not isinstance(document, str):
        raise ApiError(400, "squeezegen.document is a document id (from POST /v1/documents)", param="squeezegen")
    name, args = ext.get("method"), ext.get("args") or {}
    if name is None:
        if args:
            raise ApiError(400, "squeezegen.args needs squeezegen.method", param="squeezegen")
        return Extension(None, None, document)
    if document is not None:
        raise ApiError(400, "a question on a stored document runs as the document was compressed: drop the method")
    if not isinstance(args, dict):
        raise ApiError(400, "squeezegen.args must be an object of method parameters", param="squeezegen")
    try:
        built = build_method(name, **args)
    except SqueezegenError as exc:
        raise ApiError(422, str(exc), param="squeezegen", code="invalid_method") from None
    return Extension(built, name, document)


def chat_text(tokenizer, messages: object) -> list[dict]:
    """The messages, checked, as {role, content} with string content: OpenAI's content parts (a list of
    {"type": "text", "text": ...}, as `vllm bench serve` sends) are joined with newlines, as vLLM does."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, "each message needs a role: system, user or assistant", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise ApiError(
                    400,
                    'content parts must be {"type": "text", "text": ...}: this model reads text only',
                    param="messages",
                )
            content = "\n".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, "message content must be a string or a list of text parts", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def completion_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


FINISH = {"stop": "stop", "length": "length"}


def usage(summary) -> dict:
    return {
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.completion_tokens,
        "total_tokens": summary.prompt_tokens + summary.completion_tokens,
        "kv_bytes": summary.kv_bytes,
    }
