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
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from squeezegen.cli import common
from squeezegen.errors import SqueezegenError

if TYPE_CHECKING:
    from squeezegen.quant.api import BinaryConfig
    from squeezegen.quant.distill import DistillConfig
    from squeezegen.quant.workflow import Sources


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
        from squeezegen.quant.workflow import world

        if world() > 1:
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
    from squeezegen.quant.workflow import REPORT, binarize_and_train

    started = time.perf_counter()  # a --time-budget counts from here: loading and data are in it
    binarization, train, run = binarize_settings(args)
    out = Path(args.out)
    if not out.is_dir() or any(out.iterdir()):  # an empty folder holds nothing to lose
        claim({"model": out}, args.overwrite)  # before the model is loaded
    refuse_unwritable(out)
    report = binarize_and_train(
        args.model,
        binarization,
        train,
        out,
        binarize_sources(args.model, args.device, args.dtype),
        run=run,
        resume=args.resume,
        overwrite=args.overwrite,
        decode_tokens=args.decode_tokens,
        eval_blocks=args.eval_blocks,
        started=started,
    )
    if report is not None and report.get("stopped"):
        print(report["stopped"])
    elif report is not None:
        print("\n".join(summary_lines(report)))
        print(f"wrote {args.out} (load it with sg.load) and {args.out}/{REPORT}")


def binarize_sources(model_name: str, device: str, dtype: str) -> Sources:
    """The binarize workflow's model, texts and decode timing: the model loaded by name in `dtype`
    (under torchrun each process on its own GPU), the bundled corpus and held-out sets."""
    from squeezegen.bench.binary_decode import compare_decode
    from squeezegen.evals.corpus import split_text, token_blocks
    from squeezegen.evals.training_text import held_out_blocks, training_blocks
    from squeezegen.models.loading import load
    from squeezegen.quant.workflow import Sources

    if device.startswith("cuda") and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    return Sources(
        load=lambda: load(model_name, dtype=dtype, device=device),
        held_out=held_out_blocks,
        corpus=lambda tok, block: token_blocks(tok, split_text("train"), block),
        training_text=training_blocks,
        decode_speeds=compare_decode,
    )


def summary_lines(report: dict) -> list[str]:
    """The report of `binarize_and_train`, as the command prints it."""
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
