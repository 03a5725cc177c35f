"""Binarize a model, train it, pack it, measure it and save it: the workflow `squeezegen binarize`
runs, as named steps.

What comes from the layers above `quant` (a model loaded by name, the corpora, decode timing) is
handed in as `Sources`, so the workflow runs the same from the command line, a script or a test.
Under `torchrun`, `DistillConfig.parallel` "ddp" keeps a whole student per process and "fsdp" shards
student and teacher; either way the trained tensors end up on rank 0, which alone packs, measures
and saves a plain model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from squeezegen.errors import SqueezegenError
from squeezegen.quant.api import BinaryConfig, binarize_, bits_per_weight, config_to_dict, pack_, stored_bytes
from squeezegen.quant.blockwise import BlockwiseConfig
from squeezegen.quant.checkpoint import save
from squeezegen.quant.distill import DistillConfig, block_perplexity, distill, trainable_state
from squeezegen.quant.recipe import BudgetRecipe, train_in_budget
from squeezegen.runtime.device import host

REPORT = "binarize_report.json"


@dataclass
class Sources:
    """What binarizing takes from outside `quant`.

    load(): a fresh float model and its tokenizer (called again to rebuild the student after FSDP);
    held_out(tok, block): held-out token blocks by name, "cpython-docs" first (never trained on);
    corpus(tok, block): the end-to-end recipe's training blocks without a time budget;
    training_text(tok, tokens, block, teacher, seed, sources, teacher_seconds): (blocks, tokens
    per source), the time-budget recipes' text; decode_speeds(models, tok, tokens): decode tokens/s
    of each named model, measured side by side (None: not measured).
    """

    load: Callable[[], tuple]
    held_out: Callable[..., dict[str, torch.Tensor]]
    corpus: Callable[..., torch.Tensor]
    training_text: Callable[..., tuple[torch.Tensor, dict]]
    decode_speeds: Callable[..., dict[str, float]] | None = None


def binarize_and_train(
    model_name: str,
    config: BinaryConfig,
    train: DistillConfig,
    out: Path,
    sources: Sources,
    run: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    decode_tokens: int = 32,
    eval_blocks: int | None = None,
    started: float | None = None,
) -> dict | None:
    """Binarize the model `sources.load()` gives, distill it (unless `train.steps` is 0), save the
    packed model to `out` and return the report (None on ranks other than 0 under torchrun). `run`
    is kept in the training checkpoint: a resumed run must come with the same.

    The teacher and the deployed student compute in the loaded model's dtype; the student trains
    float32 master weights (bf16 compute comes from autocast, `train.bf16`: an AdamW step on bf16
    weights rounds small updates away) and is cast back once trained, so perplexities, decode
    speeds and the saved checkpoint are all of the model as deployed.

    With `train.stop_after` before `train.steps`, training stops there with its checkpoint
    (OUT.ckpt) and nothing is packed or saved: the report holds `stopped` and the history, and a
    later call with `resume` goes on.

    With a `time_budget` in `run` (seconds, counted from `started`), the student trains by
    `run["recipe"]` ("blockwise": block-wise reconstruction, then end-to-end distillation;
    "end-to-end": distillation alone) on `run["data"]`'s sources, and training ends in time for
    the final measurements: `train.steps` is then ignored."""
    teacher, tok = sources.load()
    torch.manual_seed(train.seed)  # the routers' random init: the same in every process and every run
    student = binarize_(copy.deepcopy(teacher).float(), config)
    held_sets = {name: b[:eval_blocks] for name, b in sources.held_out(tok, train.block).items()}
    started = time.perf_counter() if started is None else started
    checkpoint = out.with_name(out.name + ".ckpt")
    trained = _train(teacher, tok, student, train, sources, run, checkpoint, resume, held_sets, started)
    budgeted, history, gathered, train = trained
    train_s = time.perf_counter() - started
    if not _rank_zero_goes_on():
        return None
    done = history[-1]["step"] if history else 0
    if budgeted is None and train.steps > 0 and done < train.steps:
        return _stopped(history, train, checkpoint)
    if gathered is not None:
        del student, teacher  # the sharded models go before whole ones are loaded
        teacher, student = _rebuild(sources, config, gathered)
    pack_(student.to(teacher.dtype))
    report = _report(model_name, config, teacher, student, held_sets, train, done, train_s, budgeted, run, history)
    if decode_tokens > 0 and sources.decode_speeds is not None:
        speeds = sources.decode_speeds({"float": teacher, "binary": student}, tok, decode_tokens)
        report["decode_tok_s_float"], report["decode_tok_s_binary"] = speeds["float"], speeds["binary"]
    save(student, tok, out, overwrite=overwrite)
    (out / REPORT).write_text(json.dumps(report, indent=1))
    return report


def _train(teacher, tok, student, train, sources, run, checkpoint, resume, held_sets, started) -> tuple:
    """(the time-budget path's result or None, distillation's history, FSDP's gathered tensors or
    None, the training settings with the steps a budget allowed)."""
    if run is not None and run.get("time_budget") is not None:
        budgeted = train_in_time(teacher, tok, student, train, run, checkpoint, resume, held_sets, started, sources)
        return budgeted, budgeted["end_to_end"], None, dataclasses.replace(train, steps=budgeted["steps"])
    if train.steps == 0:
        return None, [], None, train
    blocks = sources.corpus(tok, train.block)
    held_out = held_sets["cpython-docs"]
    history = distill(student, teacher, blocks, train, checkpoint, resume=resume, held_out=held_out, run=run)
    gathered = None
    if world() > 1 and train.parallel == "fsdp":  # student and teacher are sharded in place
        names = {n for n, p in student.named_parameters() if p.requires_grad}
        gathered = trainable_state(student, names)  # a collective: every rank takes part
    return None, history, gathered, train


def _rank_zero_goes_on() -> bool:
    """Ends the process group after training; True on the one process that packs and saves."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # what follows is rank 0's alone
    return int(os.environ.get("RANK", "0")) == 0


def _stopped(history: list[dict], train: DistillConfig, checkpoint: Path) -> dict:
    """Training stopped early (`stop_after`): the history beside the checkpoint, and what to do."""
    (checkpoint / "history.json").write_text(json.dumps(history, indent=1))
    message = (
        f"stopped after step {history[-1]['step']} of {train.steps} ({history[-1]['tokens']:,} tokens); the "
        f"checkpoint is {checkpoint}, the history {checkpoint}/history.json: rerun with --resume to go on"
    )
    return {"stopped": message, "history": history}


def _rebuild(sources: Sources, config: BinaryConfig, gathered: dict) -> tuple:
    """(teacher, a plain student holding FSDP's gathered tensors), made from a fresh model."""
    teacher, _ = sources.load()
    student = binarize_(copy.deepcopy(teacher).float(), config)
    result = student.load_state_dict(gathered, strict=False)
    if result.unexpected_keys or set(gathered) - set(student.state_dict()):
        raise SqueezegenError(f"the gathered FSDP state does not fit the rebuilt student: {result.unexpected_keys}")
    return teacher, student.eval()


def _report(model_name, config, teacher, student, held_sets, train, done, train_s, budgeted, run, history) -> dict:
    """The measurements of the packed student beside its float teacher, and how it was trained."""
    held = {
        name: {"tokens": b.numel(), "float": block_perplexity(teacher, b), "binary": block_perplexity(student, b)}
        for name, b in held_sets.items()
    }
    return {
        "model": model_name,
        "dtype": str(teacher.dtype).removeprefix("torch."),
        "host": host(),
        "binarization": config_to_dict(config),
        "train": {
            **train.__dict__,
            "tokens": done * train.batch * train.block * world(),
            "world": world(),
            "seconds": train_s,
        },
        "recipe": recipe_report(budgeted, run, train),
        "eval_tokens": held_sets["cpython-docs"].numel(),
        "perplexity_float": held["cpython-docs"]["float"],
        "perplexity_binary": held["cpython-docs"]["binary"],
        "held_out": held,
        "bits_per_weight": bits_per_weight(student),
        "bytes": stored_bytes(student),
        "float_model_bytes": resident_bytes(teacher),
        "binary_model_resident_bytes": resident_bytes(student),
        "history": history,  # per step: loss, kl, hidden, lr, grad_norm, tokens (+ held_out_perplexity)
        "held_out_curve": [
            {k: r[k] for k in ("step", "tokens", "held_out_perplexity")} for r in history if "held_out_perplexity" in r
        ],
    }


def default_train_tokens(seconds: float) -> int:
    """Training tokens for a time budget: more text for more time (~60 a second, 16K to 512K), so
    the block stage sees its text a few times and spends little on passing it from block to block."""
    return int(min(max(seconds * 60, 16_384), 524_288))


def measuring_seconds(teacher: torch.nn.Module, held_sets: dict, batch: int = 4) -> float:
    """About how long the measurements after training take, kept off a time budget: the held-out
    sets through the float model and through the packed one (about 1.5x its time), timed on one
    batch, plus packing."""
    ids = next(iter(held_sets.values()))[:batch]
    block_perplexity(teacher, ids, batch)  # the first call pays one-time setup: not timed
    begun = time.perf_counter()
    block_perplexity(teacher, ids, batch)
    per_block = (time.perf_counter() - begun) / len(ids)
    return per_block * sum(len(b) for b in held_sets.values()) * 2.5 + 5.0


def train_in_time(
    teacher,
    tok,
    student,
    train: DistillConfig,
    run: dict,
    folder: Path,
    resume: bool,
    held_sets: dict,
    started: float,
    sources: Sources,
) -> dict:
    """The time-budget path: the training text (kept in `folder` for a resumed run), then
    `recipe.train_in_budget` in what is left of the budget."""
    budget = run["time_budget"]
    saved = folder / "train_blocks.pt"
    if resume and saved.is_file():
        data = torch.load(saved, weights_only=True)
        blocks, counts = data["blocks"], data["counts"]
    else:
        tokens = run["train_tokens"] or default_train_tokens(budget)
        blocks, counts = sources.training_text(
            tok, tokens, train.block, teacher, train.seed, tuple(run["data"]), teacher_seconds=0.05 * budget
        )
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"blocks": blocks, "counts": counts}, saved)
    share = run.get("block_share", 0.0)
    left = budget - measuring_seconds(teacher, held_sets) - (time.perf_counter() - started)
    if left <= 0:
        raise SqueezegenError(f"--time-budget {budget:g} s is spent before training starts: give more time")
    blockwise = BlockwiseConfig(seconds=1.0, lr=run.get("block_lr", 1e-2), bf16=train.bf16, seed=train.seed)
    recipe = BudgetRecipe(seconds=left, block_share=share, blocks=blockwise, end_to_end=train)
    result = train_in_budget(student, teacher, blocks, recipe, folder, resume, held_sets["cpython-docs"], run)
    return {**result, "data": counts, "seconds": left}


def recipe_report(budgeted: dict | None, run: dict | None, train: DistillConfig) -> dict | None:
    """What the time-budget path did: its sources' tokens, each block's steps and losses, the
    end-to-end steps."""
    if budgeted is None:
        return None
    return {
        "recipe": run["recipe"],
        "time_budget": run["time_budget"],
        "training_seconds": budgeted["seconds"],
        "data_tokens": budgeted["data"],
        "blocks": budgeted["blocks"],
        "end_to_end_steps": budgeted["steps"],
        "end_to_end_tokens": budgeted["steps"] * train.batch * train.block,
    }


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers in memory, as it runs."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def world() -> int:
    """Processes training together (torchrun's WORLD_SIZE; 1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
