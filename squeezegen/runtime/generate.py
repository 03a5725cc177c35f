"""`sg.generate`: prompts in, texts and measurements out, through the engine and any method."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from squeezegen.errors import SqueezegenError
from squeezegen.methods.base import Method
from squeezegen.runtime.engine import Engine
from squeezegen.runtime.sampling import Sampler

# Prompts at least this long show a per-layer prefill progress bar when progress is on.
LONG_PREFILL_TOKENS = 2048


@dataclass
class Timings:
    prefill_s: float  # prompt forward up to the first token's logits
    decode_s: float  # every later token: forward + sampling
    decode_tokens: int  # tokens produced by decode steps, all rows together
    total_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class GenerationResult:
    texts: list[str]  # generated text per prompt (stop string and special tokens removed)
    token_ids: list[list[int]]  # generated ids per prompt, EOS included as Hugging Face does
    prompt_lengths: list[int]
    finish_reasons: list[str]  # "eos", "stop" or "length"
    timings: Timings
    kv_bytes: int  # peak bytes of keys + values held by the cache during the generation
    cache_lengths: list[int]  # entries per layer at the end
    logits: list[torch.Tensor] | None = field(default=None, repr=False)  # per step (B, V) if asked


class _Detokenizer:
    """Turns one row's growing token list into text pieces without re-decoding everything."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # tokens before this are settled text
        self._read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if after.endswith("\ufffd") or len(after) <= len(before):  # mid-character, or nothing visible
            return ""
        piece = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece


def _encode(tokenizer, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    encoded = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise SqueezegenError(f"prompt {i} is a {type(prompt).__name__}, expected a string")
        if not prompt.strip():
            raise SqueezegenError(f"prompt {i} is empty: give some text to continue")
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise SqueezegenError("this tokenizer has no chat template: call without chat=True (--chat)")
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            encoded.append(tokenizer(text, add_special_tokens=False).input_ids)
        else:
            encoded.append(tokenizer(prompt).input_ids)
    return encoded


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: str | Sequence[str],
    method: Method | None = None,
    max_new_tokens: int = 16,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    ignore_eos: bool = False,
    stream: Callable[[int, str], None] | None = None,
    chat: bool = False,
    progress: bool = False,
    output_logits: bool = False,
) -> GenerationResult:
    """Generate a continuation of each prompt with the engine, compressing the cache by `method`.

    `method=None` keeps the full cache (token-identical to `model.generate` when greedy). Prompts of
    different lengths are left-padded into one batch. Generation of a row ends at an EOS token
    (unless `ignore_eos`), at a `stop` string (cut from the text) or after `max_new_tokens`.
    `stream(row, piece)` receives text as it is produced.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise SqueezegenError("no prompts given")
    if max_new_tokens < 1:
        raise SqueezegenError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise SqueezegenError("stop strings must not be empty")
    longest_stop = max((len(s) for s in stops), default=0)
    sampler = Sampler(temperature, top_k, top_p, seed)
    rows = _encode(tokenizer, prompts, chat)
    limit = model.config.max_position_embeddings
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > limit:
        raise SqueezegenError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's {limit}-token context: "
            "shorten the prompt or lower max_new_tokens"
        )
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids, attention_mask = _left_pad(rows, pad_id, device)
    eos = set() if ignore_eos else _eos_ids(model, tokenizer)

    engine = Engine(model, method, reserve=max_new_tokens)
    batch = len(rows)
    detok = [_Detokenizer(tokenizer) for _ in range(batch)]
    finish: list[str | None] = [None] * batch
    step_logits: list[torch.Tensor] = []

    def take(logits: torch.Tensor) -> torch.Tensor:
        """Choose and record the next token of every unfinished row."""
        if output_logits:
            step_logits.append(logits.clone())
        chosen = sampler(logits)
        for row, token in enumerate(chosen.tolist()):
            if finish[row]:
                continue
            piece = detok[row].add(token)
            if token in eos:
                finish[row] = "eos"
            elif stops and any(s in detok[row].text[-(len(piece) + longest_stop) :] for s in stops):
                finish[row] = "stop"
            elif stream and piece:
                stream(row, piece)
        return chosen.masked_fill(torch.tensor([f is not None for f in finish], device=device), pad_id)

    start = time.perf_counter()
    logits = engine.prefill(input_ids, attention_mask, progress=progress and longest >= LONG_PREFILL_TOKENS)
    _sync(device)
    prefill_s = time.perf_counter() - start
    token = take(logits)
    decode_start = time.perf_counter()
    bar = tqdm(total=max_new_tokens, desc="decode", unit="tok", leave=False, disable=not progress or stream is not None)
    bar.update(1)
    for _ in range(max_new_tokens - 1):
        if all(finish):
            break
        token = take(engine.decode(token))
        bar.update(1)
    bar.close()
    _sync(device)
    end = time.perf_counter()

    texts = []
    for row, d in enumerate(detok):
        if finish[row] is None:
            finish[row] = "length"
        text = d.text
        if finish[row] == "stop":
            text = text[: min(text.find(s) for s in stops if s in text)]
        texts.append(text)
    generated = sum(len(d.ids) for d in detok)
    return GenerationResult(
        texts=texts,
        token_ids=[d.ids for d in detok],
        prompt_lengths=[len(r) for r in rows],
        finish_reasons=finish,
        timings=Timings(prefill_s, end - decode_start, generated - batch, end - start),
        kv_bytes=engine.cache.peak_bytes,
        cache_lengths=engine.cache.lengths(),
        logits=step_logits if output_logits else None,
    )
