"""Load test of `squeezegen serve` on loopback, all in one run (one process holds the server on a
thread and the clients on an asyncio loop, so both share the machine as a real deployment would):

1. `--clients` streaming completions at once vs the same requests one at a time: aggregate generated
   tokens/s, p50/p95 time to first token and inter-token latency, requests lost;
2. time to first token of a question on a stored, compressed document (POST /v1/documents first)
   vs the cold request that sends the same document inline.

    .venv/bin/python benchmarks/serve_load.py --out docs/results/serve

Prompts are real prose (`pydoc_data.topics`), each a different passage; decoding is greedy and the
completions endpoint is used so that every request runs its full `--new-tokens` (prose rarely ends).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time
from pathlib import Path
from pydoc_data.topics import topics

import httpx
import uvicorn
from openai import AsyncOpenAI

import squeezegen as sg
from squeezegen.runtime.device import host
from squeezegen.serve.app import Server, ServerConfig, create_app


def passages(tokenizer, count: int, tokens: int, offset: int = 0) -> list[str]:
    """`count` different passages of `tokens` tokens each from the bundled prose."""
    ids = tokenizer("\n\n".join(topics[k] for k in sorted(topics)), add_special_tokens=False).input_ids
    step = max(tokens, (len(ids) - tokens) // max(1, count))
    return [tokenizer.decode(ids[offset + i * step : offset + i * step + tokens]) for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def one_stream(client: AsyncOpenAI, model: str, prompt: str, new_tokens: int, extra: dict | None = None) -> dict:
    """A streaming completion: when it started, each chunk's arrival, the tokens the server counted."""
    start = time.perf_counter()
    arrivals, tokens = [], 0
    try:
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=new_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                arrivals.append(time.perf_counter())
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as exc:  # a lost request is a result, not a crash of the benchmark
        return {"ok": False, "error": repr(exc)[:200], "start": start}
    return {"ok": tokens > 0, "start": start, "arrivals": arrivals, "tokens": tokens}


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["ok"]]
    ttft = [r["arrivals"][0] - r["start"] for r in ok if r["arrivals"]] or [float("nan")]  # nan: none answered
    itl = [b - a for r in ok for a, b in zip(r["arrivals"], r["arrivals"][1:], strict=False)] or [float("nan")]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(results),
        "answered": len(ok),
        "lost": len(results) - len(ok),
        "generated_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p95_s": percentile(ttft, 0.95),
        "itl_p50_s": statistics.median(itl),
        "itl_p95_s": percentile(itl, 0.95),
    }


async def load_test(url: str, model: str, prompts: list[str], new_tokens: int, limit_s: float) -> dict:
    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=limit_s)
    await one_stream(client, model, prompts[0], 4)  # warm-up: first-call costs out of the figures
    rows = {}
    start = time.perf_counter()
    results = await asyncio.wait_for(
        asyncio.gather(*(one_stream(client, model, p, new_tokens) for p in prompts)), limit_s
    )
    rows["concurrent"] = summarize(list(results), time.perf_counter() - start)
    start = time.perf_counter()
    results = []
    for p in prompts:
        results.append(await asyncio.wait_for(one_stream(client, model, p, new_tokens), limit_s))
    rows["one at a time"] = summarize(results, time.perf_counter() - start)
    return rows


async def document_test(url: str, model: str, document: str, question: str, method: str, rounds: int) -> dict:
    """TTFT of the question on the stored document vs with the document inline (cold), `rounds` each."""
    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    async with httpx.AsyncClient(timeout=600) as http:
        start = time.perf_counter()
        reply = await http.post(url + "/v1/documents", json={"model": model, "text": document, "format": "plain"})
        store_s = time.perf_counter() - start
        reply.raise_for_status()
        stored = reply.json()
    cold, cached = [], []
    for _ in range(rounds):
        r = await one_stream(client, model, document + "\n\n" + question, 8)
        cold.append(r["arrivals"][0] - r["start"])
        r = await one_stream(client, model, question, 8, extra={"squeezegen": {"document": stored["id"]}})
        cached.append(r["arrivals"][0] - r["start"])
    return {
        "document_tokens": stored["tokens"],
        "document_method": method,
        "document_kv_bytes": stored["kv_bytes"],
        "store_s": store_s,
        "ttft_cold_s": statistics.median(cold),
        "ttft_cached_s": statistics.median(cached),
        "cached_over_cold": statistics.median(cached) / statistics.median(cold),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def markdown(report: dict) -> str:
    lines = [
        "| requests sent | answered | generated tokens | wall s | tokens/s | TTFT p50 / p95 s "
        "| inter-token p50 / p95 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["load"].items():
        lines.append(
            f"| {name} ({r['requests']}) | {r['answered']} | {r['generated_tokens']} | {r['wall_s']:.1f} "
            f"| {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} "
            f"| {1e3 * r['itl_p50_s']:.0f} / {1e3 * r['itl_p95_s']:.0f} |"
        )
    load = report["load"]
    lines.append("")
    gain = load["concurrent"]["tokens_per_s"] / load["one at a time"]["tokens_per_s"]
    lines.append(f"Concurrent over one at a time: **{gain:.2f}x** tokens/s.")
    d = report.get("document")
    if d:
        lines += [
            "",
            "| document tokens | stored with | stored KV MiB | store s | TTFT cold (inline) s | TTFT stored s "
            "| stored / cold |",
            "|---|---|---|---|---|---|---|",
            f"| {d['document_tokens']} | {d['document_method']} | {d['document_kv_bytes'] / 2**20:.1f} "
            f"| {d['store_s']:.1f} "
            f"| {d['ttft_cold_s']:.2f} | {d['ttft_cached_s']:.2f} | {d['cached_over_cold']:.3f} |",
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--document-tokens", type=int, default=4096, help="0: skip the document test")
    p.add_argument("--document-method", default="kvzip:budget=0.25")
    p.add_argument("--rounds", type=int, default=3, help="document test: questions asked each way")
    p.add_argument("--limit-s", type=float, default=900, help="time limit of each phase")
    p.add_argument("--out", default=None, help="folder for serve_load.json and serve_load.md")
    args = p.parse_args()

    model, tok = sg.load(args.model, dtype=args.dtype)
    name, _, params = args.document_method.partition(":")
    doc_args = {k: float(v) if "." in v else int(v) for k, v in (kv.split("=") for kv in params.split(",") if kv)}
    config = ServerConfig(
        model_name=args.model,
        method=sg.method("full"),
        method_label="full",
        document_method=sg.method(name, **doc_args),
        document_label=args.document_method,
        max_batch=args.clients,
    )
    server = Server(model, tok, config)
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    while not web.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    prompts = passages(tok, args.clients, args.prompt_tokens)
    dtype = str(model.model.norm.weight.dtype).removeprefix("torch.")  # a packed model's first tensor is 16-bit
    report = {
        "meta": {**vars(args), "dtype": dtype, "threads": __import__("torch").get_num_threads(), "host": host()},
        "load": asyncio.run(load_test(url, args.model, prompts, args.new_tokens, args.limit_s)),
    }
    if args.document_tokens:
        document = passages(tok, 1, args.document_tokens, offset=7)[0]
        question = "Question: what is the first topic this text describes? Answer:"
        report["document"] = asyncio.run(
            document_test(url, args.model, document, question, args.document_method, args.rounds)
        )
    web.should_exit = True
    thread.join(30)
    text = markdown(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "serve_load.json").write_text(json.dumps(report, indent=1))
        (out / "serve_load.md").write_text(text + "\n")
        print(f"wrote {out / 'serve_load.json'}, {out / 'serve_load.md'}")


if __name__ == "__main__":
    main()
