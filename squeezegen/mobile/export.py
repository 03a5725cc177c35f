"""diffusers SD pipeline -> three LiteRT files (text encoder, UNet, VAE decoder) + manifest.json.

Rewrites are applied to copies of the modules; the token-embedding table is written beside the files
and looked up on the host (a LiteRT GPU graph cannot index it: the delegate rejects EMBEDDING_LOOKUP
and int32 tensors), so every op of the three files stays on the GPU path.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
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
    modules: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder"),
) -> dict:
    """Export `model` to LiteRT files in `out`; returns (and writes) the manifest."""
    check_recipe(recipe)
    rewrites = rewrites or RewriteConfig()
    unknown = set(modules) - {"text_encoder", "unet", "vae_decoder"}
    if unknown:
        raise SqueezegenError(f"unknown module(s) {sorted(unknown)}: choose from text_encoder, unet, vae_decoder")
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        sd = resolve_model(model, Path(tmp))
        out.mkdir(parents=True, exist_ok=True)
        unet_cfg = sd.unet.config
        factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)
        height = height or unet_cfg.sample_size * factor
        width = width or unet_cfg.sample_size * factor
        if height % (factor * 2 ** (len(unet_cfg.block_out_channels) - 1)) or width % factor:
            raise SqueezegenError(f"--height/--width must be multiples of {factor * 8}, got {height}x{width}")
        lh, lw = height // factor, width // factor
        hidden = sd.text_encoder.config.hidden_size
        manifest: dict = {
            "format": FORMAT,
            "source": str(model),
            "recipe": recipe,
            "rewrites": asdict(rewrites),
            "image": {"height": height, "width": width, "channels": sd.vae.config.out_channels},
            "latent": {"channels": unet_cfg.in_channels, "height": lh, "width": lw},
            "guidance_batch": guidance_batch,
            "max_length": sd.max_length,
            "scheduler": sd.scheduler_config,
            "modules": {},
        }
        if sd.tokenizer_dir is not None:
            shutil.copytree(sd.tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
            manifest["tokenizer"] = sorted(f"tokenizer/{p.name}" for p in (out / "tokenizer").iterdir())
        table = sd.text_encoder.get_input_embeddings().weight.detach().numpy()
        table = table.astype(np.float32 if recipe == "fp32" else np.float16)
        np.save(out / "token_embedding.npy", table)
        manifest["token_embedding"] = {
            "file": "token_embedding.npy",
            "bytes": (out / "token_embedding.npy").stat().st_size,
        }

        with torch.no_grad():
            if "text_encoder" in modules:
                te = TextEncoder(apply_rewrites(sd.text_encoder, rewrites), sd.max_length)
                entry = convert_module(
                    te, (torch.zeros(1, sd.max_length, hidden),), out / "text_encoder.tflite", recipe
                )
                entry["rewrites"] = count_replacements(te)
                manifest["modules"]["text_encoder"] = entry
            if "unet" in modules:
                unet = apply_rewrites(sd.unet, rewrites)
                manifest["modules"]["unet"] = export_unet(unet, out, recipe, unet_parts, guidance_batch, lh, lw, sd)
            if "vae_decoder" in modules:
                vae = VaeDecoder(apply_rewrites(sd.vae, rewrites))
                args = (torch.zeros(1, sd.vae.config.latent_channels, lh, lw),)
                entry = convert_module(vae, args, out / "vae_decoder.tflite", recipe)
                entry["rewrites"] = count_replacements(vae)
                manifest["modules"]["vae_decoder"] = entry
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def unet_example_inputs(unet, batch: int, lh: int, lw: int, context_len: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, unet.config.in_channels, lh, lw, generator=g),
        torch.full((batch,), 500.0),
        torch.randn(batch, context_len, unet.config.cross_attention_dim, generator=g),
    )


def export_unet(unet, out: Path, recipe: str, parts: int, batch: int, lh: int, lw: int, sd: SDParts) -> dict:
    """One file, or `parts` files that run in sequence and hand over (sample, temb, skip connections)."""
    plan = plan_unet_parts(unet, parts)
    x, t, c = unet_example_inputs(unet, batch, lh, lw, sd.max_length)
    stages = [name for name, _ in unet_stages(unet)]
    entries = []
    state: tuple = (x, t)
    skips: list = []
    for i, (start, stop) in enumerate(plan):
        part = UNetPart(unet, start, stop, skip_count(unet, start))
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
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise SqueezegenError(f"{path} has format {manifest.get('format')}, this version reads {FORMAT}: re-export")
    return manifest
