"""The engine beside the peers a user would pick instead, side by side in one run.

Each configuration prefills the same real-text prompt (the same token ids) and greedily decodes
`--new-tokens` tokens; the engine decodes through its fused forward run in C (runtime/native_step.py,
the default), the same forward as torch operations, and the HF layers (the path before both), in
float32 and bf16, and in C with 4-bit weights (`sg.quantize_`) and packed BinaryMoS layers (an
untrained `sg.binarize_` + `sg.pack_`: the same bytes and kernels as a trained one). Decode's
achieved bytes/s (weights + KV read per step) is set beside the machine's copy bandwidth measured
in the same run. Peers: Hugging Face `generate` (eager, and with `cache_implementation="static"` +
`torch.compile`, the transformers docs' recipe) and llama.cpp through llama-cpp-python on the very
GGUF file the bundled model ships (optional: `pip install 'squeezegen[peers]'`, built from source).
Usage:
    python benchmarks/engine_vs_peers.py --contexts 2048 8192 --new-tokens 64 --out docs/results/peers
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from squeezegen.evals.corpus import prose
from squeezegen.models.bundled import BUNDLED
from squeezegen.models.loading import load
from squeezegen.quant import BinaryMoSConfig, Int4WeightOnlyConfig, binarize_, pack_, quantize_
from squeezegen.runtime.device import auto_dtype, host
from squeezegen.runtime.engine import Engine
from squeezegen.runtime.timing import synchronize


def copy_bandwidth(device: torch.device, mib: int = 256) -> float:
    """Bytes/s a plain tensor copy moves (read + write), median of 5."""
    src = torch.empty(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        runs.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(runs)


def weight_bytes(model) -> int:
    """Bytes a decode step reads of the weights: every parameter and buffer once (a tied lm_head
    once), less an embedding the head does not share (a step reads one row of it)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())}
    embedding = model.get_input_embeddings().weight
    head = {t.data_ptr() for t in model.get_output_embeddings().parameters()}
    return sum(seen.values()) - (0 if embedding.data_ptr() in head else embedding.numel() * embedding.element_size())


def kv_bytes_per_token(model, dtype: torch.dtype) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def run_engine(
    model, ids: torch.Tensor, new_tokens: int, compile: bool, fused: bool = True, native: bool = True
) -> dict:
    engine = Engine(model, reserve=new_tokens - 1, compile=compile, fused=fused, native=native)
    start = time.perf_counter()
    token = engine.prefill(ids).argmax(-1)
    synchronize(ids.device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = engine.decode(token).argmax(-1)
    synchronize(ids.device)
    return {"prefill_s": prefill, "decode_tok_s": (new_tokens - 1) / (time.perf_counter() - start)}


def run_hf(model, ids: torch.Tensor, new_tokens: int) -> dict:
    """HF generate: prefill timed as a 1-token generation, decode as the difference."""
    kwargs = dict(do_sample=False, attention_mask=torch.ones_like(ids))
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
    synchronize(ids.device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    synchronize(ids.device)
    return {"prefill_s": prefill, "decode_tok_s": (new_tokens - 1) / max(time.perf_counter() - start - prefill, 1e-9)}


def run_llama_cpp(ids: list[int], new_tokens: int, threads: int) -> dict:
    from llama_cpp import Llama

    gguf = BUNDLED["smollm2-135m"].gguf_path()
    llm = Llama(model_path=str(gguf), n_ctx=len(ids) + new_tokens + 8, n_threads=threads, verbose=False)
    start = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = llm.sample(top_k=1, temp=0.0)
        llm.eval([token])
    return {"prefill_s": prefill, "decode_tok_s": (new_tokens - 1) / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--contexts", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip", nargs="*", default=[], help="labels of configurations to leave out")
    parser.add_argument("--out", default=None, help="folder for peers.md and peers.json")
    args = parser.parse_args()
    device = torch.device("cpu")
    auto = auto_dtype(device)
    models = {dtype: load(args.model, dtype=dtype)[0] for dtype in {torch.float32, torch.bfloat16, auto}}
    tok = load(args.model)[1]
    int4 = quantize_(load(args.model, dtype=auto)[0], Int4WeightOnlyConfig())
    binary = pack_(binarize_(load(args.model, dtype=auto)[0], BinaryMoSConfig(experts=4)))
    text = tok(prose(tok, max(args.contexts) + 512, seed=7)).input_ids
    bandwidth = copy_bandwidth(device)
    n = args.new_tokens
    configs: dict[str, tuple[torch.dtype, Callable]] = {
        "engine float32 C step": (torch.float32, lambda m, ids: run_engine(m, ids, n, False)),
        "engine bfloat16 C step": (torch.bfloat16, lambda m, ids: run_engine(m, ids, n, False)),
        f"engine {str(auto)[6:]} C step, 4-bit weights": (
            auto,
            lambda m, ids: run_engine(int4, ids, n, False),
        ),
        f"engine {str(auto)[6:]} C step, packed BinaryMoS": (
            auto,
            lambda m, ids: run_engine(binary, ids, n, False),
        ),
        "engine float32 fused torch ops": (torch.float32, lambda m, ids: run_engine(m, ids, n, False, native=False)),
        "engine bfloat16 fused torch ops": (torch.bfloat16, lambda m, ids: run_engine(m, ids, n, False, native=False)),
        "engine float32 HF layers": (torch.float32, lambda m, ids: run_engine(m, ids, n, False, False)),
        "engine bfloat16 HF layers": (torch.bfloat16, lambda m, ids: run_engine(m, ids, n, False, False)),
        f"engine {str(auto)[6:]} compiled (auto dtype)": (
            auto,
            lambda m, ids: run_engine(m, ids, args.new_tokens, True),
        ),
        "HF generate float32": (torch.float32, lambda m, ids: run_hf(m, ids, args.new_tokens)),
        "HF generate bfloat16": (torch.bfloat16, lambda m, ids: run_hf(m, ids, args.new_tokens)),
        "HF static cache + compile": (auto, None),
    }
    if importlib.util.find_spec("llama_cpp") is not None:
        configs["llama.cpp Q4_1 (GGUF)"] = (None, None)
    rows = []
    for context in args.contexts:
        ids = torch.tensor([text[:context]])
        for label, (dtype, fn) in configs.items():
            if label in args.skip:
                continue
            print(f"{context} {label} ...", flush=True)
            if label.startswith("llama.cpp"):
                result = run_llama_cpp(ids[0].tolist(), args.new_tokens, torch.get_num_threads())
                weights = BUNDLED["smollm2-135m"].gguf_path().stat().st_size
                kv_token = kv_bytes_per_token(models[torch.float32], torch.float16)
            elif label.startswith("HF static"):
                result = run_hf_static_compiled(models[dtype], ids, args.new_tokens)
                weights, kv_token = weight_bytes(models[dtype]), kv_bytes_per_token(models[dtype], dtype)
            else:
                # warm-up; a compiled configuration compiles for this very shape first
                fn(models[dtype], ids if "compiled" in label else ids[:, :256])
                result = fn(models[dtype], ids)
                model = int4 if "4-bit" in label else binary if "BinaryMoS" in label else models[dtype]
                weights, kv_token = weight_bytes(model), kv_bytes_per_token(model, dtype)
            step_bytes = weights + kv_token * (context + args.new_tokens // 2)
            rows.append(
                {
                    "context": context,
                    "config": label,
                    **result,
                    "decode_bytes_per_s": step_bytes * result["decode_tok_s"],
                    "copy_bytes_per_s": bandwidth,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    table = markdown_table(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "peers.md").write_text(table + "\n")
        meta = {**vars(args), "threads": torch.get_num_threads(), "auto_dtype": str(auto), "host": host()}
        (out / "peers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def run_hf_static_compiled(model, ids: torch.Tensor, new_tokens: int) -> dict:
    """The transformers docs' recipe: a static cache and the forward compiled (compiled by a first
    call of the same shapes; the timed calls reuse it)."""
    model.generation_config.cache_implementation = "static"
    compiled = torch.compile(model.forward)
    original, model.forward = model.forward, compiled
    try:
        run_hf(model, ids, new_tokens)
        return run_hf(model, ids, new_tokens)
    finally:
        model.forward = original
        model.generation_config.cache_implementation = None


# the reference row of each context: the engine in float32 through the HF layers ("eager" in runs
# made before the fused forward, which decoded that way)
BASELINES = ("engine float32 HF layers", "engine float32 eager")


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| context | configuration | prefill s | decode tok/s | decode GB/s (weights + KV) | copy GB/s | "
        "prefill vs engine fp32 HF layers | decode vs engine fp32 HF layers | decode vs llama.cpp |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = [x for x in rows if x["context"] == r["context"]]
        base = next(x for name in BASELINES for x in same if x["config"] == name)
        peer = next((x for x in same if x["config"].startswith("llama.cpp")), None)
        versus = f"{r['decode_tok_s'] / peer['decode_tok_s']:.2f}x" if peer else "not run"
        lines.append(
            f"| {r['context']} | {r['config']} | {r['prefill_s']:.2f} | {r['decode_tok_s']:.1f} "
            f"| {r['decode_bytes_per_s'] / 1e9:.1f} | {r['copy_bytes_per_s'] / 1e9:.1f} "
            f"| {base['prefill_s'] / r['prefill_s']:.2f}x | {r['decode_tok_s'] / base['decode_tok_s']:.2f}x "
            f"| {versus} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
