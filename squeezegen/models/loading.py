"""`sg.load`: one entry point for bundled models, local Hugging Face folders and tiny test models."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from squeezegen.errors import SqueezegenError, UnknownModelError, UnsupportedModelError, one_line
from squeezegen.files import read_json
from squeezegen.models.bundled import BUNDLED, bundled_tokenizer_folder, dequantized_folder
from squeezegen.models.tiny import TINY_CONFIGS, tiny_model
from squeezegen.runtime.decoder import SUPPORTED_MODEL_TYPES
from squeezegen.runtime.device import auto_dtype

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def available_models() -> dict[str, str]:
    """Loadable names and what they are."""
    names = {name: entry.description for name, entry in BUNDLED.items()}
    names.update({name: f"seeded random {cfg['model_type']} model for tests" for name, cfg in TINY_CONFIGS.items()})
    return names


def _available_line() -> str:
    return ", ".join(available_models()) + ", or a local Hugging Face model folder"


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """A dtype by name; "auto" is bfloat16 where `device` runs it natively, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto_dtype(device)
    if dtype not in _DTYPES:
        raise SqueezegenError(f"unknown dtype {dtype!r}: use auto or one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def model_dtype(name_or_path: str | Path, dtype: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype `load(name_or_path, dtype)` computes in: "auto" is the dtype a 1-bit checkpoint
    was saved from (so that it gives the logits it gave), else `resolve_dtype`'s."""
    if dtype == "auto" and isinstance(name_or_path, str | os.PathLike) and Path(name_or_path).is_dir():
        from squeezegen.quant.checkpoint import saved_compute_dtype

        saved = saved_compute_dtype(name_or_path)
        if saved is not None:
            return saved
    return resolve_dtype(dtype, device)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SqueezegenError(f"device {device!r} asked for but no CUDA GPU is visible: use --device cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise SqueezegenError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None


def _check_folder(path: Path) -> None:
    config = path / "config.json"
    if not config.exists():
        raise UnsupportedModelError(f"{path} has no config.json: point at a Hugging Face model folder")
    model_type = read_json(config).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{path} holds a {model_type!r} model; the engine supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UnsupportedModelError(f"{path} has a config but no weights (*.safetensors): is the download complete?")


def load(name_or_path: str | Path, dtype: str | torch.dtype = "auto", device: str | None = "cpu"):
    """Load a causal LM and its tokenizer: `(model, tokenizer)`, both plain Hugging Face objects.

    `dtype="auto"` is bfloat16 on a GPU or CPU with native bf16 matrix units (AMX, AVX512-BF16),
    float32 elsewhere (`runtime.device.auto_dtype`, which `SQUEEZEGEN_AUTO_DTYPE` can force), and
    for a 1-bit checkpoint the dtype it was saved from; `model.dtype` tells which was chosen.

    `name_or_path` is a bundled name (`smollm2-135m`, `gemma3-270m`), a tiny test model
    (`tiny-llama`, ...), a local folder with config.json and safetensors weights, or a folder
    written by `sg.save` (a binarized model, rebuilt with packed 1-bit layers).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path:
        got = "an empty string" if isinstance(name_or_path, str) else f"a {type(name_or_path).__name__}"
        raise SqueezegenError(f"sg.load takes a model name or a folder path, got {got}: use one of {_available_line()}")
    target = resolve_device(device)
    torch_dtype = model_dtype(name_or_path, dtype, target)
    name = name_or_path
    if name in TINY_CONFIGS:
        model = tiny_model(name, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(bundled_tokenizer_folder())
    else:
        if name in BUNDLED:
            folder = dequantized_folder(BUNDLED[name])
        elif Path(name).is_dir():
            folder = Path(name)
            from squeezegen.quant.checkpoint import is_binary_folder, load_binary

            if is_binary_folder(folder):
                model, tokenizer = load_binary(folder, torch_dtype)
                return model.to(target), tokenizer
            _check_folder(folder)
        elif Path(name).exists():
            raise UnsupportedModelError(f"{name} is a file; pass a model folder or one of: {_available_line()}")
        else:
            raise UnknownModelError(f"unknown model {name!r}; available: {_available_line()}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        except (OSError, ValueError, SafetensorError) as exc:  # corrupt or partial files
            raise UnsupportedModelError(
                f"could not load {folder}: {one_line(exc)}; restore its files, or save or download the model again"
            ) from exc
        if model.config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{name} is a {model.config.model_type!r} model; the engine supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(target).eval(), tokenizer
