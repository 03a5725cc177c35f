"""`squeezegen eval`: tasks x context lengths x methods x budgets x question modes, on one model."""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm.auto import tqdm

from squeezegen.errors import SqueezegenError
from squeezegen.evals.fanout import answer_all
from squeezegen.evals.tasks import TASKS, make_sample
from squeezegen.methods.spec import MethodSpec, expand
from squeezegen.runtime.generate import Decoding, encode

MODES = {"seen": True, "unseen": False}  # was the question inside the compressed prompt?


@dataclass
class EvalConfig:
    tasks: list[str]
    contexts: list[int]
    methods: list[MethodSpec]
    budgets: list[float | int]
    samples: int = 20
    modes: list[str] = field(default_factory=lambda: ["seen", "unseen"])
    seed: int = 0
    max_new_tokens: int = 32
    chat: bool = True

    def __post_init__(self) -> None:
        for task in self.tasks:
            if task not in TASKS:
                raise SqueezegenError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
        for mode in self.modes:
            if mode not in MODES:
                raise SqueezegenError(f"unknown question mode {mode!r}; use 'seen' and/or 'unseen'")
        if self.samples < 1:
            raise SqueezegenError("samples must be at least 1")


def run_eval(model, tokenizer, config: EvalConfig, progress: bool = True) -> list[dict]:
    """One record per (task, context, sample, mode, method, budget): score, output and costs."""
    limit = model.config.max_position_embeddings
    for context in config.contexts:
        if context + config.max_new_tokens + 100 > limit:
            raise SqueezegenError(
                f"context {context} is beyond what the model takes ({limit} tokens with question and answer)"
            )
    decoding = Decoding(config.max_new_tokens)
    records = []
    total = len(config.tasks) * len(config.contexts) * config.samples
    bar = tqdm(total=total, desc="eval", unit="sample", disable=not progress)
    for context in config.contexts:
        for task in config.tasks:
            for i in range(config.samples):
                sample = make_sample(task, tokenizer, context, config.seed + i)
                (chunks,) = encode(tokenizer, [sample.question], [sample.context], config.chat)
                methods = expand(config.methods, config.budgets)
                labelled = {f"{label}@{budget}": m for (label, budget), m in methods.items()}
                for mode in config.modes:
                    results = answer_all(model, tokenizer, chunks, labelled, decoding, MODES[mode])
                    for (label, budget), res in zip(methods, results.values(), strict=True):
                        records.append(
                            {
                                "task": task,
                                "context": context,
                                "sample": i,
                                "mode": mode,
                                "method": label,
                                "budget": budget,
                                "score": sample.score(res.texts[0]),
                                "output": res.texts[0],
                                "answers": list(sample.answers),
                                "prompt_tokens": res.prompt_lengths[0],
                                "kv_bytes": res.kv_bytes,
                            }
                        )
                bar.update(1)
    bar.close()
    return records
