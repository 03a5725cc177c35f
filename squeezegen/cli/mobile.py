"""`squeezegen mobile ...`: export, check, generate, and the miniature digits model.

Heavy imports (litert_torch, diffusers, ai_edge_*) happen inside the commands, so `squeezegen --help`
stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from squeezegen.cli import common
from squeezegen.errors import MissingDependencyError, SqueezegenError
from squeezegen.evals.report import claim, refuse_unwritable

RECIPE_NAMES = ("fp32", "fp16", "int8-weight-only", "int8-dynamic")
PROBE_PROMPT = "a photograph of an astronaut riding a horse on the moon"  # the GPU check's denoising step


def _require_mobile() -> None:
    import importlib.util

    missing = [m for m in ("litert_torch", "ai_edge_litert", "diffusers") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"{', '.join(missing)} not installed: pip install 'squeezegen[mobile]'")


def _check_model_arg(model: str) -> None:
    from squeezegen.mobile.pipeline_config import CONFIGS

    if model in CONFIGS:
        return
    path = Path(model)
    if not path.is_dir():
        raise SqueezegenError(
            f"model folder {path} does not exist: pass a diffusers SD folder or one of {', '.join(CONFIGS)}"
        )


def _sampling(args: argparse.Namespace) -> dict:
    """The denoising flags that `mobile generate` and `mobile eval-mini` share."""
    return {"steps": args.steps, "guidance": args.guidance, "seed": args.seed}


def _write_json(path: str, data: object) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2))


def cmd_export(args: argparse.Namespace) -> None:
    from squeezegen.mobile.quantize import check_recipe

    check_recipe(args.recipe)
    _check_model_arg(args.model)
    refuse_unwritable(Path(args.out))
    _require_mobile()
    from squeezegen.mobile.export import export_pipeline, module_files
    from squeezegen.mobile.rewrites import RewriteConfig

    if args.attention_bytes < 2**16:
        raise SqueezegenError(f"--attention-bytes {args.attention_bytes} is too small: give at least 65536 (64 KiB)")
    rewrites = RewriteConfig(split_threshold=args.split_threshold, attention_bytes=args.attention_bytes)
    rewrites = rewrites.disabled(*args.no_rewrite)
    manifest = export_pipeline(
        args.model,
        args.out,
        recipe=args.recipe,
        rewrites=rewrites,
        unet_parts=args.unet_parts,
        height=args.height,
        width=args.width,
        modules=tuple(args.modules),
        overwrite=args.overwrite,
    )
    for name, entry in manifest["modules"].items():
        files = ", ".join(module_files(entry))
        took = f"{entry['convert_s']:.1f} s" if name in args.modules else "kept from the earlier export"
        print(f"{name:13s} {entry['bytes'] / 2**20:9.2f} MiB  {files}  ({took})")
    print(f"manifest: {Path(args.out) / 'manifest.json'}")


def cmd_check(args: argparse.Namespace) -> None:
    if args.json:
        claim({"json": Path(args.json)}, args.overwrite, flag="--json")
    for path in args.files:
        if not Path(path).is_file():
            raise SqueezegenError(f"{path} does not exist: pass .tflite files written by `squeezegen mobile export`")
    if args.accelerator == "gpu":
        rows = _check_on_gpu(args.files)
    else:
        rows = _check_static(args.files, args.backend)
    if args.json:
        _write_json(args.json, rows)
    if not all(row["ok"] for row in rows):
        raise SystemExit(1)


def _check_static(files: list[str], backend: str) -> list[dict]:
    from squeezegen.mobile.check import check_tflite

    rows = []
    for path in files:
        report = check_tflite(path, backend=backend)
        total = sum(report.ops.values())
        off = sum(report.off_gpu.values())
        status = "GPU ok" if report.ok else f"{off} of {total} ops off the GPU"
        if report.fully_accelerated is False and not off:
            status = "GPU accelerator reports a CPU fallback"
        print(f"{path}: {total} ops, {status} [{report.method}]")
        for reason, count in sorted(report.off_gpu.items()):
            print(f"  {count:5d} x {reason}")
        rows.append(
            {
                "path": report.path,
                "method": report.method,
                "ops": dict(report.ops),
                "off_gpu": dict(report.off_gpu),
                "ok": report.ok,
            }
        )
    return rows


def _check_on_gpu(files: list[str]) -> list[dict]:
    """Each file executed on LiteRT's GPU accelerator alone (fp16) and on the CPU (fp32); files of an export
    folder get the inputs the pipeline gives them, others seeded random ones."""
    from dataclasses import asdict

    from squeezegen.mobile.accelerator import check_on_gpu
    from squeezegen.mobile.check import check_tflite

    _require_mobile()
    driver = _open_gpu_path()
    recorded: dict[Path, dict] = {}
    rows = []
    for path in files:
        static = check_tflite(path, backend="static")  # also refuses a truncated or foreign file first
        inputs = _export_inputs(Path(path), recorded)
        result = check_on_gpu(path, inputs=inputs)
        row = asdict(result) | {"ok": result.ok, "verdict": result.verdict(), "driver": driver.kind}
        row |= {"inputs": "pipeline" if inputs is not None else "seeded", "static_ok": static.ok}
        rows.append(row)
        detail = ""
        if result.runs_on_gpu:
            detail = (
                f"on {result.adapter}: fp16 vs fp32 max abs {result.max_abs_error:.3g} "
                f"({result.rel_error:.2%} of range), {'finite' if result.finite else 'NON-FINITE'}, "
                f"{result.gpu_s * 1e3:.1f} ms GPU / {result.cpu_s * 1e3:.1f} ms CPU; "
            )
        table = "ok" if static.ok else f"{sum(static.off_gpu.values())} ops off the GPU"
        print(f"{path}: {detail}{result.verdict()} [static table: {table}]")
    return rows


def _open_gpu_path():
    """The Vulkan driver LiteRT's GPU accelerator will use (no driver: one line and exit 2 before any
    work), with LiteRT's native log kept off the terminal."""
    from squeezegen.mobile import vulkan
    from squeezegen.mobile.accelerator import quiet_native_log

    driver = vulkan.activate()
    quiet_native_log()
    return driver


def _export_inputs(path: Path, recorded: dict[Path, dict]) -> dict | None:
    """The pipeline's inputs for a file of an export folder (one CPU step per folder), else None."""
    from squeezegen.mobile.export import MANIFEST
    from squeezegen.mobile.pipeline import file_inputs

    folder = path.resolve().parent
    if not (folder / MANIFEST).is_file():
        return None
    if folder not in recorded:
        try:
            recorded[folder] = file_inputs(folder, PROBE_PROMPT)
        except SqueezegenError:  # an incomplete export: its files are still checked, on seeded inputs
            recorded[folder] = {}
    return recorded[folder].get(path.name)


def cmd_generate(args: argparse.Namespace) -> None:
    if not args.prompt.strip():
        raise SqueezegenError("the prompt is empty: pass --prompt TEXT")
    refuse_unwritable(Path(args.out))
    from squeezegen.mobile.export import load_manifest

    load_manifest(args.model)
    _require_mobile()
    from squeezegen.mobile.pipeline import generate_from_folder, save_png

    if args.accelerator == "gpu":
        _open_gpu_path()

    res = generate_from_folder(
        args.model,
        [args.prompt],
        threads=args.threads,
        accelerator=args.accelerator,
        scheduler=args.scheduler,
        negative_prompt=args.negative_prompt,
        **_sampling(args),
    )
    path = save_png(res.images[0], args.out)
    t = res.timings
    print(
        f"{path}: {res.images.shape[2]}x{res.images.shape[1]}, UNet {t['unet_s']:.2f} s for {t['unet_calls']} calls, "
        f"text encoder {t['text_encoder_s']:.2f} s, VAE {t['vae_s']:.2f} s on {t['adapter']}",
        file=sys.stderr,
    )


def cmd_train_mini(args: argparse.Namespace) -> None:
    refuse_unwritable(Path(args.out))
    _require_mobile()
    from squeezegen.mobile.miniature import train_mini

    out = train_mini(args.out, vae_steps=args.vae_steps, unet_steps=args.unet_steps, batch=args.batch, seed=args.seed)
    print(f"saved {out}")


def cmd_eval_mini(args: argparse.Namespace) -> None:
    from squeezegen.mobile.export import earlier_export

    if not Path(args.model).is_dir():
        raise SqueezegenError(f"model folder {args.model} does not exist: run `squeezegen mobile train-mini` first")
    for recipe in args.recipes:
        if recipe not in RECIPE_NAMES:
            raise SqueezegenError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPE_NAMES)}")
    for recipe in args.recipes:  # before any export, not after the first one
        earlier_export(Path(args.work) / recipe, args.overwrite)
    if args.json:
        claim({"json": Path(args.json)}, args.overwrite, flag="--json")
    _require_mobile()
    from squeezegen.mobile.miniature import evaluate_mini

    if args.accelerator == "gpu":
        _open_gpu_path()

    res = evaluate_mini(
        args.model,
        args.work,
        recipes=tuple(args.recipes),
        per_digit=args.per_digit,
        png_dir=args.png_dir,
        overwrite=args.overwrite,
        accelerator=args.accelerator,
        **_sampling(args),
    )
    print("| backend | accuracy | size (MiB) | mean abs pixel diff vs PyTorch |")
    print("|---|---|---|---|")
    for name, r in res["backends"].items():
        size = f"{r['bytes'] / 2**20:.2f}" if "bytes" in r else "-"
        diff = f"{r['mean_abs_pixel_diff_vs_pytorch']:.2f}" if "mean_abs_pixel_diff_vs_pytorch" in r else "-"
        print(f"| {name} | {r['accuracy']:.3f} | {size} | {diff} |")
    if args.json:
        _write_json(args.json, res)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The `mobile` command tree (export / check / generate / train-mini / eval-mini)."""
    mobile = sub.add_parser("mobile", help="Stable Diffusion on phones: LiteRT export, GPU check, LiteRT pipeline")
    msub = mobile.add_subparsers(dest="mobile_command", required=True)

    p = msub.add_parser("export", help="export a diffusers SD pipeline to text-encoder / UNet / VAE-decoder .tflite")
    p.add_argument("--model", required=True, help="diffusers SD 1.x/2.x folder, tiny-sd, or sd15 / sd21-base (random)")
    p.add_argument(
        "--out",
        type=common.output_path,
        required=True,
        help="output folder (three .tflite files + manifest.json), new or empty",
    )
    p.add_argument("--recipe", default="fp32", help=f"one of {', '.join(RECIPE_NAMES)}")
    p.add_argument("--unet-parts", type=int, default=1, help="split the UNet into this many files (full-size SD)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the UNet's sample size x 8)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument(
        "--modules",
        nargs="+",
        default=["text_encoder", "unet", "vae_decoder"],
        help="export only these; with --overwrite the other modules of the export in --out are kept",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the export in --out: the modules exported now replace theirs, the others stay (recipe, size "
        "and other settings must match), and files no export wrote are kept; the folder changes only once the "
        "export has finished",
    )
    p.add_argument(
        "--no-rewrite",
        nargs="*",
        default=[],
        choices=["group_norm", "gelu", "attention", "split", "timestep"],
        help="disable GPU-safe rewrites (to see what they fix)",
    )
    p.add_argument("--split-threshold", type=int, default=2**23, help="largest conv/linear weight kept whole")
    p.add_argument(
        "--attention-bytes",
        type=int,
        default=2**26,
        help="largest attention-score tensor (fp16 bytes) computed at once; larger ones go in query blocks "
        "(a GPU's largest buffer: 128 MiB on lavapipe)",
    )
    p.set_defaults(func=cmd_export)

    p = msub.add_parser(
        "check", help="will the files run on a mobile GPU: static op table, or executed on LiteRT's GPU accelerator"
    )
    p.add_argument("files", nargs="+", help=".tflite files")
    p.add_argument(
        "--accelerator",
        choices=["gpu"],
        default=None,
        help="gpu: execute each file on LiteRT's GPU accelerator alone (fp16) and on the CPU (fp32); exit 1 if one "
        "is rejected, gives inf/NaN or differs by more than the fp16 tolerance; needs a Vulkan driver (make gpu-sw)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "static", "gpu"],
        help="without --accelerator: the static op table (static), the accelerator's compile-time verdict too "
        "(gpu), or both where a driver exists (auto)",
    )
    p.add_argument("--json", default=None, help="also write the op census here (a new file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=cmd_check)

    p = msub.add_parser("generate", help="text-to-image with the exported LiteRT files only")
    p.add_argument("--model", required=True, help="folder written by `squeezegen mobile export`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--out", type=common.output_path, default="image.png")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default="dpm++", choices=["dpm++", "euler"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="LiteRT CPU threads")
    p.add_argument(
        "--accelerator",
        choices=["cpu", "gpu"],
        default="cpu",
        help="gpu: every file on LiteRT's GPU accelerator in fp16, no CPU fallback (needs Vulkan: make gpu-sw)",
    )
    p.set_defaults(func=cmd_generate)

    p = msub.add_parser("train-mini", help="train the miniature digits text-to-image model")
    p.add_argument("--out", type=common.output_path, default="runs/mini-digits")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--unet-steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_mini)

    p = msub.add_parser("eval-mini", help="classifier accuracy: PyTorch vs exported LiteRT recipes")
    p.add_argument("--model", default="runs/mini-digits")
    p.add_argument("--work", default="runs/mini-digits-litert", help="where the exports go")
    p.add_argument("--recipes", nargs="+", default=list(RECIPE_NAMES))
    p.add_argument("--per-digit", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png-dir", default=None)
    p.add_argument(
        "--accelerator",
        choices=["cpu", "gpu"],
        default="cpu",
        help="run the LiteRT recipes on the CPU interpreter or on LiteRT's GPU accelerator in fp16",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace earlier exports in --work and the --json file")
    p.set_defaults(func=cmd_eval_mini)
