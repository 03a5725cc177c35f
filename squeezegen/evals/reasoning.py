"""Needle in the reasoning path, for decode-time compressors (RPC, H2O, TOVA, StreamingLLM).

A fact is stated early in a long text that the model is made to have generated (teacher forcing,
one decode step per token, so a method compresses exactly as it would while generating); a
question follows and the answer is generated. A 135M model cannot reason, so this measures what
a compressor preserves of its own generation rather than reasoning quality.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from squeezegen.evals.corpus import prose
from squeezegen.evals.tasks import needle_keys, needle_value
from squeezegen.methods.spec import MethodSpec, matched_budget
from squeezegen.runtime.engine import Engine
from squeezegen.runtime.generate import Decoding, decode_loop, encode, prefill_rows
from squeezegen.runtime.hooks import Method

PROMPT = "Read the documentation below carefully, think it through step by step, and keep notes."


@dataclass(frozen=True)
class ReasoningSample:
    path: str  # the forced "reasoning", the needle in its first tenth
    question: str  # forced after the path; the answer is generated
    answer: str

    def score(self, text: str) -> float:
        return float(self.answer in text)


def make_reasoning_sample(tokenizer, path_tokens: int, seed: int) -> ReasoningSample:
    """Sample `seed`: about `path_tokens` tokens of real prose with a note near its start."""
    rng = random.Random(f"reasoning-{seed}")
    key, value = needle_keys(rng, 1)[0], needle_value(rng, "number")
    paragraphs = prose(tokenizer, path_tokens, seed).split("\n\n")
    paragraphs.insert(
        rng.randint(0, max(1, len(paragraphs) // 10)), f"Note: the special magic number for the {key} is {value}."
    )
    question = (
        f"\n\nQuestion: what is the special magic number for the {key}?\n"
        f"Answer: the special magic number for the {key} is"
    )
    return ReasoningSample("\n\n".join(paragraphs), question, value)


def forced_rows(tokenizer, samples: list[ReasoningSample]) -> list[list[int]]:
    """Path + question token ids per sample, all of one length so the rows decode in lockstep:
    longer paths lose their last tokens (the note sits in the first tenth)."""
    paths = [tokenizer(s.path, add_special_tokens=False).input_ids for s in samples]
    questions = [tokenizer(s.question, add_special_tokens=False).input_ids for s in samples]
    length = min(len(p) + len(q) for p, q in zip(paths, questions, strict=True))
    return [p[: length - len(q)] + q for p, q in zip(paths, questions, strict=True)]


@torch.inference_mode()
def answer_after_paths(
    model,
    tokenizer,
    samples: list[ReasoningSample],
    method: Method | None = None,
    max_new_tokens: int = 12,
    progress: bool = False,
) -> tuple[list[str], Engine]:
    """Prefill the prompt, force each row's path and question (one batch; token by token for a
    method that compresses while decoding), generate the answers."""
    forced = torch.tensor(forced_rows(tokenizer, samples))
    engine = Engine(model, method, reserve=forced.shape[1] + max_new_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logits = prefill_rows(engine, encode(tokenizer, [PROMPT] * len(samples), None, chat=True), pad)
    forced = forced.to(logits.device)
    if engine.method.compresses_while_decoding():  # one decode step per token, as in generation
        for i in tqdm(range(forced.shape[1]), desc="forcing", unit="tok", leave=False, disable=not progress):
            logits = engine.decode(forced[:, i])
    else:  # the cache changes only by appending: one chunk computes the same
        logits = engine.prefill(forced, compress=False)
    result = decode_loop(engine, tokenizer, logits, Decoding(max_new_tokens), prefill_s=0.0)
    return result.texts, engine


def answer_after_path(
    model, tokenizer, sample: ReasoningSample, method: Method | None = None, max_new_tokens: int = 12
) -> tuple[str, Engine]:
    """One sample of `answer_after_paths`."""
    texts, engine = answer_after_paths(model, tokenizer, [sample], method, max_new_tokens)
    return texts[0], engine


def run_reasoning_needle(
    model,
    tokenizer,
    specs: list[MethodSpec],
    path_tokens: int,
    samples: int = 20,
    batch_size: int = 20,
    seed: int = 0,
    max_new_tokens: int = 12,
    kv_budget: int | None = None,
) -> tuple[list[dict], int]:
    """One record per (method, sample), the full cache first: the answer, its score and the peak
    KV bytes per row. Every method sees the same seeded samples. Budgeted methods get `kv_budget`
    tokens, by default RPC's peak cache over this generation. Returns the records and the budget."""
    made = [make_reasoning_sample(tokenizer, path_tokens, seed + i) for i in range(samples)]
    prompt = len(encode(tokenizer, [PROMPT], None, chat=True)[0][0])
    budget = kv_budget or matched_budget(specs, prompt, len(forced_rows(tokenizer, made)[0]) + max_new_tokens)
    specs = [MethodSpec.parse("full")] + [s for s in specs if s.name != "full"]
    batches = [made[i : i + batch_size] for i in range(0, samples, batch_size)]
    records = []
    bar = tqdm(total=len(specs) * len(batches), desc="reasoning needle", unit="batch")
    for spec in specs:
        for start, batch in zip(range(0, samples, batch_size), batches, strict=True):
            texts, engine = answer_after_paths(model, tokenizer, batch, spec.build(budget), max_new_tokens, True)
            for i, (sample, text) in enumerate(zip(batch, texts, strict=True)):
                records.append(
                    {
                        "method": spec.label,
                        "sample": seed + start + i,
                        "answer": sample.answer,
                        "output": text,
                        "score": sample.score(text),
                        "kv_bytes_per_row": engine.cache.peak_bytes // len(batch),
                    }
                )
            bar.update(1)
    bar.close()
    return records, budget


def accuracy_table(records: list[dict]) -> str:
    lines = ["| method | accuracy | samples | peak KV MiB per sample |", "|---|---|---|---|"]
    for label in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == label]
        acc = sum(r["score"] for r in rs) / len(rs)
        kv = max(r["kv_bytes_per_row"] for r in rs) / 2**20
        lines.append(f"| {label} | {acc:.0%} | {len(rs)} | {kv:.1f} |")
    return "\n".join(lines)
