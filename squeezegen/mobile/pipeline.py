"""Text-to-image over the exported LiteRT files: tokenizer, text encoder, classifier-free guidance,
a numpy scheduler, the UNet (loaded once, run every step), VAE decode, PNG.

`LiteRTModules` and `TorchModules` expose the same three calls, so the same sampling loop measures the
exported files against the PyTorch modules they came from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from squeezegen.errors import SqueezegenError
from squeezegen.mobile.accelerator import CompiledRunner
from squeezegen.mobile.check import open_tflite
from squeezegen.mobile.export import load_manifest
from squeezegen.mobile.schedulers import make_scheduler


def _whole(path: Path, entry: dict) -> Path:
    """`path` as the export wrote it: a file of another size is truncated or was replaced, and must not be loaded."""
    if not path.is_file():
        raise SqueezegenError(f"{path} is missing: re-run `squeezegen mobile export`")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise SqueezegenError(
            f"{path} is {size} bytes, not the {entry['bytes']} the export wrote (truncated or changed): "
            "re-export it with `squeezegen mobile export --overwrite`"
        )
    return path


def _runner(folder: Path, entry: dict, threads: int, accelerator: str):
    path = _whole(folder / entry["file"], entry)
    if accelerator == "gpu":
        return CompiledRunner(path, "gpu")
    return open_tflite(path, threads).get_signature_runner()


def named_inputs(entry: dict, *arrays: np.ndarray) -> dict[str, np.ndarray]:
    """`arrays` in the manifest's input order, keyed by the file's input names (args_0, args_1, ...)."""
    return {
        spec["name"]: np.ascontiguousarray(a, dtype=spec["dtype"])
        for spec, a in zip(entry["inputs"], arrays, strict=True)
    }


def run_file(runner, entry: dict, *arrays: np.ndarray) -> list[np.ndarray]:
    """One call of an exported file's runner (CPU interpreter or CompiledRunner), outputs in manifest order."""
    out = runner(**named_inputs(entry, *arrays))
    return [out[spec["name"]] for spec in entry["outputs"]]


class LiteRTModules:
    """The exported files of one folder; each is compiled once, for LiteRT's CPU interpreter or its GPU
    accelerator (fp16, no CPU fallback), and reused across steps. `inputs_seen` keeps the last inputs each
    file was given (`file_inputs` reads them)."""

    def __init__(self, folder: str | Path, threads: int = 1, accelerator: str = "cpu"):
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        mods = self.manifest["modules"]
        missing = [m for m in ("text_encoder", "unet", "vae_decoder") if m not in mods]
        if missing:
            raise SqueezegenError(f"{self.folder} has no {', '.join(missing)}: export all three modules")
        embedding = self.manifest["token_embedding"]
        self.table = np.load(_whole(self.folder / embedding["file"], embedding)).astype(np.float32)
        self._te = _runner(self.folder, mods["text_encoder"], threads, accelerator)
        self._unet = [(_runner(self.folder, p, threads, accelerator), p) for p in mods["unet"]["parts"]]
        self._vae = _runner(self.folder, mods["vae_decoder"], threads, accelerator)
        self.adapter = getattr(self._te, "adapter", "cpu")
        self.inputs_seen: dict[str, dict[str, np.ndarray]] = {}

    def _run(self, runner, entry: dict, *arrays: np.ndarray) -> list[np.ndarray]:
        self.inputs_seen[entry["file"]] = named_inputs(entry, *arrays)
        return run_file(runner, entry, *arrays)

    def encode(self, ids: np.ndarray) -> np.ndarray:
        entry = self.manifest["modules"]["text_encoder"]
        return self._run(self._te, entry, self.table[ids])[0]

    def unet(self, x: np.ndarray, t: np.ndarray, context: np.ndarray) -> np.ndarray:
        state: list[np.ndarray] = [x, t]
        skips: list[np.ndarray] = []
        for runner, entry in self._unet:
            outs = self._run(runner, entry, *state, context, *skips)
            if len(outs) == 1:
                return outs[0]
            state, skips = outs[:2], outs[2:]
        raise SqueezegenError("the last UNet part returned more than the noise prediction: re-export")

    def decode(self, z: np.ndarray) -> np.ndarray:
        return self._run(self._vae, self.manifest["modules"]["vae_decoder"], z)[0]


class TorchModules:
    """The same three calls on the PyTorch modules of a diffusers SD folder (for comparison)."""

    def __init__(self, folder: str | Path):
        import torch

        from squeezegen.mobile.modules import TextEncoder, VaeDecoder
        from squeezegen.mobile.pipeline_config import load_parts

        self.torch = torch
        self.parts = load_parts(folder)
        self.text = TextEncoder(self.parts.text_encoder, self.parts.max_length).eval()
        self.vae = VaeDecoder(self.parts.vae).eval()

    def encode(self, ids: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            ids_t = self.torch.tensor(ids, dtype=self.torch.long)
            return self.text(self.text.embed(ids_t)).numpy()

    def unet(self, x: np.ndarray, t: np.ndarray, context: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            out = self.parts.unet(
                self.torch.tensor(x), self.torch.tensor(t), encoder_hidden_states=self.torch.tensor(context)
            )
            return out.sample.numpy()

    def decode(self, z: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self.vae(self.torch.tensor(z)).numpy()


@dataclass
class GenerateResult:
    images: np.ndarray  # (N, H, W, C) uint8
    timings: dict = field(default_factory=dict)


def load_tokenizer(folder: str | Path):
    folder = Path(folder)
    if not (folder / "vocab.json").is_file():
        raise SqueezegenError(f"{folder} holds no CLIP tokenizer (vocab.json + merges.txt): re-export the model")
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def tokenize(tokenizer, prompts: list[str], max_length: int) -> np.ndarray:
    enc = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    return enc["input_ids"].astype(np.int64)


def generate(
    modules,
    tokenizer,
    prompts: list[str],
    latent_shape: tuple[int, int, int],
    max_length: int,
    scheduler_config: dict,
    steps: int = 20,
    guidance: float = 7.5,
    seed: int = 0,
    scheduler: str = "dpm++",
    negative_prompt: str = "",
    guidance_batch: int = 2,
    progress: bool = True,
) -> GenerateResult:
    """Sample one image per prompt; the UNet sees (uncond, cond) together when guidance_batch is 2."""
    from tqdm import tqdm

    timings = {"text_encoder_s": 0.0, "unet_s": 0.0, "vae_s": 0.0, "unet_calls": 0}
    images = []
    t0 = time.perf_counter()
    uncond_ids = tokenize(tokenizer, [negative_prompt], max_length)
    uncond = modules.encode(uncond_ids)
    timings["text_encoder_s"] += time.perf_counter() - t0
    for n, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        cond = modules.encode(tokenize(tokenizer, [prompt], max_length))
        timings["text_encoder_s"] += time.perf_counter() - t0
        sched = make_scheduler(scheduler, scheduler_config, steps)
        rng = np.random.default_rng(seed + n)
        x = rng.standard_normal((1, *latent_shape)).astype(np.float32) * np.float32(sched.init_noise_sigma)
        bar = tqdm(range(len(sched.timesteps)), desc=f"image {n + 1}/{len(prompts)}", disable=not progress)
        for i in bar:
            xin = sched.scale_model_input(x, i)
            t = np.float32(sched.timesteps[i])
            t0 = time.perf_counter()
            if guidance_batch == 2:
                eps = modules.unet(
                    np.concatenate([xin, xin]), np.array([t, t], np.float32), np.concatenate([uncond, cond])
                )
                eps_u, eps_c = eps[:1], eps[1:]
                timings["unet_calls"] += 1
            else:
                eps_u = modules.unet(xin, np.array([t], np.float32), uncond)
                eps_c = modules.unet(xin, np.array([t], np.float32), cond)
                timings["unet_calls"] += 2
            timings["unet_s"] += time.perf_counter() - t0
            eps = eps_u + guidance * (eps_c - eps_u)
            x = sched.step(eps.astype(np.float32), i, x)
        t0 = time.perf_counter()
        img = modules.decode(x)[0]
        timings["vae_s"] += time.perf_counter() - t0
        img = np.clip((img.transpose(1, 2, 0) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
        images.append(img)
    return GenerateResult(np.stack(images), timings)


def folder_tokenizer(modules: LiteRTModules):
    if "tokenizer" not in modules.manifest:
        raise SqueezegenError(f"{modules.folder} was exported without a tokenizer: export from a folder that has one")
    return load_tokenizer(modules.folder / "tokenizer")


def generate_from_folder(
    folder: str | Path, prompts: list[str], threads: int = 1, accelerator: str = "cpu", **kwargs
) -> GenerateResult:
    """LiteRT-only text-to-image from a folder written by `squeezegen mobile export`, on LiteRT's CPU
    interpreter or its GPU accelerator; the result's timings name the adapter."""
    modules = LiteRTModules(folder, threads=threads, accelerator=accelerator)
    m = modules.manifest
    tokenizer = folder_tokenizer(modules)
    lat = m["latent"]
    result = generate(
        modules,
        tokenizer,
        prompts,
        (lat["channels"], lat["height"], lat["width"]),
        m["max_length"],
        m["scheduler"],
        guidance_batch=m["guidance_batch"],
        **kwargs,
    )
    result.timings["adapter"] = modules.adapter
    return result


def file_inputs(folder: str | Path, prompt: str, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """The inputs each file of an export receives in one denoising step of `prompt` on the CPU: real token
    embeddings, text states and latents (UNet part k gets what parts 0..k-1 computed), so a GPU check sees
    the activations fp16 must hold, not only random ones. Keyed by file name."""
    modules = LiteRTModules(folder)
    m = modules.manifest
    tokenizer = folder_tokenizer(modules)
    context = np.concatenate(
        [modules.encode(tokenize(tokenizer, [text], m["max_length"])) for text in ("", prompt)][-m["guidance_batch"] :]
    )
    lat = m["latent"]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m["guidance_batch"], lat["channels"], lat["height"], lat["width"])).astype(np.float32)
    t = np.full(m["guidance_batch"], m["scheduler"].get("num_train_timesteps", 1000) // 2, np.float32)
    modules.unet(x, t, context)
    modules.decode(x[:1])
    return modules.inputs_seen


def save_png(image: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = image[..., 0] if image.shape[-1] == 1 else image
    Image.fromarray(arr).save(path)
    return path
