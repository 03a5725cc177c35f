"""Knowledge distillation of a binarized student from its frozen float teacher.

Losses (`loss`), all without a ground-truth term:
- "reference" (BinaryMoS's): KL(teacher || student) summed over the tokens and divided by the
  batch size (`batchmean` over (B, T, V)) + `hidden_weight` x the sum over decoder layers of the
  hidden-state MSE;
- "normalized": the same, each layer's MSE divided by the teacher's mean squared hidden state, so
  that a residual stream with a few huge activations does not drown the KL;
- "kl": the KL alone;
- "token-mean": the KL averaged per token + the raw MSE (what squeezegen did before).
AdamW at lr 1e-3 (the reference uses 2e-5, for 7B models and hundreds of millions of tokens; at the
tens of thousands of tokens a CPU distils, 1e-3 gave 200x lower held-out perplexity than 2e-5 in
docs/methods/binarymos.md's ablation), linear warm-up then cosine decay, gradients clipped at norm 1.0
(HF Trainer's default), gradient checkpointing, bf16 autocast where the hardware has it, held-out
perplexity every `eval_every` steps, a resumable checkpoint every `save_every` steps. Under
`torchrun` each process takes its own blocks; DistributedDataParallel averages the gradients, or
FSDP2 (`fully_shard`) shards the student and the teacher layer by layer (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from squeezegen.errors import SqueezegenError
from squeezegen.quant.api import binary_layers
from squeezegen.runtime.device import auto_dtype

CHECKPOINT = "checkpoint.pt"


LOSSES = ("reference", "normalized", "kl", "token-mean")
# settings a resumed run may change: how often it saves and measures, and how far it goes
RESUMABLE = ("save_every", "eval_every", "steps", "stop_after")


@dataclass
class DistillConfig:
    steps: int = 200  # the length of the schedule (warm-up, cosine)
    batch: int = 4  # blocks per step and process
    block: int = 256  # tokens per block
    lr: float = 1e-3  # --lr 2e-5 for the reference's own
    warmup: float = 0.03  # share of the steps
    weight_decay: float = 0.0
    hidden_weight: float = 10.0
    loss: str = "reference"
    max_grad_norm: float = 1.0  # 0: no clipping
    checkpointing: bool = True
    bf16: str = "auto"  # auto | on | off
    save_every: int = 50
    eval_every: int = 0  # held-out perplexity every n steps (0: never)
    parallel: str = "ddp"  # under torchrun: ddp | fsdp
    stop_after: int | None = None  # stop (with a checkpoint) after this step: a long run in sessions
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise SqueezegenError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise SqueezegenError(f"parallel must be ddp or fsdp, got {self.parallel!r}")


def use_bf16(mode: str, device: torch.device) -> bool:
    if mode not in ("auto", "on", "off"):
        raise SqueezegenError(f"bf16 must be auto, on or off, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    return auto_dtype(device) == torch.bfloat16  # what dtype "auto" means there (SQUEEZEGEN_AUTO_DTYPE too)


def bf16_autocast(mode: str, device: torch.device) -> torch.autocast:
    """bf16 autocast on `device` where `mode` ("auto", "on", "off") asks for it (`use_bf16`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(mode, device))


def distill_loss(student_out, teacher_out, config: DistillConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KL per token, hidden term) for two forward passes with output_hidden_states=True."""
    batch, tokens, vocab = teacher_out.logits.shape
    log_s = F.log_softmax(student_out.logits.float().view(-1, vocab), dim=-1)
    log_t = F.log_softmax(teacher_out.logits.float().view(-1, vocab), dim=-1)
    kl_sum = F.kl_div(log_s, log_t, log_target=True, reduction="sum")
    kl = kl_sum / (batch * tokens) if config.loss == "token-mean" else kl_sum / batch
    pairs = zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:], strict=True)
    if config.loss == "normalized":
        hidden = sum(F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean() for s, t in pairs)
    else:
        hidden = sum(F.mse_loss(s.float(), t.float()) for s, t in pairs)
    loss = kl if config.loss == "kl" else kl + config.hidden_weight * hidden
    return loss, kl_sum / (batch * tokens), hidden


@torch.no_grad()
def block_perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch: int = 4) -> float:
    """Perplexity of a model on (N, block) token blocks, each scored on its own (no carried context)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch):
        ids = blocks[start : start + batch].to(device)
        logits = model(ids).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


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


def save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _shard(model: torch.nn.Module) -> None:
    """FSDP2: every decoder layer a unit of its own, the rest (embeddings, head) the root's."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def _full():
    """Whole tensors, on the CPU (gathered from the shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def trainable_state(student: torch.nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """The trainable tensors, whole (gathered across processes under FSDP: every rank calls)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(student, options=_full())
    return {n: t.detach().clone() for n, t in state.items() if n in names}


def resume_key(config: DistillConfig, run: dict | None = None) -> dict:
    """What a checkpoint must have been made with for a run to resume from it: the training
    settings but those a resumed run may change (RESUMABLE), and `run`, what the caller says
    decides the rest (the model, the binarization, the dtype)."""
    kept = {k: v for k, v in asdict(config).items() if k not in RESUMABLE}
    return {**kept, **(run or {})}


def distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    blocks: torch.Tensor,
    config: DistillConfig,
    folder: str | Path,
    resume: bool = False,
    held_out: torch.Tensor | None = None,
    run: dict | None = None,
    stop_at: float | None = None,
) -> list[dict]:
    """Train the binary layers of `student` to match `teacher` on `blocks` (N, block) token ids.

    Checkpoints go to `folder`; with `resume` training continues from the last one (a larger
    `steps` stretches the schedule to the new length), refused unless `resume_key(config, run)`
    is what the checkpoint was made with. With `eval_every` and `held_out` blocks,
    the history records held-out perplexity. Past `stop_at` (a `time.perf_counter()` instant) no
    step starts: the run saves its checkpoint and ends early (a time budget's guard; one process).
    Under FSDP both models are sharded in place (gather the result with `trainable_state`).
    Returns the history (rank 0's view)."""
    _check_student(student)
    device = next(student.parameters()).device
    rank, world = _setup_distributed(device)
    checkpoint = Path(folder) / CHECKPOINT
    fsdp = world > 1 and config.parallel == "fsdp"
    names = _freeze_all_but_binary(student, teacher, fsdp)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup_steps = max(1, round(config.warmup * config.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, config.steps, warmup_steps))
    start, history = _resume(checkpoint, config, run, student, optimizer, scheduler) if resume else (0, [])

    if config.checkpointing:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    model = student
    if world > 1 and not fsdp:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=ids)
    autocast = bf16_autocast(config.bf16, device)
    end = min(config.steps, config.stop_after or config.steps)
    bar = tqdm(range(start, end), desc="distilling", unit="step", disable=rank != 0, initial=start, total=end)
    for step in bar:
        rows = batch_rows(step, config.batch, rank, world, len(blocks), config.seed)
        with autocast:
            loss, kl, hidden = _loss(model, teacher, blocks[rows].to(device), config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        record = {"step": step + 1, "tokens": (step + 1) * config.batch * config.block * world}
        record.update(loss=loss.detach().item(), kl=kl.detach().item(), hidden=float(hidden.detach()))
        record.update(lr=scheduler.get_last_lr()[0], grad_norm=float(norm.full_tensor() if fsdp else norm))
        if config.eval_every and held_out is not None and (step + 1) % config.eval_every == 0:
            student.eval()
            with autocast:
                record["held_out_perplexity"] = block_perplexity(model, held_out)
            student.train()
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", kl=f"{record['kl']:.3f}")
        out_of_time = stop_at is not None and time.perf_counter() >= stop_at
        if step + 1 == end or (step + 1) % config.save_every == 0 or out_of_time:
            state = {"step": step + 1, "history": history, "config": asdict(config), "run": run or {}}
            _save(checkpoint, state, student, names, optimizer, scheduler, rank)
        if out_of_time:
            break
    if config.checkpointing:
        student.activation_checkpointing_disable()
        student.disable_input_require_grads()  # the hook HF's enable left on the embedding
    student.eval()
    return history


def _check_student(student: torch.nn.Module) -> None:
    if not binary_layers(student):
        raise SqueezegenError("distill needs a binarized student: apply sg.binarize_ first")
    low = {p.dtype for m in binary_layers(student) for p in m.parameters()} - {torch.float32}
    if low:
        raise SqueezegenError(
            f"distill trains float32 master weights, but the student's binary layers hold {str(low.pop())[6:]}: "
            "binarize a float32 copy (model.float()); bf16 compute comes from autocast (DistillConfig.bf16)"
        )


def _freeze_all_but_binary(student: torch.nn.Module, teacher: torch.nn.Module, fsdp: bool) -> set[str]:
    """Only the binary layers' parameters train; under FSDP both models are sharded from one
    starting point. Returns the trainable parameters' names."""
    inside = {id(p) for m in binary_layers(student) for p in m.parameters()}
    for p in student.parameters():
        p.requires_grad_(id(p) in inside)
    teacher.eval().requires_grad_(False)
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    if fsdp:
        with torch.no_grad():  # one starting point (a router's random init), as DDP broadcasts it
            for p in student.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, 0)
        _shard(student)
        _shard(teacher)
    return names


def _resume(checkpoint: Path, config: DistillConfig, run: dict | None, student, optimizer, scheduler):
    """Load the last checkpoint into the student, optimizer and schedule: (its step, its history);
    refused where it was made with other settings."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if not checkpoint.is_file():
        raise SqueezegenError(f"nothing to resume: {checkpoint} does not exist")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    wanted = resume_key(config, run)
    saved = {k: v for k, v in state["config"].items() if k not in RESUMABLE} | state.get("run", {})
    changed = sorted(k for k in wanted if k in saved and saved[k] != wanted[k])  # older ones lack "run"
    if changed:
        shown = "; ".join(f"{k}: {saved[k]!r} then, {wanted[k]!r} now" for k in changed)
        raise SqueezegenError(f"{checkpoint} was made with other settings ({shown}): resume with the same flags")
    set_model_state_dict(student, state["trainable"], options=_full_load())
    set_optimizer_state_dict(student, optimizer, state["optimizer"], options=_full_load())
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], state["history"]


def _loss(model, teacher, ids: torch.Tensor, config: DistillConfig):
    """The distillation loss of one batch (loss, KL, hidden MSE), the teacher without gradients."""
    with torch.no_grad():
        target = teacher(ids, output_hidden_states=True)
    return distill_loss(model(ids, output_hidden_states=True), target, config)


def _save(checkpoint: Path, state: dict, student, names: set[str], optimizer, scheduler, rank: int) -> None:
    """The resumable checkpoint: `state` with the trainable weights, optimizer and schedule
    (gathered on every rank, a collective under FSDP; written by rank 0)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    trainable = trainable_state(student, names)
    optim = get_optimizer_state_dict(student, optimizer, options=_full())
    if rank == 0:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        state = {**state, "trainable": trainable, "optimizer": optim, "scheduler": scheduler.state_dict()}
        save_atomic(state, checkpoint)


def _full_load():
    """Whole tensors in, every rank taking its own shard; only the trainable ones are given."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, strict=False)
