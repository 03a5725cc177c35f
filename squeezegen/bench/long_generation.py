"""`squeezegen bench-long`: throughput and KV memory of long generations from a short prompt.

Decode-time compressors (RPC, H2O, TOVA, StreamingLLM) pay off as the output grows, so every
method generates the longest length once and is read at each checkpoint length on the way. The
methods advance in lockstep, one decode step each in a rotating order, every step timed on its
own: whatever else the machine does falls on all methods alike, and each ratio to the full cache
comes from the same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from squeezegen.bench.runner import plot_panels
from squeezegen.errors import SqueezegenError
from squeezegen.evals.corpus import prose
from squeezegen.methods.spec import MethodSpec, matched_budget
from squeezegen.runtime.engine import Engine
from squeezegen.runtime.timing import synchronize

RECENT_STEPS = 512  # the "at length" throughput: the decode steps just before a checkpoint


@dataclass
class LongGenerationConfig:
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 7168])  # generated tokens per row
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    methods: list[MethodSpec] = field(default_factory=list)  # full is always measured too
    prompt_tokens: int = 128
    kv_budget: int | None = None  # token cap of the budgeted methods; None: RPC's peak (see below)


def _prompts(tokenizer, batch: int, tokens: int, device: torch.device) -> torch.Tensor:
    """`batch` different real passages of exactly `tokens` tokens each (no padding)."""
    rows = [tokenizer(prose(tokenizer, tokens + 1024, seed=row)).input_ids[:tokens] for row in range(batch)]
    return torch.tensor(rows, device=device)


def run_long_generation(model, tokenizer, config: LongGenerationConfig, progress: bool = True) -> list[dict]:
    """One row per (batch, method, checkpoint length), with ratios to full of the same run."""
    device = next(model.parameters()).device
    longest = max(config.lengths)
    if min(config.lengths) < 2:
        raise SqueezegenError("generation lengths must be at least 2 tokens")
    if config.prompt_tokens + longest > model.config.max_position_embeddings:
        raise SqueezegenError(
            f"prompt {config.prompt_tokens} + {longest} generated tokens exceeds the model's "
            f"{model.config.max_position_embeddings}-token context"
        )
    budget = config.kv_budget or matched_budget(config.methods, config.prompt_tokens, longest)
    specs = [MethodSpec.parse("full")] + [s for s in config.methods if s.name != "full"]
    built = {s.label: s.build(budget) for s in specs}
    checkpoints = sorted(set(config.lengths))
    rows = []
    for batch in config.batch_sizes:
        ids = _prompts(tokenizer, batch, config.prompt_tokens, device)
        engines = {label: Engine(model, m, reserve=longest - 1) for label, m in built.items()}
        tokens = {label: engine.prefill(ids).argmax(-1) for label, engine in engines.items()}
        elapsed = {label: [0.0] for label in engines}  # cumulative decode seconds after each step
        labels = list(engines)
        bar = tqdm(total=longest - 1, desc=f"batch {batch}", unit="step", disable=not progress)
        for step in range(1, longest):  # the first token came from the prefill
            shift = step % len(labels)
            for label in labels[shift:] + labels[:shift]:
                start = time.perf_counter()
                tokens[label] = engines[label].decode(tokens[label]).argmax(-1)
                synchronize(device)
                elapsed[label].append(elapsed[label][-1] + time.perf_counter() - start)
            bar.update(1)
            if step + 1 not in checkpoints:
                continue
            steps = step
            recent = min(RECENT_STEPS, steps)
            measured = {}
            for label, engine in engines.items():
                seconds = elapsed[label]
                measured[label] = {
                    "tok_s": batch * steps / seconds[steps],
                    "recent_tok_s": batch * recent / (seconds[steps] - seconds[steps - recent]),
                    "kv_bytes": engine.cache.peak_bytes,
                    "cache_tokens": max(engine.cache.lengths()),
                }
            full = measured["full"]
            for label, m in measured.items():
                rows.append(
                    {
                        "batch": batch,
                        "generated": step + 1,
                        "method": label,
                        "prompt_tokens": config.prompt_tokens,
                        "kv_budget": budget,
                        **m,
                        "speedup": m["tok_s"] / full["tok_s"],
                        "recent_speedup": m["recent_tok_s"] / full["recent_tok_s"],
                        "kv_fraction": m["kv_bytes"] / full["kv_bytes"],
                    }
                )
        bar.close()
        del engines
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| batch | generated | method | tok/s | vs full | tok/s, last 512 steps | vs full | peak KV MiB "
        "| KV vs full | cache tokens at end |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['generated']} | {r['method']} | {r['tok_s']:.1f} | {r['speedup']:.2f}x "
            f"| {r['recent_tok_s']:.1f} | {r['recent_speedup']:.2f}x | {r['kv_bytes'] / 2**20:.1f} "
            f"| {r['kv_fraction']:.1%} | {r['cache_tokens']} |"
        )
    return "\n".join(lines)


def plot_throughput(rows: list[dict], path: Path) -> None:
    """Throughput and peak KV against generated length."""
    panels = [
        (lambda r: r["tok_s"], "tokens/s", "decode throughput (whole generation)"),
        (lambda r: r["kv_bytes"] / 2**20, "MiB", "peak KV cache"),
    ]
    plot_panels(rows, "generated", "generated tokens per row", panels, path)
