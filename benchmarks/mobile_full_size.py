"""Full-size SD 1.5 / SD 2.1-base (random weights from config) through the LiteRT export.

    OMP_NUM_THREADS=1 python benchmarks/mobile_full_size.py --model sd15 --module unet --size 512 \
        --recipe fp32 --unet-parts 4 --latency-threads 1 --out runs/full --log docs/results/mobile/full_size.jsonl

One module, one recipe, one resolution per process, so that the peak RSS (ru_maxrss) measured at the
end is that conversion's. Appends one JSON line: file sizes, conversion seconds, peak RSS and the
LiteRT CPU latency on `--latency-threads` threads of one guidance step (batch 2) for the UNet, or of
one call (batch 1, random inputs) for the text encoder and VAE decoder.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from squeezegen.mobile.export import export_pipeline


def unet_step_latency(folder: Path, manifest: dict, threads: int, repeats: int) -> list[float]:
    from ai_edge_litert.interpreter import Interpreter

    parts = manifest["modules"]["unet"]["parts"]
    runners = [
        Interpreter(model_path=str(folder / p["file"]), num_threads=threads).get_signature_runner() for p in parts
    ]
    rng = np.random.default_rng(0)
    first = parts[0]["inputs"]
    x = rng.standard_normal(first[0]["shape"]).astype(np.float32)
    t = np.full(first[1]["shape"], 500.0, np.float32)
    c = rng.standard_normal(first[2]["shape"]).astype(np.float32)

    def step() -> np.ndarray:
        state, skips = [x, t], []
        for runner, p in zip(runners, parts, strict=True):
            args = [*state, c, *skips]
            out = runner(**{spec["name"]: a for spec, a in zip(p["inputs"], args, strict=True)})
            outs = [out[spec["name"]] for spec in p["outputs"]]
            state, skips = outs[:2], outs[2:]
        return outs[0]

    step()  # warm-up (allocation, XNNPACK packing)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def call_latency(path: Path, threads: int, repeats: int) -> list[float]:
    """Seconds per call of a single-file module on random float inputs (after one warm-up call)."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path), num_threads=threads).get_signature_runner()
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(d["shape"]).astype(np.float32) for n, d in runner.get_input_details().items()}
    runner(**feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner(**feeds)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, choices=["sd15", "sd21-base"])
    ap.add_argument("--module", required=True, choices=["text_encoder", "unet", "vae_decoder"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--recipe", default="fp32")
    ap.add_argument("--unet-parts", type=int, default=1)
    ap.add_argument("--latency-threads", type=int, default=0, help="0: no latency run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="runs/full")
    ap.add_argument("--keep", action="store_true", help="keep the .tflite files")
    ap.add_argument("--log", default="docs/results/mobile/full_size.jsonl")
    args = ap.parse_args()

    folder = Path(args.out) / f"{args.model}-{args.module}-{args.recipe}-{args.size}-p{args.unet_parts}"
    t0 = time.perf_counter()
    try:
        manifest = export_pipeline(
            args.model,
            folder,
            recipe=args.recipe,
            unet_parts=args.unet_parts,
            height=args.size,
            width=args.size,
            modules=(args.module,),
        )
    except Exception as exc:  # a failed conversion is a result too: log its cause, then fail
        failed = {k: getattr(args, k) for k in ("model", "module", "recipe", "size", "unet_parts")}
        failed.update(error=f"{type(exc).__name__}: {exc}"[:500], after_s=round(time.perf_counter() - t0, 1))
        failed["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        with open(args.log, "a") as f:
            f.write(json.dumps(failed) + "\n")
        raise
    entry = manifest["modules"][args.module]
    record = {
        "model": args.model,
        "module": args.module,
        "recipe": args.recipe,
        "size": args.size,
        "unet_parts": args.unet_parts if args.module == "unet" else None,
        "bytes": entry["bytes"],
        "part_bytes": [p["bytes"] for p in entry.get("parts", [])] or None,
        "token_embedding_bytes": manifest["token_embedding"]["bytes"],
        "export_s": round(time.perf_counter() - t0, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    if args.module == "unet" and args.latency_threads:
        times = unet_step_latency(folder, manifest, args.latency_threads, args.repeats)
        record.update(latency_threads=args.latency_threads, unet_step_s=[round(x, 2) for x in times], cfg_batch=2)
    elif args.latency_threads:
        times = call_latency(folder / entry["file"], args.latency_threads, args.repeats)
        record.update(latency_threads=args.latency_threads, call_s=[round(x, 3) for x in times], batch=1)
    if args.latency_threads:
        record["peak_rss_gib_with_latency"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(record))
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "a") as f:
        f.write(json.dumps(record) + "\n")
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
