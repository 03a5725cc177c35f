"""diffusers SD pipeline -> three LiteRT files (text encoder, UNet, VAE decoder) + manifest.json.

Rewrites are applied to copies of the modules; the token-embedding table is written beside the files
and looked up on the host (a LiteRT GPU graph cannot index it: the delegate rejects EMBEDDING_LOOKUP
and int32 tensors), so every op of the three files stays on the GPU path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from squeezegen.errors import MissingDependencyError, SqueezegenError
from squeezegen.mobile.modules import TextEncoder, UNetPart, VaeDecoder, plan_unet_parts, skip_count, unet_stages
from squeezegen.mobile.pipeline_config import CONFIGS, SDParts, build_parts, build_pipeline, load_parts
from squeezegen.mobile.quantize import check_recipe, quant_config
from squeezegen.mobile.rewrites import RewriteConfig, apply_rewrites, count_replacements

MANIFEST = "manifest.json"
FORMAT = 1
MODULES = ("text_encoder", "unet", "vae_decoder")


def _litert_torch():
    try:
        import litert_torch
    except ImportError as exc:
        raise MissingDependencyError("export needs litert-torch: pip install 'squeezegen[mobile]'") from exc
    return litert_torch


def resolve_model(model: str | Path, workdir: Path) -> SDParts:
    """A built-in name (tiny-sd, sd15, sd21-base: random weights) or a local diffusers folder."""
    name = str(model)
    if name == "tiny-sd":
        return load_parts(build_pipeline(name, workdir / name))
    if name in CONFIGS:
        parts = build_parts(name)
        from squeezegen.mobile.tokenizer import write_tokenizer

        parts.tokenizer_dir = write_tokenizer(workdir / "tokenizer", max_length=CONFIGS[name]["max_length"])
        return parts
    return load_parts(Path(model))


def _io_details(path: Path) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    sig = interp.get_signature_runner()
    details = {}
    for kind, info in (("inputs", sig.get_input_details()), ("outputs", sig.get_output_details())):
        # names are args_0.. / output_0..; the runner lists them as strings (args_10 before args_2): sort by index
        items = sorted(info.items(), key=lambda kv: (len(kv[0]), kv[0]))
        details[kind] = [
            {"name": n, "shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name} for n, d in items
        ]
    return details


def convert_module(module: torch.nn.Module, args: tuple, path: Path, recipe: str) -> dict:
    """Convert one module with a recipe, write it, and return its manifest entry."""
    litert_torch = _litert_torch()
    t0 = time.perf_counter()
    edge = litert_torch.convert(module.eval(), args, quant_config=quant_config(recipe))
    edge.export(str(path))
    del edge
    entry = {"file": path.name, "bytes": path.stat().st_size, "convert_s": round(time.perf_counter() - t0, 2)}
    entry.update(_io_details(path))
    return entry


def export_pipeline(
    model: str | Path,
    out: str | Path,
    recipe: str = "fp32",
    rewrites: RewriteConfig | None = None,
    unet_parts: int = 1,
    height: int | None = None,
    width: int | None = None,
    guidance_batch: int = 2,
    modules: tuple[str, ...] = MODULES,
    overwrite: bool = False,
) -> dict:
    """Export `model` to LiteRT files in `out`; returns (and writes) the manifest.

    Everything is written to a sibling folder that replaces `out` only once the export is complete. The
    modules of an earlier export in `out` that are not re-exported are kept (their settings must match),
    and so is every file no export wrote.
    """
    check_recipe(recipe)
    rewrites = rewrites or RewriteConfig()
    unknown = set(modules) - set(MODULES)
    if unknown:
        raise SqueezegenError(f"unknown module(s) {sorted(unknown)}: choose from {', '.join(MODULES)}")
    out = Path(out).absolute()  # `.` has no name to stage beside
    earlier = earlier_export(out, overwrite)
    kept = {k: v for k, v in (earlier or {}).get("modules", {}).items() if k not in modules}
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(f".{out.name}-export-{uuid.uuid4().hex[:8]}")
    staged.mkdir()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sd = resolve_model(model, Path(tmp))
            manifest = _settings(sd, str(model), recipe, rewrites, height, width, guidance_batch)
            _write_shared(sd, staged, manifest)
            if kept:
                _check_matches(out, earlier, manifest)
            new = _convert_modules(sd, staged, manifest, rewrites, unet_parts, modules)
        manifest["modules"] = {m: new[m] if m in new else kept[m] for m in MODULES if m in new or m in kept}
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            _carry_over(out, staged, _written_by(earlier, set(modules)) if earlier else set())
            shutil.copymode(out, staged)
        _swap_in(staged, out)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    return manifest


def earlier_export(out: Path, overwrite: bool) -> dict | None:
    """The manifest of the export in `out` (None when `out` is new or empty). Refuses a non-empty `out`
    without `overwrite`, and one with files but no manifest: there is no export there to replace."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise SqueezegenError(f"--out {out} is a file: choose a folder")
    if not any(out.iterdir()):
        return None
    if not overwrite:
        raise SqueezegenError(f"{out} is not empty: choose a new --out or pass --overwrite to replace the export in it")
    if not (out / MANIFEST).is_file():
        raise SqueezegenError(f"{out} holds files but no {MANIFEST}, so no export to replace: choose a new --out")
    return load_manifest(out)


def _settings(
    sd: SDParts,
    source: str,
    recipe: str,
    rewrites: RewriteConfig,
    height: int | None,
    width: int | None,
    guidance_batch: int,
) -> dict:
    """The manifest without its modules: what every module of one export must share."""
    unet_cfg = sd.unet.config
    factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)
    height = height or unet_cfg.sample_size * factor
    width = width or unet_cfg.sample_size * factor
    if height % (factor * 2 ** (len(unet_cfg.block_out_channels) - 1)) or width % factor:
        raise SqueezegenError(f"--height/--width must be multiples of {factor * 8}, got {height}x{width}")
    return {
        "format": FORMAT,
        "source": source,
        "recipe": recipe,
        "rewrites": asdict(rewrites),
        "image": {"height": height, "width": width, "channels": sd.vae.config.out_channels},
        "latent": {"channels": unet_cfg.in_channels, "height": height // factor, "width": width // factor},
        "guidance_batch": guidance_batch,
        "max_length": sd.max_length,
        "scheduler": sd.scheduler_config,
        "modules": {},
    }


def _check_matches(out: Path, earlier: dict, manifest: dict) -> None:
    """Refuse to keep modules of an earlier export whose settings differ: the pipeline would mix, say, two latent
    sizes or recipes."""
    differ = []
    for key, value in manifest.items():
        there = earlier.get(key)
        if key != "modules" and json.loads(json.dumps(value)) != there:
            differ.append(key if isinstance(value, dict) else f"{key} ({there!r} there, {value!r} now)")
    if differ:
        raise SqueezegenError(
            f"the export in {out} has a different {', '.join(differ)}: drop --modules to re-export all three "
            "modules, or choose a new --out"
        )


def _write_shared(sd: SDParts, out: Path, manifest: dict) -> None:
    """The tokenizer and the token-embedding table (looked up on the host), with their manifest entries."""
    if sd.tokenizer_dir is not None:
        shutil.copytree(sd.tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
        manifest["tokenizer"] = sorted(f"tokenizer/{p.name}" for p in (out / "tokenizer").iterdir())
    table = sd.text_encoder.get_input_embeddings().weight.detach().numpy()
    table = table.astype(np.float32 if manifest["recipe"] == "fp32" else np.float16)
    np.save(out / "token_embedding.npy", table)
    manifest["token_embedding"] = {"file": "token_embedding.npy", "bytes": (out / "token_embedding.npy").stat().st_size}


def _convert_modules(
    sd: SDParts, out: Path, manifest: dict, rewrites: RewriteConfig, unet_parts: int, modules: tuple[str, ...]
) -> dict:
    """Convert `modules` into `out`; returns their manifest entries."""
    recipe, lat = manifest["recipe"], manifest["latent"]
    entries: dict = {}
    with torch.no_grad():
        if "text_encoder" in modules:
            te = TextEncoder(apply_rewrites(sd.text_encoder, rewrites), sd.max_length)
            hidden = sd.text_encoder.config.hidden_size
            entry = convert_module(te, (torch.zeros(1, sd.max_length, hidden),), out / "text_encoder.tflite", recipe)
            entry["rewrites"] = count_replacements(te)
            entries["text_encoder"] = entry
        if "unet" in modules:
            unet = apply_rewrites(sd.unet, rewrites)
            batch = manifest["guidance_batch"]
            entries["unet"] = export_unet(
                unet, out, recipe, unet_parts, batch, lat["height"], lat["width"], sd, rewrites.timestep
            )
        if "vae_decoder" in modules:
            vae = VaeDecoder(apply_rewrites(sd.vae, rewrites))
            args = (torch.zeros(1, sd.vae.config.latent_channels, lat["height"], lat["width"]),)
            entry = convert_module(vae, args, out / "vae_decoder.tflite", recipe)
            entry["rewrites"] = count_replacements(vae)
            entries["vae_decoder"] = entry
    return entries


def _written_by(manifest: dict, modules: set[str]) -> set[str]:
    """The files an earlier export wrote for `modules` and for the pipeline as a whole: this export replaces them."""
    files = {MANIFEST, *manifest.get("tokenizer", [])}
    if "token_embedding" in manifest:
        files.add(manifest["token_embedding"]["file"])
    for name, entry in manifest["modules"].items():
        if name in modules:
            files.update(module_files(entry))
    return files


def module_files(entry: dict) -> list[str]:
    """The file names of one module's manifest entry (the UNet may be in parts)."""
    return entry["files"] if "files" in entry else [entry["file"]]


def _carry_over(out: Path, staged: Path, replaced: set[str]) -> None:
    """Hard-link (or copy) into `staged` every entry of `out` that this export neither wrote nor replaces:
    the kept modules and any file a user put there."""
    for root, dirs, files in os.walk(out):
        for name in dirs + files:
            src = Path(root) / name
            rel = src.relative_to(out)
            dst = staged / rel
            if rel.as_posix() in replaced or dst.exists() or dst.is_symlink():
                continue
            if src.is_symlink():
                dst.symlink_to(os.readlink(src))
            elif src.is_dir():
                dst.mkdir()
            else:
                try:
                    os.link(src, dst)
                except OSError:  # no hard links on this file system or for this file
                    shutil.copy2(src, dst)


def _swap_in(staged: Path, out: Path) -> None:
    """Replace `out` by the complete folder `staged` with two renames; if the second fails, `out` is put back."""
    if not out.exists():
        staged.rename(out)
        return
    old = out.with_name(f"{staged.name}-old")
    out.rename(old)
    try:
        staged.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old)


def unet_example_inputs(unet, batch: int, lh: int, lw: int, context_len: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, unet.config.in_channels, lh, lw, generator=g),
        torch.full((batch,), 500.0),
        torch.randn(batch, context_len, unet.config.cross_attention_dim, generator=g),
    )


def export_unet(
    unet, out: Path, recipe: str, parts: int, batch: int, lh: int, lw: int, sd: SDParts, mobile_timesteps: bool = True
) -> dict:
    """One file, or `parts` files that run in sequence and hand over (sample, temb, skip connections);
    `mobile_timesteps` False keeps diffusers' broadcasting timestep MUL (to see what the rewrite fixes)."""
    plan = plan_unet_parts(unet, parts)
    x, t, c = unet_example_inputs(unet, batch, lh, lw, sd.max_length)
    stages = [name for name, _ in unet_stages(unet)]
    entries = []
    state: tuple = (x, t)
    skips: list = []
    for i, (start, stop) in enumerate(plan):
        part = UNetPart(unet, start, stop, skip_count(unet, start), mobile_timesteps)
        args = (*state, c, *skips)
        name = "unet.tflite" if len(plan) == 1 else f"unet_part{i}.tflite"
        entry = convert_module(part, args, out / name, recipe)
        entry["stages"] = stages[start:stop]
        entries.append(entry)
        if stop < len(stages):
            h, emb, *skips = part(*args)
            state = (h, emb)
    total = {
        "files": [e["file"] for e in entries],
        "bytes": sum(e["bytes"] for e in entries),
        "convert_s": round(sum(e["convert_s"] for e in entries), 2),
        "parts": entries,
        "rewrites": count_replacements(unet),
    }
    if len(entries) == 1:
        total.update({k: entries[0][k] for k in ("file", "inputs", "outputs")})
    return total


def load_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise SqueezegenError(f"model folder {folder} does not exist: run `squeezegen mobile export --out {folder}`")
    if not path.is_file():
        raise SqueezegenError(f"{folder} has no {MANIFEST}: pass a folder written by `squeezegen mobile export`")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SqueezegenError(f"{path} is not valid JSON ({exc}): re-export into a new folder") from None
    if manifest.get("format") != FORMAT:
        raise SqueezegenError(f"{path} has format {manifest.get('format')}, this version reads {FORMAT}: re-export")
    return manifest
