"""The `blockwise` recipe: block-wise reconstruction, then a short end-to-end distillation, both
inside one wall-clock budget the user sets.

Block-wise reconstruction (`blockwise`) gets `block_share` of the time: it is where the 1-bit layers
learn most per second, since a step trains one block without the LM head. End-to-end distillation
(`distill`, BinaryMoS's own loss) gets the rest, to align what the blocks learned apart with the
teacher's logits; its step count is set once from one timed step, so its warm-up and cosine schedule
end about on time (and no step starts after the deadline), and is kept in `recipe.json` for a
resumed run. One process: the budget is the machine's, not one rank's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from squeezegen.errors import SqueezegenError
from squeezegen.quant.blockwise import HISTORY, BlockwiseConfig, reconstruct_blocks
from squeezegen.quant.distill import DistillConfig, bf16_autocast, distill, distill_loss

STATE = "recipe.json"


@dataclass
class BudgetRecipe:
    seconds: float  # both stages together
    block_share: float = 0.7  # of `seconds`, to block-wise reconstruction
    blocks: BlockwiseConfig | None = None  # its other settings (its `seconds` is set here)
    end_to_end: DistillConfig | None = None  # its other settings (its `steps` is set here)

    def __post_init__(self) -> None:
        if self.seconds <= 0 or not 0 <= self.block_share <= 1:
            raise SqueezegenError("the recipe needs seconds > 0 and a block share between 0 and 1")


def seconds_per_step(
    student: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor, config: DistillConfig
) -> float:
    """Wall-clock seconds of one end-to-end distillation step on `ids`, timed on its second try
    (gradients are dropped: nothing is trained)."""
    device = next(student.parameters()).device
    autocast = bf16_autocast(config.bf16, device)
    was_training = student.training
    student.train()
    if config.checkpointing:  # as distill runs it
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        with autocast:
            with torch.no_grad():
                target = teacher(ids, output_hidden_states=True)
            loss = distill_loss(student(ids, output_hidden_states=True), target, config)[0]
        loss.backward()
        timings.append(time.perf_counter() - started)
    student.zero_grad(set_to_none=True)
    if config.checkpointing:
        student.activation_checkpointing_disable()
        student.disable_input_require_grads()
    student.train(was_training)
    return timings[-1] * 1.3  # the optimizer step and clipping on top (distill stops at the deadline too)


def train_in_budget(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    blocks: torch.Tensor,
    recipe: BudgetRecipe,
    folder: str | Path,
    resume: bool = False,
    held_out: torch.Tensor | None = None,
    run: dict | None = None,
) -> dict:
    """Train the binarized `student` on `blocks` (N, T) within `recipe.seconds`; checkpoints in
    `folder`. Returns {"blocks": per-block records, "end_to_end": distill's history, "steps": ...}."""
    started = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state_file = folder / STATE
    state = json.loads(state_file.read_text()) if resume and state_file.is_file() else {}
    if state and run is not None and state.get("run") != run:
        raise SqueezegenError(f"{folder} was made with other settings ({state.get('run')}): resume with the same flags")
    state.setdefault("run", run)
    state_file.write_text(json.dumps(state, indent=1))  # before any block: a resume checks its settings
    records: list[dict] = []
    earlier = 0.0  # seconds the blocks trained before this session took
    if recipe.block_share > 0:
        block_seconds = recipe.seconds * recipe.block_share
        block_config = replace(recipe.blocks or BlockwiseConfig(seconds=1.0), seconds=block_seconds)
        done_before = folder / "blocks" / HISTORY
        if resume and done_before.is_file():
            earlier = sum(r["seconds"] for r in json.loads(done_before.read_text()))
        records = reconstruct_blocks(student, teacher, blocks, block_config, folder / "blocks", resume=resume)
    history: list[dict] = []
    e2e = recipe.end_to_end or DistillConfig()
    if recipe.block_share < 1:
        if "steps" not in state:
            left = recipe.seconds - earlier - (time.perf_counter() - started)
            per_step = seconds_per_step(
                student, teacher, blocks[: e2e.batch].to(next(student.parameters()).device), e2e
            )
            state["steps"] = max(0, int(left // per_step))
            state_file.write_text(json.dumps(state, indent=1))
        if state["steps"] > 0:
            e2e = replace(e2e, steps=state["steps"], save_every=max(1, state["steps"] // 4))
            resuming = resume and (folder / "end_to_end").is_dir()
            deadline = started + recipe.seconds - earlier
            history = distill(student, teacher, blocks, e2e, folder / "end_to_end", resuming, held_out, run, deadline)
    state["done"] = True
    state_file.write_text(json.dumps(state, indent=1))
    return {"blocks": records, "end_to_end": history, "steps": state.get("steps", 0)}
