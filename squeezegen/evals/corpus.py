"""Real English prose that needs no download: the help topics that ship with every CPython.

`pydoc_data.topics` holds about 465 KB of technical prose (~110K SmolLM2 tokens). Haystacks are
cut from it at a seeded offset, on paragraph boundaries, never repeated filler.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

import torch

from squeezegen.errors import SqueezegenError


@lru_cache(maxsize=1)
def pydoc_paragraphs() -> tuple[str, ...]:
    """Paragraphs of the CPython help topics, code-free where possible, in a fixed order."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(line.strip() for line in block.splitlines()).strip()
            # keep prose: drop code listings, tables and headings
            if len(text) < 80 or text.count(">>>") or text.count("|") > 2 or text.startswith(("*", "+", "=")):
                continue
            paragraphs.append(text)
    return tuple(paragraphs)


def prose(tokenizer, n_tokens: int, seed: int = 0) -> str:
    """About `n_tokens` tokens of consecutive paragraphs, starting at a seeded place."""
    paragraphs = pydoc_paragraphs()
    start = random.Random(seed).randrange(len(paragraphs))
    out: list[str] = []
    used = 0
    i = start
    while True:
        paragraph = paragraphs[i % len(paragraphs)]
        cost = len(tokenizer(paragraph + "\n\n", add_special_tokens=False).input_ids)
        if used + cost > n_tokens:
            break
        out.append(paragraph)
        used += cost
        i += 1
        if i - start > len(paragraphs):
            raise SqueezegenError(f"the corpus holds fewer than {n_tokens} tokens: ask for less text")
    return "\n\n".join(out)


def split_text(part: str, held_out: float = 0.1) -> str:
    """The corpus cut once into a training part and a held-out tail (`part` = "train" or "test")."""
    paragraphs = pydoc_paragraphs()
    cut = round(len(paragraphs) * (1 - held_out))
    if part not in ("train", "test"):
        raise SqueezegenError(f"part must be train or test, got {part!r}")
    return "\n\n".join(paragraphs[:cut] if part == "train" else paragraphs[cut:])


def token_blocks(tokenizer, text: str, block: int) -> torch.Tensor:
    """`text` tokenized once and cut into (N, block) consecutive blocks (the tail is dropped)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    count = len(ids) // block
    if count == 0:
        raise SqueezegenError(f"the text holds {len(ids)} tokens, fewer than one block of {block}: use a smaller block")
    return torch.tensor(ids[: count * block]).view(count, block)
