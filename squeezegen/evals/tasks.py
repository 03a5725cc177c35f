"""RULER-style synthetic long-context tasks, generated from a seed at any context length.

Haystacks are real prose (evals/corpus.py); needles are sentences with a key and a value. Every
sample is a context, a question asked after it, and the answers whose presence in the model's
output is scored (the fraction found, as RULER's string match).
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from squeezegen.errors import SqueezegenError
from squeezegen.evals.corpus import prose, pydoc_paragraphs

_ADJECTIVES = (
    "amber",
    "silent",
    "northern",
    "hidden",
    "crimson",
    "ancient",
    "frozen",
    "golden",
    "hollow",
    "quiet",
    "distant",
    "sunlit",
    "velvet",
    "broken",
    "narrow",
    "painted",
    "wild",
    "misty",
    "copper",
    "lonely",
)
_NOUNS = (
    "observatory",
    "harbour",
    "library",
    "orchard",
    "lighthouse",
    "foundry",
    "monastery",
    "glacier",
    "meadow",
    "canyon",
    "bridge",
    "garden",
    "fortress",
    "valley",
    "island",
    "workshop",
    "cathedral",
    "market",
    "mill",
    "tower",
)


@dataclass(frozen=True)
class Sample:
    task: str
    context: str  # the document, needles inside
    question: str  # asked after the context
    answers: tuple[str, ...]

    @property
    def prompt(self) -> str:
        """Context and question as one prompt (compression sees the question)."""
        return f"{self.context}\n\n{self.question}"

    def score(self, text: str) -> float:
        """Fraction of the expected answers found in the output (case-insensitive)."""
        lowered = text.lower()
        return sum(a.lower() in lowered for a in self.answers) / len(self.answers)


@lru_cache(maxsize=1)
def _corpus_words() -> tuple[str, ...]:
    """Distinct plain lowercase words of the corpus, 6-10 letters: needle values and CWE words."""
    words = {w for p in pydoc_paragraphs() for w in re.findall(r"\b[a-z]{6,10}\b", p)}
    return tuple(sorted(words))


def needle_keys(rng: random.Random, n: int) -> list[str]:
    pairs = rng.sample([(a, b) for a in _ADJECTIVES for b in _NOUNS], n)
    return [f"{a} {b}" for a, b in pairs]


def needle_value(rng: random.Random, kind: str) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "word":
        return rng.choice(_corpus_words())
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _hide(rng: random.Random, tokenizer, tokens: int, seed: int, needles: list[str], intro: str) -> str:
    """Prose of about `tokens` tokens with each needle sentence at a random paragraph boundary."""
    cost = len(tokenizer(" ".join([intro, *needles]), add_special_tokens=False).input_ids)
    paragraphs = prose(tokenizer, max(tokens - cost, 64), seed).split("\n\n")
    for needle in needles:
        paragraphs.insert(rng.randint(0, len(paragraphs)), needle)
    return intro + "\n\n" + "\n\n".join(paragraphs)


def _niah(kind: str, n_keys: int = 1, n_values: int = 1, n_queries: int = 1) -> Callable:
    def make(tokenizer, tokens: int, seed: int) -> tuple[str, str, tuple[str, ...]]:
        rng = random.Random(f"niah-{kind}-{n_keys}-{n_values}-{n_queries}-{seed}")
        keys = needle_keys(rng, max(n_keys, n_queries))
        asked = keys[:n_queries]
        needles, answers = [], []
        for i, key in enumerate(keys):
            for _ in range(n_values if i == 0 else 1):
                value = needle_value(rng, kind)
                if n_values > 1 and i == 0:
                    needles.append(f"One of the special magic {kind}s for the {key} is {value}.")
                else:
                    needles.append(f"The special magic {kind} for the {key} is {value}.")
                if key in asked:
                    answers.append(value)
        rng.shuffle(needles)
        intro = (
            f"Some special magic {kind}s are hidden within the following text. Make sure to memorize them. "
            f"I will quiz you about the {kind}s afterwards."
        )
        context = _hide(rng, tokenizer, tokens - 60, seed, needles, intro)
        if n_values > 1:
            question = f"What are all the special magic {kind}s for the {asked[0]}? List every one of them."
        elif n_queries > 1:
            names = ", the ".join(asked[:-1]) + f" and the {asked[-1]}"
            question = f"What are the special magic {kind}s for the {names}?"
        else:
            question = f"What is the special magic {kind} for the {asked[0]}? Answer with the {kind} only."
        return context, question, tuple(answers)

    return make


def _variable_tracking(tokenizer, tokens: int, seed: int, hops: int = 4) -> tuple[str, str, tuple[str, ...]]:
    rng = random.Random(f"vt-{seed}")
    names = []
    while len(names) < hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text."
    context = _hide_in_order(rng, tokenizer, tokens - 50, seed, chain, intro)
    question = (
        f"Find all variables that are assigned the value {value} in the text above, "
        "directly or through other variables."
    )
    return context, question, tuple(names)


def _hide_in_order(rng, tokenizer, tokens: int, seed: int, needles: list[str], intro: str) -> str:
    """Like `_hide`, but the needles keep their order (an assignment comes before its use)."""
    cost = len(tokenizer(" ".join([intro, *needles]), add_special_tokens=False).input_ids)
    paragraphs = prose(tokenizer, max(tokens - cost, 64), seed).split("\n\n")
    slots = sorted(rng.randint(0, len(paragraphs)) for _ in needles)
    for offset, (slot, needle) in enumerate(zip(slots, needles, strict=True)):
        paragraphs.insert(slot + offset, needle)
    return intro + "\n\n" + "\n\n".join(paragraphs)


def _common_words(tokenizer, tokens: int, seed: int, n_common: int = 10) -> tuple[str, str, tuple[str, ...]]:
    """RULER's common-word extraction: a numbered word list where ten words recur far more often."""
    rng = random.Random(f"cwe-{seed}")
    vocab = list(_corpus_words())
    rng.shuffle(vocab)
    common, rare = vocab[:n_common], vocab[n_common:]
    intro = "Below is a numbered list of words. In these words, some appear more often than others.\n\n"

    def listing(total: int) -> str:
        repeats = max(3, min(30, total // (3 * n_common)))  # common words: up to 30 times each
        words = [w for w in common for _ in range(repeats)]
        words += [w for w in rare[: max(total - len(words), 0) // 2 + 1] for _ in range(2)]
        random.Random(f"cwe-order-{seed}").shuffle(words)
        return intro + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words[:total]))

    total = tokens // 4
    for _ in range(3):  # the cost of a line depends on its number's digits: refine the count
        total = int(total * (tokens - 40) / len(tokenizer(listing(total), add_special_tokens=False).input_ids))
    question = f"What are the {n_common} most common words in the above list?"
    return listing(total), question, tuple(common)


TASKS: dict[str, Callable] = {
    "niah_number": _niah("number"),
    "niah_word": _niah("word"),
    "niah_uuid": _niah("uuid"),
    "niah_multikey": _niah("number", n_keys=4),
    "niah_multivalue": _niah("number", n_values=4),
    "niah_multiquery": _niah("number", n_keys=4, n_queries=4),
    "variable_tracking": _variable_tracking,
    "common_words": _common_words,
}


def make_sample(task: str, tokenizer, context_tokens: int, seed: int) -> Sample:
    """Sample `seed` of `task`, about `context_tokens` tokens of context (question excluded)."""
    if task not in TASKS:
        raise SqueezegenError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    if context_tokens < 256:
        raise SqueezegenError(f"context of {context_tokens} tokens is too short for a haystack: use at least 256")
    context, question, answers = TASKS[task](tokenizer, context_tokens, seed)
    return Sample(task, context, question, answers)
