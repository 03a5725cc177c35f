"""Next-token choice on the device: greedy, or temperature / top-k / top-p sampling from a seeded
generator, without a host synchronisation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from squeezegen.errors import SqueezegenError


@dataclass
class Sampler:
    """`temperature=0` is greedy (argmax); otherwise logits are divided by the temperature, cut to
    the `top_k` best and to the smallest set whose probability reaches `top_p`, then sampled."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        number = isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
        if not (number and math.isfinite(self.temperature)) or self.temperature < 0:
            raise SqueezegenError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise SqueezegenError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SqueezegenError(f"top_k must be a whole number >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**63
        ):
            raise SqueezegenError(f"seed must be a whole number in [-2**63, 2**63) or None, got {self.seed!r}")
        self._generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> token ids (B,)."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # drop a token when the tokens ranked above it already reach top_p (the best always stays)
            drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= self.top_p
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        if self._generator is None:
            self._generator = torch.Generator(device=logits.device)
            if self.seed is not None:
                self._generator.manual_seed(self.seed)
            else:
                self._generator.seed()
        # the Gumbel-max trick: argmax of p / E with E ~ Exp(1) samples from p, without the host
        # synchronisation torch.multinomial needs on a GPU
        noise = torch.empty_like(logits).exponential_(1, generator=self._generator)
        return (logits.softmax(dim=-1) / noise).argmax(dim=-1)


@dataclass
class LogitRules:
    """The logits rules vLLM's API adds to OpenAI's, applied before the sampler: `repetition_penalty`
    (CTRL's, as vLLM applies it: every token already in the prompt or the output has a positive logit
    divided by it, a negative one multiplied; 1 = off) and `min_tokens` (no token of `stop_ids`, EOS
    included, while fewer than that many tokens are generated)."""

    repetition_penalty: float = 1.0
    min_tokens: int = 0

    def apply(
        self, logits: torch.Tensor, seen: torch.Tensor | None, generated: int, stop_ids: set[int]
    ) -> torch.Tensor:
        """logits (1, V) -> a new (1, V); `seen` is a (V,) bool mask of the prompt's and output's tokens
        (None: no penalty), `generated` the tokens generated so far."""
        penalize = self.repetition_penalty != 1.0 and seen is not None
        hold = generated < self.min_tokens and bool(stop_ids)
        if not (penalize or hold):
            return logits
        logits = logits.clone()
        row = logits[0]
        if penalize:
            old = row[seen]
            row[seen] = torch.where(old > 0, old / self.repetition_penalty, old * self.repetition_penalty)
        if hold:
            row[[i for i in stop_ids if i < row.shape[0]]] = float("-inf")
        return logits
