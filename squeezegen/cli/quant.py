"""`squeezegen binarize`: binarize a model, distill it from its float self, measure, save packed.

The training text is the first 90% of the bundled corpus; perplexity is measured on the held-out
10% (at the end, and every `--eval-every` steps during distillation: the perplexity-vs-tokens
curve lands in the report's history). Decode speed of the packed model and the float model is
measured side by side in one run (interleaved rounds, medians).

Under `torchrun`, `--parallel ddp` keeps a whole student per process and averages gradients;
`--parallel fsdp` shards student and teacher layer by layer (FSDP2). Either way the trained
tensors are gathered at the end and rank 0 alone packs, measures and saves a plain model.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from squeezegen.cli import common
from squeezegen.errors import SqueezegenError

if TYPE_CHECKING:
    import torch

    from squeezegen.quant.api import BinaryConfig
    from squeezegen.quant.distill import DistillConfig


def binarize_settings(args: argparse.Namespace) -> tuple[BinaryConfig, DistillConfig, dict]:
    """(binarization, training settings, run) of `binarize`'s flags; `run` (the model, the
    binarization, the dtype, the held-out blocks) and the training settings are what a --resume
    must find again in the checkpoint (`distill.resume_key`)."""
    from squeezegen.evals.training_text import SOURCES
    from squeezegen.quant.api import BinaryMoSConfig, OneBitConfig, SignConfig, config_to_dict
    from squeezegen.quant.distill import DistillConfig

    make = {"binarymos": lambda: BinaryMoSConfig(experts=args.experts), "onebit": OneBitConfig, "sign": SignConfig}
    binarization = make[args.method]()
    steps = args.steps
    if args.method == "sign" and steps and args.time_budget is None:
        print("sign is the untrained floor: no distillation")
        steps = 0
    if steps < 0 or args.batch < 1 or args.block < 2:
        raise SqueezegenError("--steps must be >= 0, --batch >= 1 and --block >= 2")
    if args.max_grad_norm < 0 or args.eval_every < 0 or (args.stop_after is not None and args.stop_after < 1):
        raise SqueezegenError("--max-grad-norm and --eval-every must be >= 0, --stop-after >= 1")
    blockwise = args.recipe == "blockwise"  # its end-to-end stage fine-tunes what the blocks learned
    train = DistillConfig(
        steps=steps,
        batch=args.batch,
        block=args.block,
        lr=args.lr if args.lr is not None else (1e-4 if blockwise else 1e-3),
        hidden_weight=args.hidden_weight,
        loss=args.loss or ("kl" if blockwise else "reference"),
        max_grad_norm=args.max_grad_norm,
        checkpointing=not args.no_checkpointing and not blockwise,
        bf16=args.bf16,
        save_every=args.save_every,
        eval_every=args.eval_every,
        parallel=args.parallel,
        stop_after=args.stop_after,
        seed=args.seed,
    )
    run = {
        "model": args.model,
        "binarization": config_to_dict(binarization),
        "dtype": common.resolve_dtype_arg(args),
        "eval_blocks": args.eval_blocks,
    }
    if args.recipe == "blockwise" and args.time_budget is None:
        raise SqueezegenError("--recipe blockwise trains in a time budget: give --time-budget SECONDS (e.g. 1200)")
    if args.time_budget is not None:
        if _world() > 1:
            raise SqueezegenError("--time-budget trains in one process (on every core): run it without torchrun")
        if args.time_budget <= 0 or (args.train_tokens is not None and args.train_tokens < args.block):
            raise SqueezegenError("--time-budget must be > 0 seconds and --train-tokens at least one --block")
        if not 0 < args.block_share <= 1 or args.block_lr <= 0:
            raise SqueezegenError("--block-share must be in (0, 1] and --block-lr > 0")
        data = tuple(args.data or (SOURCES if args.recipe == "blockwise" else ("corpus",)))
        run.update(recipe=args.recipe, time_budget=args.time_budget, data=list(data), train_tokens=args.train_tokens)
        if args.recipe == "blockwise":
            run.update(block_share=args.block_share, block_lr=args.block_lr)
    return binarization, train, run


def cmd_binarize(args: argparse.Namespace) -> None:
    from squeezegen.evals.report import claim, refuse_unwritable

    started = time.perf_counter()  # a --time-budget counts from here: loading and data are in it
    binarization, train, run = binarize_settings(args)
    out = Path(args.out)
    if not out.is_dir() or any(out.iterdir()):  # an empty folder holds nothing to lose
        claim({"model": out}, args.overwrite)  # before the model is loaded
    refuse_unwritable(out)
    report = binarize_model(
        args.model,
        binarization,
        train,
        out,
        run=run,
        resume=args.resume,
        overwrite=args.overwrite,
        decode_tokens=args.decode_tokens,
        eval_blocks=args.eval_blocks,
        device=args.device,
        dtype=args.dtype,
        started=started,
    )
    if report is not None and report.get("stopped"):
        print(report["stopped"])
    elif report is not None:
        print("\n".join(summary_lines(report)))
        print(f"wrote {args.out} (load it with sg.load) and {args.out}/binarize_report.json")


def binarize_model(
    model_name: str,
    config: BinaryConfig,
    train: DistillConfig,
    out: Path,
    run: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    decode_tokens: int = 32,
    eval_blocks: int | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    started: float | None = None,
) -> dict | None:
    """Binarize `model_name`, distill it (unless `train.steps` is 0), save the packed model to `out`
    and return the report (None on ranks other than 0 under torchrun). `run` is kept in the
    training checkpoint: a resumed run must come with the same.

    The teacher and the deployed student compute in `dtype`; the student trains float32 master
    weights (bf16 compute comes from autocast, `train.bf16`: an AdamW step on bf16 weights rounds
    small updates away) and is cast to `dtype` once trained, so perplexities, decode speeds and
    the saved checkpoint are all of the model as deployed.

    With `train.stop_after` before `train.steps`, training stops there with its checkpoint
    (OUT.ckpt) and nothing is packed or saved: the report holds `stopped` and the history, and a
    later call with `resume` goes on. Under FSDP the trained tensors are gathered on every rank,
    then rank 0 rebuilds a plain student from a fresh copy of the model and loads them.

    With a `time_budget` in `run` (seconds, counted from `started`), the student trains by
    `run["recipe"]` ("blockwise": block-wise reconstruction, then end-to-end distillation;
    "end-to-end": distillation alone) on `run["data"]`'s sources, and training ends in time for
    the final measurements: `train.steps` is then ignored."""
    import torch
    import torch.distributed as dist

    from squeezegen.bench.binary_decode import compare_decode
    from squeezegen.evals.corpus import split_text, token_blocks
    from squeezegen.evals.training_text import held_out_blocks
    from squeezegen.models.loading import load
    from squeezegen.quant.api import binarize_, bits_per_weight, config_to_dict, pack_, stored_bytes
    from squeezegen.quant.checkpoint import save
    from squeezegen.quant.distill import block_perplexity, distill, trainable_state
    from squeezegen.runtime.device import host

    if device.startswith("cuda") and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    teacher, tok = load(model_name, dtype=dtype, device=device)
    torch.manual_seed(train.seed)  # the routers' random init: the same in every process and every run
    student = binarize_(copy.deepcopy(teacher).float(), config)
    held_sets = {name: b[:eval_blocks] for name, b in held_out_blocks(tok, train.block).items()}
    held_out = held_sets["cpython-docs"]
    history: list[dict] = []
    gathered: dict | None = None
    checkpoint = out.with_name(out.name + ".ckpt")
    started = time.perf_counter() if started is None else started
    budgeted = None
    if run is not None and run.get("time_budget") is not None:
        budgeted = train_in_time(teacher, tok, student, train, run, checkpoint, resume, held_sets, started)
        history = budgeted["end_to_end"]
        train = dataclasses.replace(train, steps=budgeted["steps"])
    elif train.steps > 0:
        blocks = token_blocks(tok, split_text("train"), train.block)
        history = distill(student, teacher, blocks, train, checkpoint, resume=resume, held_out=held_out, run=run)
        if _world() > 1 and train.parallel == "fsdp":  # student and teacher are sharded in place
            names = {n for n, p in student.named_parameters() if p.requires_grad}
            gathered = trainable_state(student, names)  # a collective: every rank takes part
    train_s = time.perf_counter() - started
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # what follows is rank 0's alone
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    done = history[-1]["step"] if history else 0
    if budgeted is None and train.steps > 0 and done < train.steps:
        (checkpoint / "history.json").write_text(json.dumps(history, indent=1))
        message = (
            f"stopped after step {done} of {train.steps} ({history[-1]['tokens']:,} tokens); the checkpoint is "
            f"{checkpoint}, the history {checkpoint}/history.json: rerun with --resume to go on"
        )
        return {"stopped": message, "history": history}
    if gathered is not None:
        del student, teacher
        teacher, _ = load(model_name, dtype=dtype, device=device)
        student = binarize_(copy.deepcopy(teacher).float(), config)
        result = student.load_state_dict(gathered, strict=False)
        if result.unexpected_keys or set(gathered) - set(student.state_dict()):
            raise SqueezegenError(f"the gathered FSDP state does not fit the rebuilt student: {result.unexpected_keys}")
        student.eval()
    pack_(student.to(teacher.dtype))
    tokens = done * train.batch * train.block * _world()
    held = {
        name: {"tokens": b.numel(), "float": block_perplexity(teacher, b), "binary": block_perplexity(student, b)}
        for name, b in held_sets.items()
    }
    report = {
        "model": model_name,
        "dtype": str(teacher.dtype).removeprefix("torch."),
        "host": host(),
        "binarization": config_to_dict(config),
        "train": {**train.__dict__, "tokens": tokens, "world": _world(), "seconds": train_s},
        "recipe": _recipe_report(budgeted, run, train),
        "eval_tokens": held_out.numel(),
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
    if decode_tokens > 0:
        speeds = compare_decode({"float": teacher, "binary": student}, tok, decode_tokens)
        report["decode_tok_s_float"], report["decode_tok_s_binary"] = speeds["float"], speeds["binary"]
    save(student, tok, out, overwrite=overwrite)
    (out / "binarize_report.json").write_text(json.dumps(report, indent=1))
    return report


def default_train_tokens(seconds: float) -> int:
    """Training tokens for a time budget: more text for more time (~60 a second, 16K to 512K), so
    the block stage sees its text a few times and spends little on passing it from block to block."""
    return int(min(max(seconds * 60, 16_384), 524_288))


def measuring_seconds(teacher, held_sets: dict, batch: int = 4) -> float:
    """About how long the measurements after training take, kept off a time budget: the held-out
    sets through the float model and through the packed one (about 1.5x its time), timed on one
    batch, plus packing."""
    from squeezegen.quant.distill import block_perplexity

    ids = next(iter(held_sets.values()))[:batch]
    block_perplexity(teacher, ids, batch)  # the first call pays one-time setup: not timed
    started = time.perf_counter()
    block_perplexity(teacher, ids, batch)
    per_block = (time.perf_counter() - started) / len(ids)
    return per_block * sum(len(b) for b in held_sets.values()) * 2.5 + 5.0


def train_in_time(
    teacher, tok, student, train: DistillConfig, run: dict, folder: Path, resume: bool, held_sets: dict, started: float
) -> dict:
    """`binarize`'s time-budget path: the training text (kept in `folder` for a resumed run), then
    `recipe.train_in_budget` in what is left of the budget."""
    import torch

    from squeezegen.evals.training_text import training_blocks
    from squeezegen.quant.blockwise import BlockwiseConfig
    from squeezegen.quant.recipe import BudgetRecipe, train_in_budget

    budget = run["time_budget"]
    saved = folder / "train_blocks.pt"
    if resume and saved.is_file():
        data = torch.load(saved, weights_only=True)
        blocks, counts = data["blocks"], data["counts"]
    else:
        tokens = run["train_tokens"] or default_train_tokens(budget)
        blocks, counts = training_blocks(
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


def _recipe_report(budgeted: dict | None, run: dict | None, train: DistillConfig) -> dict | None:
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


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def summary_lines(report: dict) -> list[str]:
    """The report of `binarize_model`, as the command prints it."""
    b, mib = report["bytes"], 2**20
    resident, float_bytes = report["binary_model_resident_bytes"] / mib, report["float_model_bytes"] / mib
    recipe = report.get("recipe")
    if recipe is None:
        trained = f"distillation      {report['train']['steps']} steps, {report['train']['tokens']:,} tokens, "
    else:
        blocks = recipe["blocks"]
        per_block = sum(r["tokens"] for r in blocks) // max(1, len(blocks))
        trained = (
            f"training          {recipe['recipe']} in {recipe['time_budget']:g} s: {len(blocks)} blocks x "
            f"{per_block:,} tokens, then {recipe['end_to_end_steps']} end-to-end steps "
            f"({recipe['end_to_end_tokens']:,} tokens), "
        )
    held = "  ".join(f"{name} {p['binary']:.2f} (float {p['float']:.2f})" for name, p in report["held_out"].items())
    lines = [
        f"method            {report['binarization']}",
        trained + f"{report['train']['seconds'] / 60:.1f} min",
        f"perplexity        float {report['perplexity_float']:.2f}  binary {report['perplexity_binary']:.2f}  "
        f"(held-out, {report['eval_tokens']:,} tokens)",
        f"held-out sets     {held}",
        f"bits per weight   {report['bits_per_weight']:.3f} (binarized linear layers, scales and router included)",
        f"linear layers     {b['binary_linear'] / 2**20:.1f} MiB packed vs {b['float32_linear'] / 2**20:.1f} MiB "
        f"float32 (1/{b['float32_linear'] / b['binary_linear']:.1f})",
        f"whole model       {b['total'] / mib:.1f} MiB on disk; in memory {resident:.1f} MiB packed vs "
        f"{float_bytes:.1f} MiB float",
    ]
    if "decode_tok_s_float" in report:
        f, q = report["decode_tok_s_float"], report["decode_tok_s_binary"]
        lines.append(f"decode tokens/s   float {f:.1f}  packed binary {q:.1f}  ({q / f:.2f}x, interleaved in one run)")
    return lines


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("binarize", help="1-bit weights (BinaryMoS, OneBit, plain sign), distilled from the float model")
    p.add_argument("--model", default="smollm2-135m", help="bundled name, tiny test model, or local HF folder")
    p.add_argument(
        "--device", default="cpu", type=common.device_arg, help="cpu or cuda (under torchrun: one GPU per process)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="what the teacher and the deployed 1-bit model compute in (auto: bfloat16 where the hardware has "
        "native bf16, else float32); the student trains float32 master weights whatever it is",
    )
    p.add_argument("--method", default="binarymos", choices=["binarymos", "onebit", "sign"])
    p.add_argument("--experts", type=int, default=4, help="BinaryMoS scaling experts")
    p.add_argument("--steps", type=int, default=150, help="distillation steps (0: binarize only)")
    p.add_argument("--batch", type=int, default=2, help="blocks per step and process")
    p.add_argument("--block", type=int, default=256, help="tokens per block (training and held-out)")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak AdamW learning rate of end-to-end distillation (default 1e-3: best of the ablation at a CPU's "
        "budget; 1e-4 after the blockwise recipe's block stage; BinaryMoS's reference: 2e-5)",
    )
    p.add_argument("--hidden-weight", type=float, default=10.0, help="weight of the hidden-state MSE")
    p.add_argument(
        "--loss",
        default=None,
        choices=["reference", "normalized", "kl", "token-mean"],
        help="default reference (kl in the blockwise recipe's end-to-end stage); reference: KL summed over "
        "tokens / batch + hidden-weight x the sum of per-layer hidden MSEs (BinaryMoS); normalized: each "
        "layer's MSE divided by the teacher's mean square; kl: the KL alone; "
        "token-mean: KL averaged per token + the raw MSEs",
    )
    p.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="clip the gradients' total norm to this (0: no clipping)"
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="held-out perplexity every N steps, recorded in the report's history with the tokens seen so far "
        "(step x batch x block x processes): the perplexity-vs-tokens curve (0: only at the end)",
    )
    p.add_argument(
        "--parallel",
        default="ddp",
        choices=["ddp", "fsdp"],
        help="under torchrun: ddp (a whole student per process, gradients averaged) or fsdp (FSDP2: student "
        "and teacher sharded layer by layer, for models that outgrow one device); ignored in one process",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after step N with a checkpoint and save nothing else; a later --resume goes on "
        "(--steps still sets the schedule's length)",
    )
    p.add_argument(
        "--recipe",
        default="end-to-end",
        choices=["end-to-end", "blockwise"],
        help="end-to-end: distillation of the whole model (BinaryMoS's); blockwise: each decoder block "
        "trained to reproduce the float model's activations, then a short end-to-end distillation, in "
        "--time-budget (far lower perplexity per minute on a CPU)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="train for this long in all (loading and data included; the final measurements and save "
        "come after): --steps is then set from the time, and --resume counts the time already spent",
    )
    p.add_argument(
        "--data",
        nargs="+",
        default=None,
        choices=["corpus", "essays", "squad", "hotpotqa", "teacher"],
        help="training text with --time-budget (default: all for blockwise, corpus for end-to-end): the "
        "bundled CPython docs, RULER's essays, SQuAD and HotpotQA paragraphs, text sampled from the float "
        "model; held-out text never enters",
    )
    p.add_argument(
        "--train-tokens", type=int, default=None, help="training tokens with --time-budget (default: from the budget)"
    )
    p.add_argument(
        "--block-share", type=float, default=0.7, help="share of the budget to the block-wise stage (blockwise)"
    )
    p.add_argument("--block-lr", type=float, default=1e-2, help="AdamW learning rate of the block-wise stage")
    p.add_argument("--bf16", default="auto", choices=["auto", "on", "off"], help="bf16 autocast")
    p.add_argument(
        "--no-checkpointing", action="store_true", help="keep activations (faster, more memory; always in blockwise)"
    )
    p.add_argument("--save-every", type=int, default=25, help="steps between resumable checkpoints")
    p.add_argument("--seed", type=int, default=0, help="seeds the routers' random init and the order of the blocks")
    p.add_argument(
        "--eval-blocks",
        type=int,
        default=None,
        help="held-out blocks scored, at the end and every --eval-every steps (default: all)",
    )
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens timed for decode speed (0: skip)")
    p.add_argument("--out", type=common.output_path, required=True, help="folder for the packed model")
    p.add_argument("--resume", action="store_true", help="continue from OUT.ckpt/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.set_defaults(func=cmd_binarize)
