"""A miniature text-to-image latent diffusion model on scikit-learn's handwritten digits.

Same diffusers family as SD (CLIPTextModel + UNet2DConditionModel with cross-attention + AutoencoderKL),
trained here in minutes on 2 CPU cores, so that export quality can be measured as an accuracy: images
generated for "a handwritten digit 7" are scored by a classifier trained on the same digits.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from squeezegen.mobile.pipeline_config import SCHEDULER
from squeezegen.mobile.tokenizer import DIGIT_NAMES, WORDS, write_tokenizer

SIZE = 16  # digits are 8x8; upsampled x2 so the VAE has a spatial level to compress
MAX_LENGTH = 8
UNET = dict(
    sample_size=SIZE // 2,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=8,
)
VAE = dict(
    in_channels=1,
    out_channels=1,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=SIZE,
)
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="quick_gelu",
    projection_dim=64,
)


def prompt_for(digit: int, rng: random.Random | None = None) -> str:
    """The evaluation prompt is 'a handwritten digit 7'; training also sees 'a handwritten digit seven'."""
    if rng is not None and rng.random() < 0.5:
        return f"a handwritten digit {DIGIT_NAMES[digit]}"
    return f"a handwritten digit {digit}"


def digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 1, 16, 16) in [-1, 1], labels) from scikit-learn's bundled 8x8 digits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0 * 2.0 - 1.0
    x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return x.numpy(), data.target.astype(np.int64)


def to_digit_features(images: np.ndarray) -> np.ndarray:
    """Generated (N, C, 16, 16) images in [-1, 1] -> the classifier's 64 features on the 0..16 scale."""
    x = torch.tensor(images, dtype=torch.float32).mean(dim=1, keepdim=True)
    x = torch.nn.functional.avg_pool2d(x, 2)
    return ((x.clamp(-1, 1) + 1.0) / 2.0 * 16.0).reshape(len(images), -1).numpy()


def train_classifier(seed: int = 0):
    """An SVM on the 8x8 digits; returns (classifier, held-out accuracy on a 25% split)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    data = load_digits()
    xtr, xte, ytr, yte = train_test_split(data.data, data.target, test_size=0.25, random_state=seed)
    held_out = SVC(gamma=0.001).fit(xtr, ytr).score(xte, yte)
    return SVC(gamma=0.001).fit(data.data, data.target), float(held_out)


def _log(msg: str) -> None:
    print(msg, flush=True)


def train_mini(
    out: str | Path,
    vae_steps: int = 800,
    unet_steps: int = 2500,
    batch: int = 64,
    seed: int = 0,
    cfg_drop: float = 0.1,
) -> Path:
    """Train the VAE, then the UNet + text encoder jointly; save a diffusers SD pipeline folder."""
    import transformers

    out = Path(out)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    images, labels = digits()
    x_all = torch.tensor(images)
    tok_dir = write_tokenizer(out / "tokenizer", max_length=MAX_LENGTH, words=WORDS)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
    stats: dict = {"seed": seed, "batch": batch}
    vae, latents = _train_vae(x_all, vae_steps, batch, stats)
    text_encoder, unet = _train_unet(latents, labels, tokenizer, unet_steps, batch, cfg_drop, rng, stats)
    _save_pipeline(out, text_encoder, unet, vae, stats)
    return out


def _train_vae(x_all: torch.Tensor, steps: int, batch: int, stats: dict):
    """The VAE by reconstruction (+ a tiny KL); its scaling factor set so latents have unit std.
    Returns it and every image's latent distribution: (mean, std, scaling factor)."""
    import diffusers
    from tqdm import tqdm

    vae = diffusers.AutoencoderKL(**VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    t0 = time.perf_counter()
    for step in (bar := tqdm(range(steps), desc="vae")):
        idx = torch.randint(0, len(x_all), (batch,))
        post = vae.encode(x_all[idx]).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = torch.nn.functional.mse_loss(rec, x_all[idx]) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        post = vae.encode(x_all).latent_dist
        mean, std = post.mean, post.std
        recon = torch.nn.functional.mse_loss(vae.decode(mean).sample, x_all).item()
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    stats.update(vae_steps=steps, vae_recon_mse=recon, scaling_factor=scaling, vae_s=time.perf_counter() - t0)
    _log(f"vae: recon mse {recon:.4f}, scaling factor {scaling:.3f}")
    return vae, (mean, std, scaling)


def _train_unet(latents, labels, tokenizer, steps: int, batch: int, cfg_drop: float, rng: random.Random, stats: dict):
    """The text encoder and UNet trained jointly to predict the noise (DDPM), the caption dropped
    `cfg_drop` of the time for classifier-free guidance."""
    import diffusers
    import transformers
    from tqdm import tqdm

    mean, std, scaling = latents
    vocab = len(tokenizer)
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, **TEXT
        )
    )
    unet = diffusers.UNet2DConditionModel(**UNET)
    noise_sched = diffusers.DDPMScheduler(
        **{k: v for k, v in SCHEDULER.items() if k not in ("_class_name", "timestep_spacing", "steps_offset")}
    )
    ac = noise_sched.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    t0 = time.perf_counter()
    losses = []
    for step in (bar := tqdm(range(steps), desc="unet")):
        idx = torch.randint(0, len(mean), (batch,))
        z = (mean[idx] + std[idx] * torch.randn_like(mean[idx])) * scaling
        prompts = [("" if rng.random() < cfg_drop else prompt_for(int(labels[i]), rng)) for i in idx]
        ids = tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
        ctx = text_encoder(ids.input_ids).last_hidden_state
        t = torch.randint(0, len(ac), (batch,))
        noise = torch.randn_like(z)
        a = ac[t].sqrt()[:, None, None, None]
        s = (1 - ac[t]).sqrt()[:, None, None, None]
        pred = unet(a * z + s * noise, t, encoder_hidden_states=ctx).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    stats.update(unet_steps=steps, final_loss=float(np.mean(losses[-200:])), unet_s=time.perf_counter() - t0)
    return text_encoder, unet


def _save_pipeline(out: Path, text_encoder, unet, vae, stats: dict) -> None:
    """A diffusers StableDiffusionPipeline folder (the tokenizer is written already) and the stats."""
    text_encoder.eval().save_pretrained(out / "text_encoder")
    unet.eval().save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    (out / "train_stats.json").write_text(json.dumps(stats, indent=2))


def evaluate_mini(
    model_dir: str | Path,
    work: str | Path,
    recipes: tuple[str, ...] = ("fp32", "fp16", "int8-weight-only", "int8-dynamic"),
    per_digit: int = 10,
    steps: int = 20,
    guidance: float = 3.0,
    seed: int = 0,
    scheduler: str = "dpm++",
    png_dir: str | Path | None = None,
    overwrite: bool = False,
    accelerator: str = "cpu",
) -> dict:
    """Classifier accuracy of images from the PyTorch modules and from each exported recipe, run on
    LiteRT's CPU interpreter or (accelerator "gpu") its GPU accelerator in fp16.

    Every backend gets the same prompts, seeds, scheduler and guidance; only the module runtime differs.
    """
    from squeezegen.mobile.export import export_pipeline
    from squeezegen.mobile.pipeline import LiteRTModules, TorchModules, generate, load_tokenizer

    model_dir, work = Path(model_dir), Path(work)
    clf, held_out = train_classifier(seed)
    tokenizer = load_tokenizer(model_dir / "tokenizer")
    labels = [d for d in range(10) for _ in range(per_digit)]
    prompts = [prompt_for(d) for d in labels]
    results: dict = {
        "classifier": "SVC(gamma=0.001) on sklearn digits",
        "classifier_held_out_accuracy": held_out,
        "images": len(prompts),
        "steps": steps,
        "guidance": guidance,
        "scheduler": scheduler,
        "seed": seed,
        "backends": {},
    }
    backends: list[tuple[str, object, dict]] = [("pytorch", TorchModules(model_dir), {})]
    for recipe in recipes:
        manifest = export_pipeline(model_dir, work / recipe, recipe=recipe, overwrite=overwrite)
        size = sum(m["bytes"] for m in manifest["modules"].values()) + manifest["token_embedding"]["bytes"]
        name = f"litert-{recipe}" + ("-gpu" if accelerator == "gpu" else "")
        modules = LiteRTModules(work / recipe, accelerator=accelerator)
        backends.append((name, modules, {"bytes": size, "adapter": modules.adapter}))
    for name, modules, extra in backends:
        sched_cfg = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
        t0 = time.perf_counter()
        res = generate(
            modules,
            tokenizer,
            prompts,
            (UNET["in_channels"], UNET["sample_size"], UNET["sample_size"]),
            MAX_LENGTH,
            sched_cfg,
            steps=steps,
            guidance=guidance,
            seed=seed,
            scheduler=scheduler,
            progress=False,
        )
        feats = to_digit_features(res.images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
        pred = clf.predict(feats)
        acc = float((pred == np.array(labels)).mean())
        results["backends"][name] = {
            "accuracy": acc,
            "seconds": round(time.perf_counter() - t0, 2),
            "unet_s": round(res.timings["unet_s"], 2),
            **extra,
        }
        _log(f"{name}: accuracy {acc:.3f}")
        if png_dir is not None:
            _save_grid(res.images, per_digit, Path(png_dir) / f"mini_{name}.png")
        results["backends"][name]["_images"] = res.images
    ref = results["backends"]["pytorch"].pop("_images")
    for name, entry in results["backends"].items():
        if name != "pytorch":
            imgs = entry.pop("_images")
            entry["mean_abs_pixel_diff_vs_pytorch"] = float(np.abs(imgs.astype(float) - ref.astype(float)).mean())
    return results


def _save_grid(images: np.ndarray, per_row: int, path: Path) -> None:
    from squeezegen.mobile.pipeline import save_png

    n, h, w, c = images.shape
    rows = n // per_row
    grid = (
        images[: rows * per_row]
        .reshape(rows, per_row, h, w, c)
        .transpose(0, 2, 1, 3, 4)
        .reshape(rows * h, per_row * w, c)
    )
    big = np.repeat(np.repeat(grid, 4, axis=0), 4, axis=1)
    save_png(big, path)
