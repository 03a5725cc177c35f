"""Stable Diffusion layouts as plain configs: tiny-sd for tests and the full-size SD 1.5 / 2.1-base.

Full-size pipelines are built with random weights (no hub here): their shapes, op mix and file sizes
are those of the real checkpoints, which is what export, splitting and latency depend on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from squeezegen.errors import SqueezegenError, UnsupportedModelError
from squeezegen.mobile.tokenizer import write_tokenizer

SCHEDULER = dict(
    _class_name="EulerDiscreteScheduler",
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
)

_SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
_SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)

CONFIGS: dict[str, dict] = {
    "tiny-sd": dict(
        unet=dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        ),
        text_encoder=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            hidden_act="quick_gelu",
            projection_dim=32,
        ),
        vae=dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
        ),
        max_length=16,
    ),
    "sd15": dict(
        unet=_SD15_UNET,
        text_encoder=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            vocab_size=49408,
        ),
        vae=_SD_VAE,
        max_length=77,
    ),
    "sd21-base": dict(
        unet={
            **_SD15_UNET,
            "attention_head_dim": (5, 10, 20, 20),
            "cross_attention_dim": 1024,
            "use_linear_projection": True,
        },
        text_encoder=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=512,
            vocab_size=49408,
        ),
        vae=_SD_VAE,
        max_length=77,
    ),
}


@dataclass
class SDParts:
    """The three modules export needs, plus what the runtime pipeline needs to drive them."""

    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    tokenizer_dir: Path | None
    scheduler_config: dict
    max_length: int


def _import_diffusers():
    try:
        import diffusers
        import transformers
    except ImportError as exc:  # pragma: no cover - the mobile extra brings it
        from squeezegen.errors import MissingDependencyError

        raise MissingDependencyError(
            f"the mobile tools need diffusers ({exc.name} is missing): pip install 'squeezegen[mobile]'"
        ) from exc
    return diffusers, transformers


def build_pipeline(name: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a seeded random SD pipeline folder (diffusers layout) for a named config."""
    if name not in CONFIGS:
        raise SqueezegenError(f"unknown built-in pipeline {name!r}: choose one of {', '.join(CONFIGS)}")
    diffusers, transformers = _import_diffusers()
    cfg = CONFIGS[name]
    folder = Path(folder)
    tok_dir = write_tokenizer(folder / "tokenizer", max_length=cfg["max_length"])
    vocab = len(json.loads((tok_dir / "vocab.json").read_text()))
    te_cfg = {"vocab_size": vocab, **cfg["text_encoder"]}
    te_cfg["vocab_size"] = max(te_cfg["vocab_size"], vocab)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, **te_cfg
            )
        )
        unet = diffusers.UNet2DConditionModel(**cfg["unet"])
        vae = diffusers.AutoencoderKL(**cfg["vae"])
    text_encoder.save_pretrained(folder / "text_encoder")
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def build_parts(name: str, seed: int = 0) -> SDParts:
    """The modules of a named config in memory (no folder), e.g. to measure a full-size export."""
    diffusers, transformers = _import_diffusers()
    cfg = CONFIGS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, **cfg["text_encoder"])
        )
        unet = diffusers.UNet2DConditionModel(**cfg["unet"])
        vae = diffusers.AutoencoderKL(**cfg["vae"])
    return SDParts(text_encoder.eval(), unet.eval(), vae.eval(), None, dict(SCHEDULER), cfg["max_length"])


def load_parts(folder: str | Path) -> SDParts:
    """Load the SD modules of a diffusers pipeline folder, refusing anything that is not SD 1.x / 2.x."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SqueezegenError(f"model folder {folder} does not exist: pass a diffusers pipeline folder or tiny-sd")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise UnsupportedModelError(
            f"{folder} has no model_index.json: pass a diffusers Stable Diffusion pipeline folder (save_pretrained)"
        )
    index = json.loads(index_file.read_text())
    want = {"text_encoder": "CLIPTextModel", "unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}
    wrong = [
        f"{key}={index.get(key, [None, None])[1]}"
        for key, cls in want.items()
        if index.get(key, [None, None])[1] != cls
    ]
    if wrong:
        raise UnsupportedModelError(
            f"{folder} is a {index.get('_class_name', 'unknown')} pipeline ({', '.join(wrong)}): only Stable "
            "Diffusion 1.x/2.x layouts (CLIPTextModel + UNet2DConditionModel + AutoencoderKL) can be exported"
        )
    diffusers, transformers = _import_diffusers()
    text_encoder = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder")
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae")
    sched_file = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(sched_file.read_text()) if sched_file.is_file() else dict(SCHEDULER)
    tok_dir = folder / "tokenizer"
    max_length = text_encoder.config.max_position_embeddings
    return SDParts(
        text_encoder.eval(),
        unet.eval(),
        vae.eval(),
        tok_dir if tok_dir.is_dir() else None,
        scheduler_config,
        max_length,
    )
