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
from squeezegen.methods.base import Method
from squeezegen.runtime.engine import Engine
from squeezegen.runtime.generate import Decoding, decode_loop, encode, prefill_rows

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


@torch.inference_mode()
def answer_after_path(
    model,
    tokenizer,
    sample: ReasoningSample,
    method: Method | None = None,
    max_new_tokens: int = 12,
    progress: bool = False,
) -> tuple[str, Engine]:
    """Prefill the prompt, force the path and the question token by token, generate the answer."""
    forced = tokenizer(sample.path + sample.question, add_special_tokens=False).input_ids
    engine = Engine(model, method, reserve=len(forced) + max_new_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logits = prefill_rows(engine, encode(tokenizer, [PROMPT], None, chat=True), pad)
    device = logits.device
    for token in tqdm(forced, desc="forcing", unit="tok", leave=False, disable=not progress):
        logits = engine.decode(torch.tensor([token], device=device))
    result = decode_loop(engine, tokenizer, logits, Decoding(max_new_tokens), prefill_s=0.0)
    return result.texts[0], engine
