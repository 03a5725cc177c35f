"""A single fact hidden in real prose, then asked for: the simplest long-context retrieval check."""

from __future__ import annotations

import random
from dataclasses import dataclass

from squeezegen.evals.corpus import prose

_PLACES = ("observatory", "harbour", "library", "orchard", "lighthouse", "foundry", "monastery", "glacier")


@dataclass(frozen=True)
class NeedleSample:
    context: str  # prose with the needle sentence inside
    question: str
    answer: str
    depth: float  # where the needle sits, 0 = start of the context, 1 = end

    @property
    def prompt(self) -> str:
        """Context and question in one prompt (the question is seen before any compression)."""
        return f"{self.context}\n\n{self.question}"

    def is_correct(self, text: str) -> bool:
        return self.answer in text


def needle_sample(tokenizer, context_tokens: int, seed: int) -> NeedleSample:
    """A seeded 7-digit number for a named place, at a seeded depth in ~`context_tokens` of prose."""
    rng = random.Random(seed)
    place = rng.choice(_PLACES)
    value = str(rng.randint(1_000_000, 9_999_999))
    paragraphs = prose(tokenizer, context_tokens - 80, seed).split("\n\n")
    depth = rng.random()
    paragraphs.insert(round(depth * len(paragraphs)), f"The special magic number for the {place} is {value}.")
    context = "Read the following text and remember the special magic number in it.\n\n" + "\n\n".join(paragraphs)
    question = f"What is the special magic number for the {place}? Answer with the number only."
    return NeedleSample(context, question, value, depth)
