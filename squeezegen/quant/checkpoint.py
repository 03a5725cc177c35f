"""The 1-bit deployment format: a Hugging Face-style folder.

    config.json              the base model's config (+ `squeezegen_binary`: method and settings)
    model.safetensors        packed signs (uint8, 8 per byte), 16-bit scales / router / bias,
                             16-bit embeddings, norms and lm_head
    squeezegen_binary.json   manifest: method, bits per weight, bytes, the files written, the
                             sha256 of each tensor file, and the dtype the saved model computed in
    tokenizer files

`sg.load(folder)` recognises the manifest (or, if it was lost, the config entry), checks the
tensor files against their sha256 and rebuilds the model with packed layers, computing in the
dtype it was saved from unless told otherwise (then the logits differ from the saved model's, and
it says so).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from squeezegen.errors import SqueezegenError, one_line
from squeezegen.files import file_sha256, read_json, staged_folder
from squeezegen.quant.api import (
    binarize_,
    binary_layers,
    bits_per_weight,
    compute_dtype,
    config_from_dict,
    pack_,
    stored_bytes,
)
from squeezegen.quant.int4 import int4_layers

MANIFEST = "squeezegen_binary.json"
WEIGHTS = "model.safetensors"
REPORT = "binarize_report.json"  # `squeezegen binarize` writes it next to the checkpoint
# /3 adds "compute_dtype"; /2 added "files" and "sha256"; /1 folders still load, unchecked
FORMAT = "squeezegen-binary/3"


def is_binary_folder(folder: str | Path) -> bool:
    """Whether `sg.save` wrote `folder`: its manifest, or its config's `squeezegen_binary` entry (a
    plain load would otherwise build those layers as fresh random nn.Linear)."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return True
    config = folder / "config.json"
    return config.is_file() and "squeezegen_binary" in read_json(config)


def _replaceable(folder: Path, overwrite: bool) -> set[str]:
    """What is in `folder` that saving there would replace; refuses anything but an earlier checkpoint."""
    if folder.exists() and not folder.is_dir():
        raise SqueezegenError(f"{folder} is a file: pass a folder path to sg.save")
    names = {p.name for p in folder.iterdir()} if folder.exists() else set()
    if not names:
        return names
    if not overwrite:
        raise SqueezegenError(f"{folder} exists and is not empty: choose a new folder or pass overwrite=True")
    if not is_binary_folder(folder):
        raise SqueezegenError(
            f"{folder} holds {sorted(names)[0]} but no squeezegen checkpoint: overwrite=True replaces only an "
            "earlier sg.save; choose a new folder"
        )
    return names


def save(model: torch.nn.Module, tokenizer, folder: str | Path, overwrite: bool = False) -> Path:
    """Write the packed 1-bit model and its tokenizer to `folder` (the model itself is unchanged).

    `overwrite=True` replaces an earlier checkpoint only, and only if the folder holds nothing else:
    the new one is written beside it and swapped in, so a failed save leaves the old one as it was.
    """
    folder = Path(folder)
    if int4_layers(model):
        raise SqueezegenError(
            "int4 weights are quantized at load time: save the float model and call sg.quantize_ after sg.load"
        )
    if not binary_layers(model):
        raise SqueezegenError("sg.save writes binarized models: apply sg.binarize_(model, config) first")
    existing = _replaceable(folder, overwrite)
    if (folder / MANIFEST).is_file():
        existing -= set(read_json(folder / MANIFEST).get("files", []))
    deployed = copy.deepcopy(model)
    pack_(deployed)
    computed_in = compute_dtype(deployed)
    deployed.to(torch.float16)  # packed signs stay uint8
    with staged_folder(folder) as tmp:
        save_model(deployed, str(tmp / WEIGHTS))
        deployed.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        foreign = sorted(existing - {*files, MANIFEST, REPORT})
        if foreign:
            raise SqueezegenError(
                f"{folder} also holds {foreign[0]}, which sg.save did not write: move it out or choose a new folder"
            )
        manifest = {
            "format": FORMAT,
            "binarization": deployed.config.squeezegen_binary,
            "compute_dtype": str(computed_in).removeprefix("torch."),
            "bits_per_weight": bits_per_weight(deployed),
            "bytes": stored_bytes(deployed),
            "files": [*files, MANIFEST],
            "sha256": {WEIGHTS: file_sha256(tmp / WEIGHTS)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


def _checked_manifest(folder: Path) -> dict:
    """The manifest, once every tensor file it lists is there with the sha256 recorded at save."""
    if not (folder / MANIFEST).is_file():
        raise SqueezegenError(
            f"{folder / 'config.json'} describes a squeezegen 1-bit model but {MANIFEST} is missing: "
            "copy the whole folder again or save the model again"
        )
    manifest = read_json(folder / MANIFEST)
    if not isinstance(manifest.get("binarization"), dict):
        raise SqueezegenError(f"{folder / MANIFEST} has no binarization entry: restore it or save the model again")
    for name in {WEIGHTS, *manifest.get("sha256", {})}:
        if not (folder / name).is_file():
            raise SqueezegenError(f"{folder} has a {MANIFEST} but no {name}: the save is incomplete")
    for name, digest in manifest.get("sha256", {}).items():
        if file_sha256(folder / name) != digest:
            raise SqueezegenError(
                f"corrupt binary checkpoint {folder / name}: its sha256 is not the one in {MANIFEST}; "
                "restore the file or save the model again"
            )
    return manifest


def saved_compute_dtype(folder: str | Path) -> torch.dtype | None:
    """The dtype the model saved in `folder` computed in (None: not a 1-bit checkpoint, or one
    saved before the manifest recorded it)."""
    manifest = Path(folder) / MANIFEST
    name = read_json(manifest).get("compute_dtype") if manifest.is_file() else None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def load_binary(folder: str | Path, dtype: torch.dtype | None = None):
    """Rebuild a saved binarized model with packed layers: `(model, tokenizer)`, computing in
    `dtype` (None: the dtype it was saved from, float32 for a checkpoint that does not record it).

    Built in that dtype from the start (as `from_pretrained` does, so RoPE's inverse frequencies
    stay float32), the model gives exactly the logits of the one that was saved in the same dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    spec = _checked_manifest(folder)["binarization"]
    saved = saved_compute_dtype(folder)
    if dtype is None:
        dtype = saved or torch.float32
    elif saved is not None and dtype != saved:
        name, was = str(dtype).removeprefix("torch."), str(saved).removeprefix("torch.")
        warnings.warn(
            f"{folder} was saved from a model computing in {was}: in {name} its logits differ from the saved "
            f"model's (load it with dtype={was!r} for those)",
            stacklevel=3,
        )
    weights = folder / WEIGHTS
    read_json(folder / "config.json")  # a broken config: name the file, not a transformers traceback
    try:
        config = AutoConfig.from_pretrained(folder)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        binarize_(model, config_from_dict(spec))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SqueezegenError(
            f"{folder} is not a readable squeezegen binary checkpoint: {one_line(exc)}; save the model again"
        ) from exc
    pack_(model)
    try:
        load_model(model, str(weights), strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise SqueezegenError(f"corrupt binary checkpoint {weights}: {one_line(exc)}") from exc
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer
