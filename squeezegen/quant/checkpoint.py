"""The 1-bit deployment format: a Hugging Face-style folder.

    config.json              the base model's config (+ `squeezegen_binary`: method and settings)
    model.safetensors        packed signs (uint8, 8 per byte), 16-bit scales / router / bias,
                             16-bit embeddings, norms and lm_head
    squeezegen_binary.json   manifest: method, bits per weight, bytes
    tokenizer files

`sg.load(folder)` recognises the manifest and rebuilds the model with packed layers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from squeezegen.errors import SqueezegenError
from squeezegen.quant.api import (
    binarize_,
    binary_layers,
    bits_per_weight,
    config_from_dict,
    pack_,
    stored_bytes,
)
from squeezegen.staging import staged_folder

MANIFEST = "squeezegen_binary.json"
WEIGHTS = "model.safetensors"


def is_binary_folder(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def save(model: torch.nn.Module, tokenizer, folder: str | Path, overwrite: bool = False) -> Path:
    """Write the packed 1-bit model and its tokenizer to `folder` (the model itself is unchanged)."""
    folder = Path(folder)
    if not binary_layers(model):
        raise SqueezegenError("sg.save writes binarized models: apply sg.binarize_(model, config) first")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise SqueezegenError(f"{folder} exists and is not empty: choose a new folder or pass overwrite=True")
    deployed = copy.deepcopy(model)
    pack_(deployed)
    deployed.to(torch.float16)  # packed signs stay uint8
    with staged_folder(folder) as tmp:
        save_model(deployed, str(tmp / WEIGHTS))
        deployed.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = {
            "format": "squeezegen-binary/1",
            "binarization": deployed.config.squeezegen_binary,
            "bits_per_weight": bits_per_weight(deployed),
            "bytes": stored_bytes(deployed),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


def load_binary(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Rebuild a saved binarized model with packed layers: `(model, tokenizer)`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise SqueezegenError(f"{folder} has a {MANIFEST} but no {WEIGHTS}: the save is incomplete")
    try:
        config = AutoConfig.from_pretrained(folder)
        spec = json.loads((folder / MANIFEST).read_text())["binarization"]
    except (OSError, ValueError, KeyError) as exc:
        raise SqueezegenError(f"{folder} is not a readable squeezegen binary checkpoint: {exc}") from exc
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    binarize_(model, config_from_dict(spec))
    pack_(model)
    try:
        load_model(model, str(weights), strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise SqueezegenError(f"corrupt binary checkpoint {weights}: {exc}") from exc
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.to(dtype).eval(), tokenizer
