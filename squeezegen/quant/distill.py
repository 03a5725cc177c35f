"""Knowledge distillation of a binarized student from its frozen float teacher.

Loss: KL(teacher || student) over the vocabulary (batchmean over tokens) + `hidden_weight` x the
sum over decoder layers of MSE(student hidden, teacher hidden); no ground-truth term. AdamW with
linear warm-up then cosine decay, gradient checkpointing, bf16 autocast where the hardware has it,
a resumable checkpoint every `save_every` steps. Under `torchrun` each process takes its own
blocks and DistributedDataParallel averages the gradients (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from squeezegen.errors import SqueezegenError
from squeezegen.quant.api import binary_layers
from squeezegen.runtime.device import native_bf16

CHECKPOINT = "checkpoint.pt"


@dataclass
class DistillConfig:
    steps: int = 200
    batch: int = 4  # blocks per step and process
    block: int = 256  # tokens per block
    lr: float = 2e-4
    warmup: float = 0.03  # share of the steps
    weight_decay: float = 0.0
    hidden_weight: float = 10.0
    checkpointing: bool = True
    bf16: str = "auto"  # auto | on | off
    save_every: int = 50
    seed: int = 0


def use_bf16(mode: str, device: torch.device) -> bool:
    if mode not in ("auto", "on", "off"):
        raise SqueezegenError(f"bf16 must be auto, on or off, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    return native_bf16(device)


def distill_loss(student_out, teacher_out, hidden_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, hidden mse) for two forward passes run with output_hidden_states=True."""
    vocab = teacher_out.logits.shape[-1]
    log_s = F.log_softmax(student_out.logits.float().view(-1, vocab), dim=-1)
    log_t = F.log_softmax(teacher_out.logits.float().view(-1, vocab), dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    pairs = zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:], strict=True)
    mse = sum(F.mse_loss(s.float(), t.float()) for s, t in pairs)
    return kl + hidden_weight * mse, kl, mse


def schedule(step: int, total: int, warmup_steps: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_rows(step: int, batch: int, rank: int, world: int, count: int, seed: int) -> torch.Tensor:
    """Block ids for one process at one step: epochs of seeded permutations, ranks side by side."""
    per_step = batch * world
    start = step * per_step + rank * batch
    ids = []
    for i in range(start, start + batch):
        epoch, at = divmod(i, count)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch))
        ids.append(int(order[at]))
    return torch.tensor(ids)


def _setup_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    blocks: torch.Tensor,
    config: DistillConfig,
    folder: str | Path,
    resume: bool = False,
) -> list[dict]:
    """Train the binary layers of `student` to match `teacher` on `blocks` (N, block) token ids.

    Checkpoints go to `folder`; with `resume` training continues from the last one. Returns the
    loss history (rank 0's view)."""
    if not binary_layers(student):
        raise SqueezegenError("distill needs a binarized student: apply sg.binarize_ first")
    device = next(student.parameters()).device
    rank, world = _setup_distributed(device)
    folder = Path(folder)
    checkpoint = folder / CHECKPOINT

    inside = {id(p) for m in binary_layers(student) for p in m.parameters()}
    for p in student.parameters():
        p.requires_grad_(id(p) in inside)
    teacher.eval().requires_grad_(False)
    named = {n: p for n, p in student.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(named.values(), lr=config.lr, weight_decay=config.weight_decay)
    warmup_steps = max(1, round(config.warmup * config.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, config.steps, warmup_steps))
    start, history = 0, []
    if resume:
        if not checkpoint.is_file():
            raise SqueezegenError(f"nothing to resume: {checkpoint} does not exist")
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state["config"] != asdict(config):
            raise SqueezegenError(f"{checkpoint} was made with other settings ({state['config']}): rerun them")
        with torch.no_grad():
            for name, value in state["trainable"].items():
                named[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history = state["step"], state["history"]

    if config.checkpointing:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    model = student
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=ids)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(config.bf16, device))
    bar = tqdm(range(start, config.steps), desc="distilling", unit="step", disable=rank != 0, initial=start)
    for step in bar:
        rows = batch_rows(step, config.batch, rank, world, len(blocks), config.seed)
        ids = blocks[rows].to(device)
        with autocast:
            with torch.no_grad():
                target = teacher(ids, output_hidden_states=True)
            out = model(ids, output_hidden_states=True)
            loss, kl, mse = distill_loss(out, target, config.hidden_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        record = {"step": step + 1, "loss": loss.detach().item(), "kl": kl.detach().item(), "mse": float(mse.detach())}
        record["lr"] = scheduler.get_last_lr()[0]
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", kl=f"{record['kl']:.3f}")
        last = step + 1 == config.steps
        if rank == 0 and (last or (step + 1) % config.save_every == 0):
            folder.mkdir(parents=True, exist_ok=True)
            trainable = {n: p.detach().clone() for n, p in named.items()}
            state = {"step": step + 1, "trainable": trainable, "optimizer": optimizer.state_dict()}
            state.update(scheduler=scheduler.state_dict(), history=history, config=asdict(config))
            _save_atomic(state, checkpoint)
    if config.checkpointing:
        student.activation_checkpointing_disable()
    student.eval()
    return history
