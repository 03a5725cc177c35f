"""Block-wise reconstruction: train a binarized student one decoder block at a time.

Each block learns to reproduce the float teacher's activations after that block (its hidden state,
computed once and reused) from the input the already-trained binary blocks before it produce, so a
block also learns to undo what the blocks before it got wrong (BRECQ / OmniQuant-style post-training
reconstruction, with the straight-through sign of `binary.SignSTE`). One block at a time costs a
fraction of an end-to-end step: no LM head, no backward through the other blocks, activations of one
block only. The loss is each token's relative squared error (`relative_mse`): on SmolLM2-135M it
gave half the held-out perplexity of one relative error over the whole batch, which the few
tokens with huge activations dominate. Every block gets an equal share of the stage's wall-clock time
(re-split after each block), AdamW with warm-up then cosine decay over that share. After each block
its trained tensors are saved (`block_NN.pt`), and a resumed run loads them and recomputes the
activations it needs by a forward pass.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from squeezegen.errors import SqueezegenError
from squeezegen.quant.api import binary_layers, decoder_layers
from squeezegen.quant.distill import bf16_autocast, save_atomic

HISTORY = "blocks.json"


@dataclass
class BlockwiseConfig:
    seconds: float  # wall-clock time for the whole stage, split evenly over the blocks
    batch: int = 4  # sequences per step
    lr: float = 1e-3
    warmup: float = 0.05  # share of each block's time
    max_grad_norm: float = 1.0  # 0: no clipping
    bf16: str = "auto"  # auto | on | off
    seed: int = 0
    min_steps: int = 1  # steps each block takes however short its time

    def __post_init__(self) -> None:
        if self.seconds <= 0 or self.batch < 1 or self.lr <= 0 or self.min_steps < 1:
            raise SqueezegenError("block-wise reconstruction needs seconds > 0, batch >= 1, lr > 0 and min_steps >= 1")


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the input it wanted is caught."""


def layer_calls(model: torch.nn.Module, ids: torch.Tensor, first_only: bool = False) -> tuple[torch.Tensor, list[dict]]:
    """(the first block's input, each block's keyword arguments) for one batch of token ids.

    The keyword arguments (rotary embeddings, mask, positions) are caught from a real forward pass,
    so every family's own conventions (scaled embeddings, sliding-window layers) are kept. With
    `first_only` the pass ends at the first block (only its input is wanted)."""
    layers = decoder_layers(model)
    calls: list[dict] = [{} for _ in layers]
    first: list[torch.Tensor] = []

    def catch(index: int):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                first.append(hidden)
            calls[index] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache", "use_cache")}
            if index == len(layers) - 1 or first_only:
                raise _Stop

        return hook

    handles = [layer.register_forward_pre_hook(catch(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return first[0], calls


def first_inputs(model: torch.nn.Module, blocks: torch.Tensor, batch: int) -> torch.Tensor:
    """The first decoder block's input for every row of `blocks` (N, T): (N, T, hidden)."""
    return torch.cat([layer_calls(model, blocks[i : i + batch], True)[0] for i in range(0, len(blocks), batch)])


@torch.no_grad()
def run_block(layer: torch.nn.Module, x: torch.Tensor, kwargs: dict, batch: int, autocast) -> torch.Tensor:
    """One decoder block over all rows of `x`, `batch` rows at a time, in `x`'s dtype."""
    with autocast:
        return torch.cat([layer(x[i : i + batch], **kwargs).to(x.dtype) for i in range(0, len(x), batch)])


def relative_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each token's squared error over the target token's squared norm, averaged over tokens: the
    next block normalizes each token (RMSNorm), so a token's error counts relative to its own size,
    and the few tokens with huge activations (attention sinks) do not drown the rest."""
    target = target.float()
    return ((out.float() - target).pow(2).sum(-1) / target.pow(2).sum(-1)).mean()


def lr_factor(progress: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` of the time, then cosine decay to zero at 1."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def train_block(
    layer: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    kwargs: dict,
    config: BlockwiseConfig,
    seconds: float,
    seed: int,
    autocast,
) -> dict:
    """Train one student block's binary layers on (inputs -> targets) for `seconds`; its record."""
    params = [p for m in binary_layers(layer) for p in m.parameters()]
    for p in layer.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(seed)
    layer.train()
    started, losses = time.perf_counter(), []
    while len(losses) < config.min_steps or time.perf_counter() - started < seconds:
        # the schedule spans the longer of the block's time and its minimum steps
        progress = min((time.perf_counter() - started) / seconds, len(losses) / config.min_steps)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(progress, config.warmup)
        pick = torch.randint(len(inputs), (config.batch,), generator=order)
        with autocast:
            loss = relative_mse(layer(inputs[pick].float(), **kwargs), targets[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
        optimizer.step()
        losses.append(loss.item())
    layer.eval()
    for p in params:
        p.requires_grad_(False)
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "steps": len(losses),
        "tokens": len(losses) * config.batch * inputs.shape[1],
        "first_loss": losses[0],
        "last_loss": sum(tail) / len(tail),
        "seconds": time.perf_counter() - started,
    }


def reconstruct_blocks(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    blocks: torch.Tensor,
    config: BlockwiseConfig,
    folder: str | Path,
    resume: bool = False,
) -> list[dict]:
    """Train every decoder block of the binarized `student` to match `teacher` on `blocks` (N, T).

    The stage takes about `config.seconds` of wall-clock time in all. Each finished block is saved
    in `folder`; with `resume` the blocks found there are loaded and the rest trained. Returns one
    record per block (steps, tokens, first and last loss, seconds)."""
    if not binary_layers(student):
        raise SqueezegenError("block-wise reconstruction needs a binarized student: apply sg.binarize_ first")
    started = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = next(teacher.parameters()).device
    autocast = bf16_autocast(config.bf16, device)
    ours, theirs = decoder_layers(student), decoder_layers(teacher)
    blocks = blocks[: len(blocks) // config.batch * config.batch]
    if len(blocks) == 0:
        raise SqueezegenError(f"block-wise reconstruction needs at least {config.batch} blocks of text")
    calls = layer_calls(teacher, blocks[: config.batch].to(device))[1]
    teacher_x = first_inputs(teacher, blocks.to(device), config.batch)
    student_x = teacher_x  # the embeddings are the teacher's own
    history = json.loads((folder / HISTORY).read_text()) if resume and (folder / HISTORY).is_file() else []
    for i, _ in enumerate(history):  # blocks trained before: load them, walk both models past them
        ours[i].load_state_dict(torch.load(folder / f"block_{i:02d}.pt", map_location=device, weights_only=True))
        student_x = run_block(ours[i], student_x, calls[i], config.batch, autocast)
        teacher_x = run_block(theirs[i], teacher_x, calls[i], config.batch, autocast)
    budget = config.seconds - sum(r["seconds"] for r in history) - (time.perf_counter() - started)
    clock = time.perf_counter()
    bar = tqdm(range(len(history), len(ours)), desc="blocks", unit="block", initial=len(history), total=len(ours))
    for i in bar:
        tick = time.perf_counter()
        targets = run_block(theirs[i], teacher_x, calls[i], config.batch, autocast)
        overhead = time.perf_counter() - tick  # about what passing the inputs on costs again
        left = budget - (time.perf_counter() - clock)
        seconds = max((left + overhead) / (len(ours) - i) - 2 * overhead, 1e-3)  # config.min_steps still run
        record = train_block(ours[i], student_x, targets, calls[i], config, seconds, config.seed + i, autocast)
        student_x = run_block(ours[i], student_x, calls[i], config.batch, autocast)
        teacher_x = targets
        record.update(block=i, seconds=time.perf_counter() - tick)
        history.append(record)
        save_atomic(ours[i].state_dict(), folder / f"block_{i:02d}.pt")
        (folder / HISTORY).write_text(json.dumps(history, indent=1))
        bar.set_postfix(loss=f"{record['first_loss']:.3f}->{record['last_loss']:.3f}", steps=record["steps"])
    return history
