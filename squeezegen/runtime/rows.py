"""The decode step both loops share, `sg.generate`'s (runtime/generate.py) and the server's
(serve/scheduler.py): choosing each row's next token from its logits, then reading the tokens into
each row's text (streaming pieces, EOS, stop strings, the length limit, the finish reason).

The loops differ only in what is theirs: `generate` decodes a fixed batch and may read the chosen
tokens every few steps (a GPU keeps working meanwhile); the server lets rows join and leave the
batch at every step. A fix to how a token is chosen or how a row ends is made here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from squeezegen.runtime.sampling import LogitRules, Sampler
from squeezegen.runtime.text import RowText


@dataclass
class Row:
    """One sequence being decoded: how its tokens are chosen and when it ends."""

    text: RowText
    max_tokens: int
    sampler: Sampler | None = None  # its own sampler; None where the batch shares one (`choose`)
    rules: LogitRules = field(default_factory=LogitRules)  # vLLM's min_tokens and repetition_penalty
    seen: torch.Tensor | None = None  # (V,) tokens of the prompt and output, for repetition_penalty

    @property
    def finish(self) -> str | None:
        """None while it runs; "eos", "stop" or "length" once it has ended."""
        return self.text.finish

    @property
    def ids(self) -> list[int]:
        return self.text.ids

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Its next token (1,) from its logits (1, V): the rules, then its sampler."""
        logits = self.rules.apply(logits, self.seen, len(self.text.ids), self.text.eos)
        token = self.sampler(logits)
        if self.seen is not None:
            self.seen[int(token[0])] = True
        return token

    def accept(self, token: int) -> str:
        """Add a chosen token: the text to stream ("" mid-character or at the end), and `finish`
        set at an EOS token, a stop string or the `max_tokens`-th token."""
        piece = self.text.add(token)
        if not self.text.finish and len(self.text.ids) >= self.max_tokens:
            self.text.finish = "length"
        return piece


def choose(rows: Sequence[Row], logits: torch.Tensor, sampler: Sampler | None = None) -> torch.Tensor:
    """The rows' next tokens (B,) from their logits (B, V), on the logits' device: by one sampler
    for the whole batch (one seeded stream, as `generate` samples), else by each row's own."""
    if sampler is not None:
        return sampler(logits)
    return torch.cat([row.choose(logits[i : i + 1]) for i, row in enumerate(rows)])


def read(rows: Sequence[Row], tokens: list[list[int]], stream: Callable[[int, str], None] | None = None) -> list[int]:
    """Read each row's chosen tokens (several per row where the loop reads every few steps) in
    order, passing visible pieces to `stream(row, piece)`; tokens after a row's end are ignored.
    Returns the rows that ended at a stop string (their EOS was never seen by the device)."""
    stopped = []
    for i, (row, new) in enumerate(zip(rows, tokens, strict=True)):
        for token in new:
            if row.finish:
                break
            piece = row.accept(token)
            if row.finish == "stop":
                stopped.append(i)
            elif piece and stream is not None:
                stream(i, piece)
    return stopped
