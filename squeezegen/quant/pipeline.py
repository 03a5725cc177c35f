"""`squeezegen binarize`: binarize a model, distill it from its float self, measure, save packed.

The training text is the first 90% of the bundled corpus; perplexity is measured on the held-out
10%. Decode speed of the packed model and the float model is measured side by side in one run
(interleaved rounds, medians).
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

from squeezegen.bench.binary_decode import compare_decode
from squeezegen.errors import SqueezegenError
from squeezegen.quant.api import BinaryConfig, binarize_, bits_per_weight, config_to_dict, pack_, stored_bytes
from squeezegen.quant.checkpoint import save
from squeezegen.quant.distill import DistillConfig, distill


def binarize_model(
    model_name: str,
    config: BinaryConfig,
    train: DistillConfig,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    decode_tokens: int = 32,
    eval_blocks: int | None = None,
    device: str = "cpu",
) -> dict | None:
    """Binarize `model_name`, distill (unless `train.steps` is 0), save the packed model to `out`
    and return the report (None on ranks other than 0 under torchrun)."""
    import squeezegen as sg
    from squeezegen.evals.corpus import split_text, token_blocks
    from squeezegen.evals.perplexity import block_perplexity

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SqueezegenError(f"{out} exists and is not empty: choose a new --out or pass --overwrite")
    if device.startswith("cuda") and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    teacher, tok = sg.load(model_name, device=device)
    student = binarize_(copy.deepcopy(teacher), config)
    history: list[dict] = []
    started = time.perf_counter()
    if train.steps > 0:
        blocks = token_blocks(tok, split_text("train"), train.block)
        history = distill(student, teacher, blocks, train, out.with_name(out.name + ".ckpt"), resume=resume)
    train_s = time.perf_counter() - started
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    pack_(student)
    held_out = token_blocks(tok, split_text("test"), train.block)[:eval_blocks]
    report = {
        "model": model_name,
        "binarization": config_to_dict(config),
        "train": {**train.__dict__, "tokens": train.steps * train.batch * train.block * _world(), "seconds": train_s},
        "eval_tokens": held_out.numel(),
        "perplexity_float": block_perplexity(teacher, held_out),
        "perplexity_binary": block_perplexity(student, held_out),
        "bits_per_weight": bits_per_weight(student),
        "bytes": stored_bytes(student),
        "float_model_bytes": resident_bytes(teacher),
        "binary_model_resident_bytes": resident_bytes(student),
        "history": history,
    }
    if decode_tokens > 0:
        speeds = compare_decode({"float": teacher, "binary": student}, tok, decode_tokens)
        report["decode_tok_s_float"], report["decode_tok_s_binary"] = speeds["float"], speeds["binary"]
    save(student, tok, out, overwrite=overwrite)
    (out / "binarize_report.json").write_text(json.dumps(report, indent=1))
    return report


def resident_bytes(model) -> int:
    """Bytes of a model's parameters and buffers in memory, as it runs."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def summary_lines(report: dict) -> list[str]:
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
