"""`squeezegen bench`: latency, throughput and memory of methods side by side, as ratios to full.

Every configuration (context length x batch size) runs all methods in a rotating order, several
times after a warm-up; the medians are reported and each method is divided by the full cache
measured in the same run, so machine noise falls on all methods alike.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from squeezegen.errors import SqueezegenError
from squeezegen.evals.corpus import prose
from squeezegen.methods.spec import MethodSpec
from squeezegen.runtime.generate import generate


@dataclass
class BenchConfig:
    contexts: list[int]
    methods: list[MethodSpec]  # full is always measured too
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    budget: float | int = 0.25  # for every method that takes a budget and was given none
    new_tokens: int = 64
    repeats: int = 3
    compile: bool | None = None  # the decode step through torch.compile (None: where it pays)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the resident-set high-water mark of this process
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _peak_memory(device: torch.device) -> int:
    """Peak bytes since the last reset: GPU memory allocated on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_bench(model, tokenizer, config: BenchConfig, progress: bool = True) -> list[dict]:
    """One row per (context, batch, method): medians and ratios to full of the same run."""
    device = next(model.parameters()).device
    limit = model.config.max_position_embeddings
    for context in config.contexts:
        if context + config.new_tokens > limit:
            raise SqueezegenError(f"context {context} + {config.new_tokens} new tokens exceeds the model's {limit}")
    specs = [MethodSpec.parse("full")] + [s for s in config.methods if s.name != "full"]
    methods = {s.label: s.build(config.budget) for s in specs}
    generate(model, tokenizer, prose(tokenizer, 256), max_new_tokens=4)  # warm-up
    rows = []
    steps = len(config.contexts) * len(config.batch_sizes) * config.repeats * len(methods)
    bar = tqdm(total=steps, desc="bench", unit="run", disable=not progress)
    for context in config.contexts:
        for batch in config.batch_sizes:
            prompts = [prose(tokenizer, context, seed=row) for row in range(batch)]
            runs: dict[str, list[dict]] = {label: [] for label in methods}
            labels = list(methods)
            # a compiled step compiles for each new buffer size: an untimed round first
            for repeat in range(-1 if config.compile else 0, config.repeats):
                shift = repeat % len(labels)
                for label in labels[shift:] + labels[:shift]:  # rotate who goes first
                    _reset_peak_memory(device)
                    res = generate(
                        model,
                        tokenizer,
                        prompts,
                        method=methods[label],
                        max_new_tokens=config.new_tokens,
                        ignore_eos=True,
                        compile=config.compile,
                    )
                    if repeat < 0:
                        continue
                    t = res.timings
                    runs[label].append(
                        {
                            "prefill_s": t.prefill_s,
                            "ttft_s": t.first_token_s,
                            "decode_tok_s": t.decode_tokens_per_s,
                            "kv_bytes": res.kv_bytes,
                            "kv_bytes_decode": res.kv_bytes_decode,
                            "peak_memory_bytes": _peak_memory(device),
                            "prompt_tokens": max(res.prompt_lengths),
                        }
                    )
                    bar.update(1)
            medians = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for label, rs in runs.items()}
            full = medians["full"]
            for label, m in medians.items():
                rows.append(
                    {
                        "context": context,
                        "batch": batch,
                        "method": label,
                        **m,
                        "prefill_speedup": full["prefill_s"] / m["prefill_s"],
                        "decode_speedup": m["decode_tok_s"] / full["decode_tok_s"],
                        "kv_fraction": m["kv_bytes"] / full["kv_bytes"],
                    }
                )
    bar.close()
    return rows


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| context | batch | method | prefill s | TTFT s | decode tok/s | peak KV MiB | decode KV MiB "
        "| peak memory MiB | prefill vs full | decode vs full | KV vs full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['batch']} | {r['method']} | {r['prefill_s']:.2f} | {r['ttft_s']:.2f} "
            f"| {r['decode_tok_s']:.1f} | {r['kv_bytes'] / 2**20:.1f} | {_mib(r.get('kv_bytes_decode'))} "
            f"| {r['peak_memory_bytes'] / 2**20:.0f} "
            f"| {r['prefill_speedup']:.2f}x | {r['decode_speedup']:.2f}x | {r['kv_fraction']:.1%} |"
        )
    return "\n".join(lines)


def plot_panels(rows: list[dict], x: str, xlabel: str, panels: list[tuple], path: Path) -> None:
    """Side-by-side line plots against `x`, one line per method (and batch size when there are
    several); `panels` holds (value of a row, y label, title) per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    batches = sorted({r["batch"] for r in rows})
    for label in dict.fromkeys(r["method"] for r in rows):
        for batch in batches:
            points = sorted((r[x], r) for r in rows if r["method"] == label and r["batch"] == batch)
            name = label if len(batches) == 1 else f"{label} (batch {batch})"
            for ax, (value, _, _) in zip(axes, panels, strict=True):
                ax.plot([p for p, _ in points], [value(r) for _, r in points], marker="o", label=name)
    for ax, (_, ylabel, title) in zip(axes, panels, strict=True):
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(rows: list[dict], path: Path) -> None:
    """Prefill seconds and decode tokens/s against context length."""
    panels = [
        (lambda r: r["prefill_s"], "prefill s", "prefill latency"),
        (lambda r: r["decode_tok_s"], "tokens/s", "decode throughput"),
    ]
    plot_panels(rows, "context", "context tokens", panels, path)
