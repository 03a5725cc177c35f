"""Decode speed of binarized (packed) models beside their float model, measured in one run.

Rounds interleave the models (float, binary, float, binary, ...) so that background load falls on
all alike; each model's figure is the median of its rounds.
"""

from __future__ import annotations

import statistics

from squeezegen.runtime.generate import generate

DECODE_PROMPT = "The interpreter reads each statement, checks it, and then"


def decode_tokens_per_s(model, tokenizer, tokens: int) -> float:
    result = generate(model, tokenizer, DECODE_PROMPT, max_new_tokens=tokens, ignore_eos=True)
    return result.timings.decode_tokens_per_s


def compare_decode(models: dict, tokenizer, tokens: int = 32, rounds: int = 3) -> dict[str, float]:
    """Median decode tokens/s per labelled model over interleaved rounds (after one warm-up each)."""
    for model in models.values():
        decode_tokens_per_s(model, tokenizer, 2)
    runs: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(rounds):
        for label, model in models.items():
            runs[label].append(decode_tokens_per_s(model, tokenizer, tokens))
    return {label: statistics.median(values) for label, values in runs.items()}


def markdown_table(speeds: dict[str, float], reference: str) -> str:
    lines = ["| model | decode tokens/s | vs " + reference + " |", "|---|---|---|"]
    for label, value in speeds.items():
        lines.append(f"| {label} | {value:.1f} | {value / speeds[reference]:.2f}x |")
    return "\n".join(lines)
