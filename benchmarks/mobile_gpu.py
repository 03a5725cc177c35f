"""Exports executed on LiteRT's GPU accelerator (fp16, no CPU fallback) against the CPU in fp32: per
model, recipe and part, and with each GPU-safe rewrite turned off, does it run on the GPU alone, is it
finite, how far is fp16 from fp32, and what did the static op table predict.

    python benchmarks/mobile_gpu.py --model tiny-sd --recipes fp32 fp16 int8-weight-only int8-dynamic \
        --rewrites-off group_norm gelu attention split timestep --work runs/mobile-gpu \
        --log docs/results/mobile/gpu_check.jsonl

Rewrite-less exports use the fp32 recipe (the GPU computes in fp16 whatever the file stores). Every file
gets the inputs the pipeline gives it in one denoising step (real token embeddings, text states, the
latents UNet part k receives from parts 0..k-1). One JSON line per file, appended as it is measured;
a rerun skips the (model, recipe, rewrite off, file) rows already in the log. The adapter is recorded:
on the software driver (llvmpipe) timings are CPU rendering, not a phone's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from squeezegen.mobile import vulkan
from squeezegen.mobile.accelerator import check_on_gpu, quiet_native_log
from squeezegen.mobile.check import check_tflite
from squeezegen.mobile.export import export_pipeline, load_manifest, module_files
from squeezegen.mobile.rewrites import RewriteConfig
from squeezegen.runtime.device import host


def variants(recipes: list[str], rewrites_off: list[str]) -> list[tuple[str, str]]:
    """(recipe, rewrite turned off or "none") pairs: every recipe with all rewrites, then fp32 without each."""
    return [(r, "none") for r in recipes] + [("fp32", off) for off in rewrites_off]


def done_rows(log: Path) -> set[tuple]:
    if not log.is_file():
        return set()
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {(r["model"], r["recipe"], r["rewrite_off"], r["file"]) for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-sd", help="tiny-sd, sd15, sd21-base or a diffusers SD folder")
    ap.add_argument("--label", default=None, help="the model's name in the log (default: --model)")
    ap.add_argument("--recipes", nargs="+", default=["fp32", "fp16", "int8-weight-only", "int8-dynamic"])
    ap.add_argument("--rewrites-off", nargs="*", default=["group_norm", "gelu", "attention", "split", "timestep"])
    ap.add_argument("--unet-parts", type=int, default=1)
    ap.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    ap.add_argument("--work", default="runs/mobile-gpu")
    ap.add_argument("--log", default="docs/results/mobile/gpu_check.jsonl")
    args = ap.parse_args()
    driver = vulkan.activate()
    quiet_native_log()
    label = args.label or Path(args.model).name
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    done = done_rows(log)
    for recipe, off in variants(args.recipes, args.rewrites_off):
        folder = Path(args.work) / label / f"{recipe}-{'all' if off == 'none' else 'no-' + off}"
        if not (folder / "manifest.json").is_file():
            rewrites = RewriteConfig() if off == "none" else RewriteConfig().disabled(off)
            t0 = time.perf_counter()
            export_pipeline(
                args.model,
                folder,
                recipe=recipe,
                rewrites=rewrites,
                unet_parts=args.unet_parts,
                height=args.size,
                width=args.size,
            )
            print(f"exported {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
        manifest = load_manifest(folder)
        files = [f for name in ("text_encoder", "unet", "vae_decoder") for f in module_files(manifest["modules"][name])]
        if all((label, recipe, off, f) in done for f in files):
            continue
        from squeezegen.mobile.pipeline import file_inputs

        inputs = file_inputs(folder, "a photograph of an astronaut riding a horse on the moon")
        for name in files:
            if (label, recipe, off, name) in done:
                continue
            static = check_tflite(folder / name, backend="static")
            result = check_on_gpu(folder / name, inputs=inputs.get(name))
            row = {
                "model": label,
                "recipe": recipe,
                "rewrite_off": off,
                "file": name,
                "runs_on_gpu": result.runs_on_gpu,
                "error": result.error,
                "finite": result.finite,
                "rel_error": result.rel_error,
                "max_abs_error": result.max_abs_error,
                "ok": result.ok,
                "gpu_s": result.gpu_s,
                "cpu_s": result.cpu_s,
                "static_ok": static.ok,
                "static_off_gpu": dict(static.off_gpu),
                "adapter": result.adapter,
                "driver": driver.kind,
                "image": manifest["image"],
                "host": host(),
            }
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{label} {recipe} no-{off} {name}: {result.verdict()}", flush=True)


if __name__ == "__main__":
    main()
