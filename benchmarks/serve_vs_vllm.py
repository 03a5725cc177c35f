"""`squeezegen serve` beside vLLM's CPU build, plain and with the squeezegen plugin: the same
loads, the same model and dtype, the same host, one server at a time, in one run.

Each server is a process of its own (`squeezegen serve`; vLLM through
`python -m squeezegen.integrations.vllm serve [--without-plugin]` from `.venv-vllm`, `make vllm-env`);
the clients are the `openai` async client on loopback, streaming chat requests, greedy, with vLLM's
`ignore_eos` so that every server generates every token asked for. Prompts are distinct passages of
real prose (`pydoc_data.topics`), cut to the load's token count. Loads:

- decode-heavy: 16 clients, ~100-token prompts, 256 new tokens;
- prefill-heavy: 16 clients, ~950-token prompts, 64 new tokens (also at 25% SnapKV: squeezegen's
  own and vLLM + plugin);
- 64 clients: 64 at once, ~200-token prompts, 32 new tokens: every request answered or refused
  (429), none hung;
- 4K prompts: 8 clients, ~4000-token prompts, 32 new tokens, full and 25% SnapKV;
- streams, and streams + arrivals: 8 clients, ~100-token prompts, 256 new tokens, alone and with
  four ~2000-token prompts arriving 1 s in: how much a long prompt's prefill delays the running
  streams' tokens (their inter-token p95; latencies in these rows are the 8 streams').

squeezegen runs twice where its prefill chunk matters: with the default `--prefill-tokens 1024` and
with 32 (smoother streams, slower prefill).

    .venv/bin/python benchmarks/serve_vs_vllm.py --out docs/results/serve-vs-vllm [--loads decode-heavy ...]

Each load runs three times (`--rounds`) and the round of median tokens/s is reported. Results are
saved after every (server, load) pair and a rerun skips the pairs saved already.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import openai
from openai import AsyncOpenAI
from serve_load import free_port, passages
from serve_load import summarize as load_summary

import squeezegen as sg
from squeezegen.models.bundled import BUNDLED, dequantized_folder
from squeezegen.runtime.device import host

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"  # the name every server serves it under
SNAPKV = {"method": "snapkv", "args": {"budget": 0.25}}


@dataclass(frozen=True)
class Load:
    clients: int
    prompt_tokens: int
    new_tokens: int
    compressed: bool = False  # also run at 25% SnapKV where the server compresses
    arrivals: int = 0  # long prompts sent 1 s after the clients started (8 new tokens each)
    arrival_tokens: int = 0


LOADS = {
    "decode-heavy": Load(16, 100, 256),
    "prefill-heavy": Load(16, 950, 64, compressed=True),
    "64 clients": Load(64, 200, 32),
    "4K prompts": Load(8, 4000, 32, compressed=True),
    "streams": Load(8, 100, 256),
    "streams + arrivals": Load(8, 100, 256, arrivals=4, arrival_tokens=2000),
}
SMOOTH = "squeezegen, 32-token chunks"  # --prefill-tokens 32: smoother streams, slower prefill
SERVERS = ("squeezegen", SMOOTH, "vllm", "vllm+plugin")
SMOOTH_LOADS = ("prefill-heavy", "streams", "streams + arrivals")  # where the chunk size shows


def extra_body(server: str, method: dict | None) -> dict:
    """vLLM's ignore_eos, and the method as each server takes it."""
    body: dict = {"ignore_eos": True}
    if method and server.startswith("squeezegen"):
        body["squeezegen"] = method
    elif method:
        body["vllm_xargs"] = {"squeezegen": json.dumps(method)}
    return body


async def one_chat(client: AsyncOpenAI, model: str, prompt: str, new_tokens: int, body: dict) -> dict:
    """A streaming chat request: its start, each content chunk's arrival, the tokens counted, or why it failed."""
    start = time.perf_counter()
    arrivals, tokens = [], 0
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=new_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=body,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.perf_counter())
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except openai.RateLimitError:
        return {"outcome": "refused", "start": start}
    except Exception as exc:  # noqa: BLE001 - a lost request is a result, not a crash of the benchmark
        return {"outcome": "lost", "error": repr(exc)[:200], "start": start}
    return {"outcome": "answered" if tokens else "lost", "start": start, "arrivals": arrivals, "tokens": tokens}


def summarize(results: list[dict], wall: float) -> dict:
    """serve_load's summary of the answered requests, with the refused (429) and lost counted apart."""
    row = load_summary([{**r, "ok": r["outcome"] == "answered"} for r in results], wall)
    row.update({k: sum(r["outcome"] == k for r in results) for k in ("refused", "lost")})
    row["errors"] = sorted({r["error"] for r in results if "error" in r})[:3]
    return row


async def run_load(
    port: int, server: str, load: Load, prompts: list[str], method: dict | None, limit_s: float, rounds: int
) -> dict:
    """The load `rounds` times; the round of median tokens/s stands for it (a shared VM's stalls move
    single rounds by tens of percent), every round's tokens/s kept beside it."""
    async with AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=limit_s) as c:
        runs = [await timed_load(c, server, load, prompts, method, limit_s) for _ in range(rounds)]
    median = sorted(runs, key=lambda r: r["tokens_per_s"])[(rounds - 1) // 2]
    return {**median, "rounds_tokens_per_s": [r["tokens_per_s"] for r in runs]}


async def timed_load(client: AsyncOpenAI, server: str, load: Load, prompts: list[str], method, limit_s: float) -> dict:
    """The clients' requests at once (and the long prompts 1 s later); latencies are of the clients' streams."""
    body = extra_body(server, method)
    await one_chat(client, MODEL, prompts[0][:200], 4, body)  # warm-up: first-call costs out of the figures
    start = time.perf_counter()
    tasks = [asyncio.ensure_future(one_chat(client, MODEL, p, load.new_tokens, body)) for p in prompts[: load.clients]]
    if load.arrivals:
        await asyncio.sleep(1.0)
        tasks += [asyncio.ensure_future(one_chat(client, MODEL, p, 8, body)) for p in prompts[load.clients :]]
    done, pending = await asyncio.wait(tasks, timeout=limit_s)
    for task in pending:  # hung: counted as lost
        task.cancel()
    hung = {"outcome": "lost", "error": "no answer in time", "start": start}
    results = [t.result() if t in done else hung for t in tasks]
    row = summarize(results[: load.clients], time.perf_counter() - start)
    if load.arrivals:
        row["arrived"] = summarize(results[load.clients :], row["wall_s"])
    return row


def start_server(server: str, port: int, log: Path) -> subprocess.Popen:
    if server.startswith("squeezegen"):
        command = [str(ROOT / ".venv/bin/squeezegen"), "serve", "--model", MODEL, "--dtype", "bfloat16"]
        command += ["--port", str(port), "--max-batch", "16", "--max-queue", "64", "--max-tokens", "256"]
        command += ["--prefill-tokens", "32"] if server == SMOOTH else []
        env = dict(os.environ)
    else:
        folder = dequantized_folder(BUNDLED[MODEL])
        command = [str(ROOT / ".venv-vllm/bin/python"), "-m", "squeezegen.integrations.vllm", "serve", str(folder)]
        command += ["--port", str(port), "--host", "127.0.0.1", "--served-model-name", MODEL]
        command += ["--dtype", "bfloat16", "--max-model-len", "8192", "--no-enable-prefix-caching"]  # rounds repeat
        command += ["--without-plugin"] if server == "vllm" else []
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    out = open(log, "w")  # noqa: SIM115 (the server writes it while it runs)
    return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = " ".join(log.read_text().strip().splitlines()[-2:])
            raise SystemExit(f"the server exited ({proc.returncode}): {tail} (its log: {log})")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return
        except OSError:
            time.sleep(2)
    raise SystemExit(f"the server did not answer within {timeout:.0f} s (its log: {log})")


def cases(loads: list[str]) -> list[tuple[str, str, dict | None]]:
    """(server, load, method) in run order: full everywhere but on the plugin, SnapKV where a load asks."""
    out = []
    for server in SERVERS:
        for name in loads:
            if server == SMOOTH and name not in SMOOTH_LOADS:
                continue
            if server != "vllm+plugin":
                out.append((server, name, None))
            if LOADS[name].compressed and server != "vllm":
                out.append((server, name, SNAPKV))
    return out


def label(method: dict | None) -> str:
    return "full" if method is None else f"{method['method']} {method['args']['budget']:.0%}"


RATIOS = (  # (what, (server, method), over (server, method), of)
    ("squeezegen / vLLM tokens/s", ("squeezegen", "full"), ("vllm", "full"), "tokens_per_s"),
    ("squeezegen / vLLM TTFT p50", ("squeezegen", "full"), ("vllm", "full"), "ttft_p50_s"),
    ("vLLM + plugin, 25% SnapKV / vLLM tokens/s", ("vllm+plugin", "snapkv 25%"), ("vllm", "full"), "tokens_per_s"),
)


def markdown(report: dict) -> str:
    rows = report["rows"]
    lines = [
        "| load | server | method | answered / refused / lost | tokens/s (rounds' range) | TTFT p50 / p95 s "
        "| inter-token p50 / p95 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = r.get("rounds_tokens_per_s") or [r["tokens_per_s"]]
        lines.append(
            f"| {r['load']} | {r['server']} | {r['method']} | {r['answered']} / {r['refused']} / {r['lost']} "
            f"| {r['tokens_per_s']:.1f} ({min(spread):.0f}-{max(spread):.0f}) "
            f"| {r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} "
            f"| {1e3 * r['itl_p50_s']:.0f} / {1e3 * r['itl_p95_s']:.0f} |"
        )
    lines += ["", "| ratio | load | value |", "|---|---|---|"]
    for load in LOADS:
        pick = {(r["server"], r["method"]): r for r in rows if r["load"] == load}
        for what, top, bottom, key in RATIOS:
            if top in pick and bottom in pick and pick[bottom][key]:
                lines.append(f"| {what} | {load} | **{pick[top][key] / pick[bottom][key]:.2f}x** |")
    for server in SERVERS:
        pick = {r["load"]: r for r in rows if r["server"] == server and r["method"] == "full"}
        if "streams" in pick and "streams + arrivals" in pick:
            value = pick["streams + arrivals"]["itl_p95_s"] / pick["streams"]["itl_p95_s"]
            lines.append(
                f"| {server}: streams' inter-token p95, long prompts arriving / none | streams | **{value:.2f}x** |"
            )
    meta = report["meta"]
    lines += [
        "",
        f"Host: {meta['host']['cpu']} ({meta['host']['cpu_class']}), {meta['host']['cores']} cores; "
        f"{meta['model']} in {meta['dtype']} on every server; vLLM {meta['vllm']}; the median of "
        f"{meta.get('rounds', 1)} rounds of each load.",
    ]
    return "\n".join(lines)


def vllm_version() -> str:
    out = subprocess.run(
        [str(ROOT / ".venv-vllm/bin/python"), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "not installed"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loads", nargs="+", choices=list(LOADS), default=list(LOADS))
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    p.add_argument("--limit-s", type=float, default=900, help="time limit of each load; later answers are lost")
    p.add_argument("--rounds", type=int, default=3, help="runs of each load; the median round is reported")
    p.add_argument("--out", type=Path, required=True, help="folder for serve_vs_vllm.json and .md")
    args = p.parse_args()
    if any(s != "squeezegen" for s in args.servers) and not (ROOT / ".venv-vllm/bin/python").exists():
        raise SystemExit("vLLM's CPU build is not installed: run `make vllm-env` first (or --servers squeezegen)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "serve_vs_vllm.json"
    report = json.loads(path.read_text()) if path.exists() else {"rows": []}
    _, tok = sg.load(MODEL)
    report["meta"] = {
        "host": host(),
        "model": MODEL,
        "dtype": "bfloat16",
        "vllm": vllm_version(),
        "loads": {name: asdict(load) for name, load in LOADS.items()},
        "rounds": args.rounds,
    }
    done = {(r["server"], r["load"], r["method"]) for r in report["rows"]}
    todo = [c for c in cases(args.loads) if c[0] in args.servers and (c[0], c[1], label(c[2])) not in done]
    by_server: dict[str, list] = {}
    for server, load, method in todo:
        by_server.setdefault(server, []).append((load, method))
    for server, runs in by_server.items():
        port, log = free_port(), args.out / (re.sub(r"\W+", "-", server) + ".log")
        proc = start_server(server, port, log)
        try:
            wait_ready(proc, port, log)
            for name, method in runs:
                load = LOADS[name]
                texts = passages(tok, load.clients, load.prompt_tokens, offset=17 * load.prompt_tokens)
                texts += passages(tok, load.arrivals, load.arrival_tokens, offset=5000) if load.arrivals else []
                prompts = [f"Continue this text.\n\n{text}" for text in texts]
                print(f"{server}: {name}, {label(method)} ...", file=sys.stderr, flush=True)
                row = asyncio.run(run_load(port, server, load, prompts, method, args.limit_s, args.rounds))
                report["rows"].append({"server": server, "load": name, "method": label(method), **row})
                path.write_text(json.dumps(report, indent=1))
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    order = {(s, n, label(m)): i for i, (s, n, m) in enumerate(cases(list(LOADS)))}
    report["rows"].sort(key=lambda r: order.get((r["server"], r["load"], r["method"]), len(order)))
    path.write_text(json.dumps(report, indent=1))
    (args.out / "serve_vs_vllm.md").write_text(markdown(report) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
