"""Decode speed and memory of binarized (packed) models beside their float model, measured in one run.

Rounds interleave the models, each round in an order rotated by one, so that background load (and
whatever one model leaves in the caches for the next) falls on all alike; each model's figure is
the median of its rounds. Memory is what the tensors of the
decoder layers' linear layers hold while the model runs (for packed layers: the signs, the scales,
router and bias, and the float32 copies of them the kernel keeps), counted per weight of those
layers; the embeddings and the LM head (often tied, counted once), which stay 16-bit or wider, are
reported apart.
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

from squeezegen.runtime.generate import generate

DECODE_PROMPT = "The interpreter reads each statement, checks it, and then"


def decode_tokens_per_s(model, tokenizer, tokens: int) -> float:
    result = generate(model, tokenizer, DECODE_PROMPT, max_new_tokens=tokens, ignore_eos=True)
    return result.timings.decode_tokens_per_s


def compare_decode(models: dict, tokenizer, tokens: int = 32, rounds: int = 3) -> dict[str, float]:
    """Median decode tokens/s per labelled model over interleaved, rotated rounds (after one warm-up each)."""
    for model in models.values():
        decode_tokens_per_s(model, tokenizer, 2)
    runs: dict[str, list[float]] = {label: [] for label in models}
    labels = list(models)
    for r in range(rounds):  # each round starts one model later: none always follows the same one
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            runs[label].append(decode_tokens_per_s(models[label], tokenizer, tokens))
    return {label: statistics.median(values) for label, values in runs.items()}


def _bytes(tensors) -> int:
    """Bytes of the memory behind `tensors`, each storage once (a float32 kernel copy of a float32
    scale is the scale itself; a tied head is the embedding)."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if isinstance(t, torch.Tensor)
    }
    return sum(storages.values())


def model_memory(model: nn.Module) -> dict:
    """Resident bytes of a model's decoder linear layers (and per weight), of its embeddings and
    head, and of the whole model. Call it after a forward pass, so packed layers hold their kernel copies."""
    from squeezegen.quant.api import decoder_layers
    from squeezegen.quant.binary import BinaryLinear

    linear, weights = [], 0
    for block in decoder_layers(model):
        binary = [m for m in block.modules() if isinstance(m, BinaryLinear)]
        inside = {id(sub) for m in binary for sub in m.modules()}
        for m in binary:
            linear += [*m.parameters(), *m.buffers(), *getattr(m, "_kernel_args", ())]
            weights += m.in_features * m.out_features
        for m in block.modules():
            if isinstance(m, nn.Linear) and id(m) not in inside:
                linear += [*m.parameters(), *m.buffers()]
                weights += m.in_features * m.out_features
    ends = [*model.get_input_embeddings().parameters()]
    head = model.get_output_embeddings()
    ends += [*head.parameters()] if head is not None else []
    everything = [*model.parameters(), *model.buffers()]
    everything += [t for m in model.modules() if isinstance(m, BinaryLinear) for t in getattr(m, "_kernel_args", ())]
    linear_bytes = _bytes(linear)
    return {
        "decoder_linear_bytes": linear_bytes,
        "decoder_linear_weights": weights,
        "bytes_per_weight": linear_bytes / weights,
        "embedding_head_bytes": _bytes(ends),
        "resident_bytes": _bytes(everything),
    }


def compute_dtype(model: nn.Module) -> torch.dtype:
    """What the decoder blocks compute in (a packed model's embedding and head stay float16)."""
    ends = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    return next(p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in ends)


def compare_models(models: dict, tokenizer, tokens: int = 32, rounds: int = 3, reference: str | None = None) -> list:
    """One row per labelled model: decode tokens/s (interleaved, medians), its ratio to the
    `reference` row (default: the first), the dtype it computes in, and `model_memory`."""
    speeds = compare_decode(models, tokenizer, tokens, rounds)
    reference = reference or next(iter(models))
    rows = []
    for label, model in models.items():
        row = {"model": label, "dtype": str(compute_dtype(model)).removeprefix("torch.")}
        row.update(decode_tok_s=speeds[label], vs_reference=speeds[label] / speeds[reference])
        row.update(model_memory(model))
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], reference: str) -> str:
    """`compare_models`' rows as a table; `reference` names the row the speeds are divided by."""
    mib = 2**20
    lines = [
        f"| model | dtype | decode tokens/s | vs {reference} | decoder linear MiB | bytes/weight "
        "| embedding+head MiB | whole model MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['decode_tok_s']:.1f} | {r['vs_reference']:.2f}x "
            f"| {r['decoder_linear_bytes'] / mib:.2f} | {r['bytes_per_weight']:.3f} "
            f"| {r['embedding_head_bytes'] / mib:.2f} | {r['resident_bytes'] / mib:.2f} |"
        )
    return "\n".join(lines)
