"""The vLLM plugin beside squeezegen: needle accuracy and KV blocks in use per method, one run.

Starts `python -m squeezegen.integrations.vllm serve` (vLLM's CPU build, `make vllm-env`) on the
bundled SmolLM2-135M in float32, asks each needle sample through the OpenAI client with each
method, samples vLLM's own `vllm:kv_cache_usage_perc` while the answer streams, and answers the
same samples with `sg.generate` and the same method (what `squeezegen serve` runs). Usage:
    python benchmarks/vllm_plugin.py --context 3000 --samples 4 --out docs/results/vllm-plugin
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import openai

import squeezegen as sg
from squeezegen.evals.tasks import make_sample
from squeezegen.methods.registry import method
from squeezegen.models.bundled import BUNDLED, dequantized_folder
from squeezegen.runtime.device import host

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    ("full", {}),
    ("snapkv", {"budget": 0.25}),
    ("snapkv", {"budget": 0.25, "heads": "shared"}),
    ("pyramidkv", {"budget": 0.25}),
    ("streaming_llm", {"budget": 0.25}),
]


def usage(port: int) -> tuple[float, int]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    lines = text.splitlines()
    perc = float(next(line for line in lines if line.startswith("vllm:kv_cache_usage_perc")).split()[-1])
    info = next(line for line in lines if line.startswith("vllm:cache_config_info"))
    return perc, int(info.split('num_gpu_blocks="')[1].split('"')[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=3000)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    folder = dequantized_folder(BUNDLED["smollm2-135m"])
    command = [str(ROOT / ".venv-vllm/bin/python"), "-m", "squeezegen.integrations.vllm", "serve", str(folder)]
    command += ["--port", str(args.port), "--host", "127.0.0.1", "--served-model-name", "smollm2"]
    command += ["--dtype", "float32", "--max-model-len", "4096"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.time()
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{args.port}/v1/models", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() - started > 900:
                    raise SystemExit(
                        "vllm serve did not start: make vllm-env, then run it by hand to see why"
                    ) from None
                time.sleep(2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="-")
        model, tok = sg.load("smollm2-135m", dtype="float32")
        samples = [make_sample("niah_number", tok, args.context, seed=500 + i) for i in range(args.samples)]
        rows = []
        for name, margs in CONFIGS:
            extra = {"vllm_xargs": {"squeezegen": json.dumps({"method": name, "args": margs})}}
            served = local = same = 0.0
            blocks = []
            for sample in samples:
                messages = [{"role": "user", "content": sample.prompt}]
                stream = client.chat.completions.create(
                    model="smollm2",
                    messages=messages,
                    max_tokens=args.new_tokens,
                    temperature=0,
                    stream=True,
                    extra_body=extra,
                )
                pieces = []
                for i, chunk in enumerate(stream):
                    if chunk.choices and chunk.choices[0].delta.content:
                        pieces.append(chunk.choices[0].delta.content)
                    if i == 8:
                        perc, total = usage(args.port)
                        blocks.append(round(perc * total))
                text = "".join(pieces)
                ours = sg.generate(
                    model, tok, sample.prompt, max_new_tokens=args.new_tokens, chat=True, method=method(name, **margs)
                ).texts[0]
                served += sample.score(text)
                local += sample.score(ours)
                same += text == ours
            rows.append(
                {
                    "method": name,
                    "args": margs,
                    "vllm_plugin_accuracy": served / len(samples),
                    "squeezegen_accuracy": local / len(samples),
                    "same_answer": same / len(samples),
                    "kv_blocks_in_use": sum(blocks) / len(blocks),
                }
            )
            print(rows[-1], flush=True)
            save(args, rows)  # as it goes: a run cut short keeps the configurations it finished
    finally:
        server.terminate()
        server.wait(60)
    print(markdown_table(rows))


def save(args: argparse.Namespace, rows: list[dict]) -> None:
    meta = {**vars(args), "out": str(args.out), "host": host(), "block_size": 128, "model": "smollm2-135m"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm_plugin.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (args.out / "vllm_plugin.md").write_text(markdown_table(rows) + "\n")


def markdown_table(rows: list[dict]) -> str:
    full = next(row["kv_blocks_in_use"] for row in rows if row["method"] == "full")
    lines = [
        "| method | args | needle accuracy, vLLM + plugin | needle accuracy, squeezegen | same answer | "
        "KV blocks in use while decoding | vs full |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        args = ", ".join(f"{k}={v}" for k, v in row["args"].items()) or "-"
        lines.append(
            f"| {row['method']} | {args} | {row['vllm_plugin_accuracy']:.2f} | {row['squeezegen_accuracy']:.2f} | "
            f"{row['same_answer']:.2f} | {row['kv_blocks_in_use']:.1f} | {row['kv_blocks_in_use'] / full:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
