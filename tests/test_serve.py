"""`squeezegen serve` on loopback, driven by the real `openai` client and plain HTTP: answers equal to
`sg.generate`, per-request methods, stored documents, continuous batching, and bad input / faults."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from openai import OpenAI

import squeezegen as sg
from squeezegen.serve.app import Server, ServerConfig, create_app

from .conftest import tiny
from .test_fastkv import token_ids

MODEL = "tiny-llama"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server in this process, on a free loopback port."""

    def __init__(self, loaded=None, **config) -> None:
        self.model, self.tok = loaded or tiny(MODEL)
        settings = dict(
            model_name=MODEL,
            method=sg.method("full"),
            method_label="full",
            document_method=sg.method("kvzip", budget=0.3, chunk_size=64),
            document_label="kvzip",
        )
        self.server = Server(self.model, self.tok, ServerConfig(**{**settings, **config}))
        self.port = free_port()
        self.uvicorn = uvicorn.Server(
            uvicorn.Config(create_app(self.server), host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        while not self.uvicorn.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def close(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def running():
    server = Running()
    yield server
    server.close()


def prompt(tok, n=60, seed=51) -> str:
    return tok.decode(token_ids(tok, n, seed=seed)[0])


def test_models_lists_the_served_model(running):
    assert [m.id for m in running.client.models.list()] == [MODEL]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_generate(running, stream):
    text = prompt(running.tok)
    ref = sg.generate(running.model, running.tok, text, max_new_tokens=12, chat=True)
    messages = [{"role": "user", "content": text}]
    if stream:
        chunks = running.client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts, usage = [], None
        for chunk in chunks:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
            if chunk.usage:
                usage = chunk.usage
        answer = "".join(parts)
    else:
        reply = running.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        answer, usage = reply.choices[0].message.content, reply.usage
    assert answer == ref.texts[0]
    assert usage.prompt_tokens == ref.prompt_lengths[0] and usage.completion_tokens == len(ref.token_ids[0])
    assert usage.model_extra["kv_bytes"] == ref.kv_bytes


@pytest.mark.parametrize("stream", [False, True])
def test_completions_equal_generate(running, stream):
    text = prompt(running.tok, seed=52)
    ref = sg.generate(running.model, running.tok, text, max_new_tokens=10)
    if stream:
        chunks = running.client.completions.create(model=MODEL, prompt=text, max_tokens=10, temperature=0, stream=True)
        answer = "".join(c.choices[0].text for c in chunks if c.choices)
    else:
        answer = (
            running.client.completions.create(model=MODEL, prompt=text, max_tokens=10, temperature=0).choices[0].text
        )
    assert answer == ref.texts[0]


def test_generate_and_the_server_read_their_tokens_through_one_step(running, monkeypatch):
    """Both loops choose and read tokens through runtime/rows.py: every token either returns went
    through `Row.accept`, so a fix there is a fix in both; and the greedy tokens are equal."""
    from squeezegen.runtime import rows

    accepted = []
    accept = rows.Row.accept
    monkeypatch.setattr(rows.Row, "accept", lambda row, token: accepted.append(token) or accept(row, token))
    text = prompt(running.tok, seed=57)
    ref = sg.generate(running.model, running.tok, text, max_new_tokens=9)
    assert accepted == ref.token_ids[0]
    accepted.clear()
    answer = running.client.completions.create(model=MODEL, prompt=text, max_tokens=9, temperature=0)
    assert accepted == ref.token_ids[0]
    assert answer.choices[0].text == ref.texts[0]


@pytest.mark.parametrize(
    "name, args", [("snapkv", {"budget": 8, "window": 4}), ("h2o", {"budget": 16}), ("fastkv", {"tsp_rate": 0.5})]
)
def test_each_request_picks_its_method(running, name, args):
    text = prompt(running.tok, 80, seed=53)
    ref = sg.generate(running.model, running.tok, text, method=sg.method(name, **args), max_new_tokens=10, chat=True)
    reply = running.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": text}],
        max_tokens=10,
        temperature=0,
        extra_body={"squeezegen": {"method": name, "args": args}},
    )
    assert reply.choices[0].message.content == ref.texts[0]
    assert reply.model_extra["squeezegen"]["method"] == name


def test_a_server_in_dtype_auto_answers_as_generate_does(auto_dtype):
    model, tok = sg.load(MODEL)  # what `squeezegen serve` loads by default
    assert model.model.norm.weight.dtype == getattr(torch, auto_dtype)
    server = Running(loaded=(model, tok))
    try:
        text = prompt(tok, 70, seed=57)
        for name, args in [("full", {}), ("snapkv", {"budget": 0.5})]:
            ref = sg.generate(model, tok, text, method=sg.method(name, **args), max_new_tokens=8, chat=True)
            reply = server.client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": text}],
                max_tokens=8,
                temperature=0,
                extra_body={"squeezegen": {"method": name, "args": args}},
            )
            assert reply.choices[0].message.content == ref.texts[0]
            assert reply.usage.model_extra["kv_bytes"] == ref.kv_bytes  # 2 bytes a value in bf16, 4 in float32
    finally:
        server.close()


def test_a_stored_document_answers_as_generate_with_context(running):
    doc = prompt(running.tok, 150, seed=54)
    stored = httpx.post(running.url + "/v1/documents", json={"model": MODEL, "text": doc}, timeout=60).json()
    assert stored["object"] == "document" and stored["kv_bytes"] > 0
    method = sg.method("kvzip", budget=0.3, chunk_size=64)
    for question in ("What is the text about?", "Name one thing it mentions."):
        ref = sg.generate(
            running.model, running.tok, question, context=doc, method=method, max_new_tokens=10, chat=True
        )
        reply = running.client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": question}],
            max_tokens=10,
            temperature=0,
            extra_body={"squeezegen": {"document": stored["id"]}},
        )
        assert reply.choices[0].message.content == ref.texts[0]
    gone = httpx.delete(f"{running.url}/v1/documents/{stored['id']}")
    assert gone.json()["deleted"] is True
    missing = httpx.post(
        running.url + "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "squeezegen": {"document": stored["id"]},
        },
    )
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "document_not_found"


def test_documents_beyond_the_cache_budget_are_evicted_oldest_first(running):
    one = httpx.post(running.url + "/v1/documents", json={"model": MODEL, "text": prompt(running.tok, 150)}, timeout=60)
    budget = int(2.5 * one.json()["kv_bytes"])  # room for two documents of this length
    server = Running(cache_bytes=budget)
    try:
        ids = []
        for seed in range(3):
            text = prompt(server.tok, 150, seed=60 + seed)
            reply = httpx.post(server.url + "/v1/documents", json={"model": MODEL, "text": text}, timeout=60).json()
            ids.append(reply["id"])
        alive = [httpx.get(f"{server.url}/v1/documents/{i}").status_code for i in ids]
        assert alive == [404, 200, 200] and server.server.documents.nbytes() <= budget
    finally:
        server.close()


MIXED = [  # a method per request, decode-time ones (their own budgets) among them
    ("full", {}),
    ("h2o", {"budget": 24}),
    ("rpc", {"P": 8, "R": 4, "c": 2}),
    ("tova", {"budget": 30}),
    ("snapkv", {"budget": 0.5, "window": 8}),
    ("streaming_llm", {"budget": 20}),
]


def test_concurrent_requests_of_every_method_share_the_batch_and_each_equals_generate(running):
    texts = [prompt(running.tok, n, seed=70 + n) for n in (20, 45, 70, 95, 120, 33)]
    refs = [
        sg.generate(
            running.model, running.tok, t, method=sg.method(m, **a), max_new_tokens=24, chat=True, ignore_eos=True
        ).texts[0]
        for t, (m, a) in zip(texts, MIXED, strict=True)
    ]
    answers, widest = [None] * len(texts), []
    scheduler = running.server.scheduler
    step, admit = scheduler._step_batch, scheduler._admit

    def watched():  # the most requests one decode step ran
        widest.append(len(scheduler.batch_jobs))
        step()

    def admit_when_all_wait(job):  # every request arrives before the first is admitted
        deadline = time.time() + 20
        while not scheduler.batch_jobs and len(scheduler.waiting) < len(texts) - 1 and time.time() < deadline:
            time.sleep(0.01)
        admit(job)

    def ask(i: int) -> None:
        name, args = MIXED[i]
        reply = running.client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": texts[i]}],
            max_tokens=24,
            temperature=0,
            extra_body={"ignore_eos": True, "squeezegen": {"method": name, "args": args}},
        )
        answers[i] = reply.choices[0].message.content

    scheduler._step_batch, scheduler._admit = watched, admit_when_all_wait
    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        scheduler._step_batch, scheduler._admit = step, admit
    assert answers == refs
    assert max(widest) == len(texts)  # decode-time methods were in the shared batch, not stepped apart


def test_a_long_prompt_is_prefilled_in_chunks_between_the_steps_of_running_streams():
    """While a stream decodes, a long prompt goes in chunks of --prefill-tokens, each followed by a
    decode step, and still answers as `sg.generate` does; with nothing decoding it goes at once."""
    server = Running(prefill_tokens=16)
    scheduler, events = server.server.scheduler, []
    chunk, step = scheduler._prefill_chunk, scheduler._step_batch
    scheduler._prefill_chunk = lambda: (chunk(), events.append(("chunk", scheduler.prefilling)))
    scheduler._step_batch = lambda: (step(), events.append(("step", len(scheduler.batch_jobs))))
    try:
        long_text = prompt(server.tok, 90, seed=91)
        ref = sg.generate(server.model, server.tok, long_text, max_new_tokens=8, chat=True).texts[0]
        with httpx.stream(
            "POST",
            server.url + "/v1/completions",
            json={"model": MODEL, "prompt": "Once", "max_tokens": 400, "ignore_eos": True, "stream": True},
            timeout=60,
        ) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the stream decodes
            events.clear()
            reply = server.client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": long_text}], max_tokens=8, temperature=0
            )
        assert reply.choices[0].message.content == ref
        chunks = [i for i, (kind, _) in enumerate(events) if kind == "chunk"]
        assert len(chunks) >= reply.usage.prompt_tokens // 16  # 16 tokens a chunk
        assert all(events[i + 1][0] == "step" and events[i + 1][1] >= 1 for i in chunks)  # the stream went on
        deadline = time.time() + 20  # the closed stream leaves at the next step
        while scheduler.running() and time.time() < deadline:
            time.sleep(0.02)
        events.clear()  # alone, the same prompt is one call
        server.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": long_text}], max_tokens=2, temperature=0
        )
        assert [kind for kind, _ in events].count("chunk") == 1
    finally:
        server.close()


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        (b"[" * 5000, 400, None),  # nested past Python's recursion limit
        ({"model": 5, "messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": 5}, 400, "stop"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": {"a": 1}}, 400, "stop"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream_options": []},
            400,
            "stream_options",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "bogus": 1}, 400, "bogus"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
        ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "stream_options": {"include_usage": "yes"},
            },
            400,
            "stream_options",
        ),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 9000}]}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "max_tokens"),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "squeezegen": {"method": "snapkv", "args": {"budget": 2.5}},
            },
            422,
            "squeezegen",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "squeezegen": {"method": "nope"}},
            422,
            "squeezegen",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_k": "5"}, 400, "top_k"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": "yes"}, 400, "ignore_eos"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "min_tokens": 5},
            400,
            "min_tokens",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 0},
            400,
            "repetition_penalty",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop_token_ids": [-1]},
            400,
            "stop_token_ids",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop_token_ids": [10**9]},
            400,
            "stop_token_ids",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "best_of": 2}, 400, "best_of"),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "squeezegen": {"method": "snapkv", "args": {"kernel": 2.5}},
            },
            422,
            "squeezegen",
        ),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_goes_on(running, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = httpx.post(running.url + "/v1/chat/completions", content=content, timeout=60)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    ok = running.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "still there?"}], max_tokens=2, temperature=0
    )
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_a_model_is_retrieved_by_its_id(running):
    assert httpx.get(f"{running.url}/v1/models/{MODEL}", timeout=30).json()["id"] == MODEL
    assert httpx.get(f"{running.url}/v1/models/gpt-4", timeout=30).status_code == 404


@pytest.mark.parametrize(
    "verb, path, status", [("GET", "/nope", 404), ("GET", "/v1/completions", 405), ("POST", "/v1/completions/", 404)]
)
def test_unknown_routes_and_verbs_answer_in_openai_shape(running, verb, path, status):
    reply = httpx.request(verb, running.url + path, timeout=30)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and path in error["message"]


def test_documents_say_where_to_ask_and_name_their_method_alike(running):
    text = prompt(running.tok, 120, seed=7)
    made = httpx.post(running.url + "/v1/documents", json={"model": MODEL, "text": text, "format": "plain"}, timeout=60)
    doc = made.json()
    assert made.status_code == 200 and doc["method"] == "kvzip"
    assert httpx.get(f"{running.url}/v1/documents/{doc['id']}").json() == doc
    on_chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "what?"}],
        "squeezegen": {"document": doc["id"]},
    }
    reply = httpx.post(running.url + "/v1/chat/completions", json=on_chat, timeout=60)
    assert reply.status_code == 400 and "/v1/completions" in reply.json()["error"]["message"]
    again = {"model": MODEL, "text": text, "squeezegen": {"document": doc["id"]}}
    reply = httpx.post(running.url + "/v1/documents", json=again, timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "squeezegen"
    asked = {"model": MODEL, "prompt": "what?", "max_tokens": 2, "squeezegen": {"document": doc["id"]}}
    assert httpx.post(running.url + "/v1/completions", json=asked, timeout=60).status_code == 200


def test_a_client_that_disconnects_frees_its_slot(running):
    with httpx.stream(
        "POST",
        running.url + "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell a long story"}],
            "max_tokens": 3000,
            "stream": True,
            "temperature": 0,
        },
        timeout=60,
    ) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        next(lines)
    deadline = time.time() + 20
    while running.server.scheduler.running() and time.time() < deadline:
        time.sleep(0.05)
    assert running.server.scheduler.running() == 0


def test_a_full_queue_answers_429(monkeypatch):
    server = Running(max_batch=1, max_queue=1)
    admitted, release = threading.Event(), threading.Event()
    admit = server.server.scheduler._admit

    def slow_admit(job):  # the first request's prefill takes as long as the test needs
        admitted.set()
        release.wait(30)
        admit(job)

    monkeypatch.setattr(server.server.scheduler, "_admit", slow_admit)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "A story"}], "max_tokens": 4, "temperature": 0}
    replies = []
    try:
        first = threading.Thread(
            target=lambda: replies.append(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60))
        )
        first.start()
        assert admitted.wait(10)
        second = threading.Thread(
            target=lambda: replies.append(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60))
        )
        second.start()
        deadline = time.time() + 10
        while not server.server.scheduler.waiting and time.time() < deadline:
            time.sleep(0.02)
        third = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert third.status_code == 429 and third.json()["error"]["code"] == "queue_full"
        release.set()
        first.join(30)
        second.join(30)
        assert [r.status_code for r in replies] == [200, 200]  # the queued one was served after all
    finally:
        release.set()
        server.close()


def start_server(*flags: str) -> tuple[subprocess.Popen, str]:
    """`squeezegen serve` in a process of its own on a free loopback port, once it answers."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "squeezegen.cli", "serve", "--model", MODEL, "--port", str(port), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the server did not start: {proc.stdout.read()}")


LONG = {"model": MODEL, "max_tokens": 5000, "temperature": 0}


def test_a_shutdown_past_the_grace_answers_503_and_ends_streams_with_done():
    proc, url = start_server("--grace", "0.5")
    answers = {}

    def plain():
        answers["plain"] = httpx.post(url + "/v1/completions", json={**LONG, "prompt": "Once upon a time"}, timeout=60)

    def stream():
        body = {**LONG, "messages": [{"role": "user", "content": "A long story"}], "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            answers["stream"] = [line for line in response.iter_lines() if line]

    try:
        threads = [threading.Thread(target=plain), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while httpx.get(url + "/health").json()["running"] < 2 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert "Traceback" not in log and "Exception" not in log, log
    plain_reply = answers["plain"]
    assert plain_reply.status_code == 503
    assert plain_reply.json()["error"]["type"] == "server_error"
    *_, error, done = answers["stream"]
    assert json.loads(error.removeprefix("data: "))["error"]["message"].startswith("the server is shutting down")
    assert done == "data: [DONE]"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_an_idle_server_with_status_0(sig):
    proc, _ = start_server()
    try:
        proc.send_signal(sig)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in proc.stdout.read()


def test_a_plain_request_whose_client_disconnects_frees_its_slot(running):
    body = json.dumps({**LONG, "prompt": "Once upon a time", "max_tokens": 8000}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    with socket.create_connection(("127.0.0.1", running.port)) as client:
        client.sendall(head.encode() + b"\r\n\r\n" + body)
        deadline = time.time() + 20
        while not running.server.scheduler.running() and time.time() < deadline:
            time.sleep(0.02)
        assert running.server.scheduler.running() == 1
    deadline = time.time() + 1  # all 8000 tokens take seconds more
    while running.server.scheduler.running() and time.time() < deadline:
        time.sleep(0.05)
    assert running.server.scheduler.running() == 0


# ---- vLLM's client conventions: sampling extensions and Prometheus metrics ----


def _completion(running, text, **extra):
    return running.client.completions.create(
        model=MODEL, prompt=text, max_tokens=10, temperature=0, extra_body=extra or None
    ).choices[0]


def test_vllm_stop_token_ids_min_tokens_and_ignore_eos(running):
    text = prompt(running.tok, seed=61)
    ref = sg.generate(running.model, running.tok, text, max_new_tokens=10, ignore_eos=True).token_ids[0]
    stop = ref[3]
    first = ref.index(stop)
    reply = running.client.completions.create(
        model=MODEL, prompt=text, max_tokens=10, temperature=0, extra_body={"stop_token_ids": [stop]}
    )
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == first + 1
    assert reply.choices[0].text == running.tok.decode(ref[:first], skip_special_tokens=True)
    # min_tokens: the stop token cannot be chosen before that many tokens, so the text goes on past it
    held = _completion(running, text, stop_token_ids=[stop], min_tokens=first + 2)
    assert held.text != reply.choices[0].text and len(held.text) > len(reply.choices[0].text)
    # ignore_eos: the model's EOS (here made the greedy token) no longer ends the answer
    eos, running.server.eos = running.server.eos, {stop}
    try:
        assert _completion(running, text).finish_reason == "stop"
        ignored = _completion(running, text, ignore_eos=True)
        assert ignored.finish_reason == "length" and ignored.text == running.tok.decode(ref, skip_special_tokens=True)
    finally:
        running.server.eos = eos


def test_vllm_top_k_and_repetition_penalty_match_transformers(running):
    text = prompt(running.tok, seed=62)
    greedy = _completion(running, text).text
    # top_k=1 leaves one candidate: sampling at temperature 1 must give the greedy answer
    sampled = running.client.completions.create(
        model=MODEL, prompt=text, max_tokens=10, temperature=1.0, seed=3, extra_body={"top_k": 1}
    )
    assert sampled.choices[0].text == greedy
    # repetition_penalty as transformers' RepetitionPenaltyLogitsProcessor (prompt and output tokens; below 1
    # it favours them, which changes this random model's answer)
    (ids,) = running.server.prompt_chunks({"prompt": text}, chat=False, document=None)
    hf = running.model.generate(
        torch.tensor([ids]), max_new_tokens=10, do_sample=False, repetition_penalty=0.3, min_new_tokens=10
    )[0, len(ids) :]
    penalized = _completion(running, text, repetition_penalty=0.3, min_tokens=10).text
    assert penalized == running.tok.decode(hf, skip_special_tokens=True) and penalized != greedy


def test_metrics_speak_vllm_names(running):
    from prometheus_client.parser import text_string_to_metric_families

    for seed in (63, 64):
        _completion(running, prompt(running.tok, seed=seed))
    reply = httpx.get(running.url + "/metrics", timeout=30)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, s.labels.get("finished_reason")): s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
        if s.labels.get("model_name") == MODEL
    }
    assert samples[("vllm:num_requests_running", None)] == 0 and ("vllm:num_requests_waiting", None) in samples
    assert samples[("vllm:generation_tokens_total", None)] >= 20
    assert samples[("vllm:time_to_first_token_seconds_count", None)] >= 2
    assert samples[("vllm:inter_token_latency_seconds_count", None)] >= 18
    assert samples[("vllm:request_success_total", "length")] >= 2
    assert 0 <= samples[("vllm:kv_cache_usage_perc", None)]


VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
BENCH = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser()\nadd_cli_args(parser)\nmain(parser.parse_args(sys.argv[1:]))\n"
)


@pytest.mark.skipif(
    not VLLM_PYTHON.exists() and not os.environ.get("SQUEEZEGEN_REQUIRE_VLLM"),
    reason="vLLM's environment is not built here: `make vllm-env`",
)
@pytest.mark.parametrize("backend, endpoint", [("openai-chat", "/v1/chat/completions"), ("openai", "/v1/completions")])
def test_vllm_bench_serve_runs_against_squeezegen_serve(running, tmp_path, backend, endpoint):
    """vLLM's own load generator (its chat content parts, ignore_eos, stream usage) gets every answer."""
    running.tok.save_pretrained(tmp_path / "tokenizer")
    argv = [str(VLLM_PYTHON), "-c", BENCH, "--backend", backend, "--endpoint", endpoint, "--base-url", running.url]
    argv += ["--model", MODEL, "--tokenizer", str(tmp_path / "tokenizer"), "--dataset-name", "random"]
    argv += ["--random-input-len", "32", "--random-output-len", "8", "--num-prompts", "4", "--ignore-eos"]
    argv += ["--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == 4 and result["failed"] == 0 and result["total_output_tokens"] == 32
    assert 0 < result["mean_ttft_ms"]
