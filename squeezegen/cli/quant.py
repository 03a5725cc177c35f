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
    from squeezegen.quant.api import BinaryMoSConfig, OneBitConfig, SignConfig, config_to_dict
    from squeezegen.quant.distill import DistillConfig

    make = {"binarymos": lambda: BinaryMoSConfig(experts=args.experts), "onebit": OneBitConfig, "sign": SignConfig}
    binarization = make[args.method]()
    steps = args.steps
    if args.method == "sign" and steps:
        print("sign is the untrained floor: no distillation")
        steps = 0
    if steps < 0 or args.batch < 1 or args.block < 2:
        raise SqueezegenError("--steps must be >= 0, --batch >= 1 and --block >= 2")
    if args.max_grad_norm < 0 or args.eval_every < 0 or (args.stop_after is not None and args.stop_after < 1):
        raise SqueezegenError("--max-grad-norm and --eval-every must be >= 0, --stop-after >= 1")
    train = DistillConfig(
        steps=steps,
        batch=args.batch,
        block=args.block,
        lr=args.lr,
        hidden_weight=args.hidden_weight,
        loss=args.loss,
        max_grad_norm=args.max_grad_norm,
        checkpointing=not args.no_checkpointing,
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
    return binarization, train, run


def cmd_binarize(args: argparse.Namespace) -> None:
    from squeezegen.evals.report import claim, refuse_unwritable

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
    then rank 0 rebuilds a plain student from a fresh copy of the model and loads them."""
    import torch
    import torch.distributed as dist

    from squeezegen.bench.binary_decode import compare_decode
    from squeezegen.evals.corpus import split_text, token_blocks
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
    held_out = token_blocks(tok, split_text("test"), train.block)[:eval_blocks]
    history: list[dict] = []
    gathered: dict | None = None
    checkpoint = out.with_name(out.name + ".ckpt")
    started = time.perf_counter()
    if train.steps > 0:
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
    if train.steps > 0 and done < train.steps:
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
    report = {
        "model": model_name,
        "dtype": str(teacher.dtype).removeprefix("torch."),
        "host": host(),
        "binarization": config_to_dict(config),
        "train": {**train.__dict__, "tokens": tokens, "world": _world(), "seconds": train_s},
        "eval_tokens": held_out.numel(),
        "perplexity_float": block_perplexity(teacher, held_out),
        "perplexity_binary": block_perplexity(student, held_out),
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
    lines = [
        f"method            {report['binarization']}",
        f"distillation      {report['train']['steps']} steps, {report['train']['tokens']:,} tokens, "
        f"{report['train']['seconds'] / 60:.1f} min",
        f"perplexity        float {report['perplexity_float']:.2f}  binary {report['perplexity_binary']:.2f}  "
        f"(held-out, {report['eval_tokens']:,} tokens)",
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
        default=1e-3,
        help="peak AdamW learning rate (1e-3: best of the ablation at a CPU's budget; BinaryMoS's reference: 2e-5)",
    )
    p.add_argument("--hidden-weight", type=float, default=10.0, help="weight of the hidden-state MSE")
    p.add_argument(
        "--loss",
        default="reference",
        choices=["reference", "normalized", "kl", "token-mean"],
        help="reference: KL summed over tokens / batch + hidden-weight x the sum of per-layer hidden MSEs "
        "(BinaryMoS); normalized: each layer's MSE divided by the teacher's mean square; kl: the KL alone; "
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
    p.add_argument("--bf16", default="auto", choices=["auto", "on", "off"], help="bf16 autocast")
    p.add_argument("--no-checkpointing", action="store_true", help="keep activations (faster, more memory)")
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
