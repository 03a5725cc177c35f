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
    first_token_s: float  # time to first token: prefill + choosing it

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


def _check_text(text: object, what: str) -> str:
    if not isinstance(text, str):
        raise SqueezegenError(f"{what} is a {type(text).__name__}, expected a string")
    if not text.strip():
        raise SqueezegenError(f"{what} is empty: give some text to continue")
    return text


def encode(tokenizer, prompts: Sequence[str], contexts: Sequence[str] | None, chat: bool) -> list[list[list[int]]]:
    """Token ids per row, as chunks: [prompt] or, with contexts, [context, prompt].

    With `chat`, the user turn is the context and prompt together; it is cut where the prompt starts,
    so the template's own tokens before the prompt count as context.
    """
    if chat and not getattr(tokenizer, "chat_template", None):
        raise SqueezegenError("this tokenizer has no chat template: call without chat=True (--chat)")
    rows = []
    for i, prompt in enumerate(prompts):
        _check_text(prompt, f"prompt {i}")
        context = None if contexts is None else _check_text(contexts[i], f"context {i}")
        if chat:
            user = prompt if context is None else f"{context}\n\n{prompt}"
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
            )
            if context is None:
                rows.append([tokenizer(text, add_special_tokens=False).input_ids])
            else:
                cut = text.rfind(prompt)
                rows.append([tokenizer(part, add_special_tokens=False).input_ids for part in (text[:cut], text[cut:])])
        elif context is None:
            rows.append([tokenizer(prompt).input_ids])
        else:
            rows.append([tokenizer(context).input_ids, tokenizer("\n\n" + prompt, add_special_tokens=False).input_ids])
    return rows


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


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer reads real time (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Decoding:
    """How to pick tokens and when to stop: everything of `generate` after the prefill."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SqueezegenError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise SqueezegenError("stop strings must not be empty")
        self.sampler = Sampler(self.temperature, self.top_k, self.top_p, self.seed)


def prefill_rows(engine: Engine, rows: list[list[list[int]]], pad_id: int, progress: bool = False) -> torch.Tensor:
    """Prefill the chunks of every row: the first compressed by the engine's method, a second one
    (a question after its context) appended as is. Returns the last position's logits."""
    device = next(engine.model.parameters()).device
    logits = None
    for chunk in range(len(rows[0])):
        ids, mask = _left_pad([row[chunk] for row in rows], pad_id, device)
        long = progress and ids.shape[1] >= LONG_PREFILL_TOKENS
        logits = engine.prefill(ids, mask, compress=chunk == 0, progress=long)
    return logits


def decode_loop(
    engine: Engine,
    tokenizer,
    logits: torch.Tensor,
    decoding: Decoding,
    prefill_s: float,
    stream: Callable[[int, str], None] | None = None,
    progress: bool = False,
    output_logits: bool = False,
) -> GenerationResult:
    """Sample from the prefill's logits and keep decoding until every row has finished."""
    device = logits.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = set() if decoding.ignore_eos else _eos_ids(engine.model, tokenizer)
    stops = list(decoding.stop)
    longest_stop = max((len(s) for s in stops), default=0)
    batch = logits.shape[0]
    detok = [_Detokenizer(tokenizer) for _ in range(batch)]
    finish: list[str | None] = [None] * batch
    step_logits: list[torch.Tensor] = []

    def take(logits: torch.Tensor) -> torch.Tensor:
        """Choose and record the next token of every unfinished row."""
        if output_logits:
            step_logits.append(logits.clone())
        chosen = decoding.sampler(logits)
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
    token = take(logits)
    first_token_s = prefill_s + time.perf_counter() - start
    bar = tqdm(total=decoding.max_new_tokens, desc="decode", unit="tok", leave=False, disable=not progress)
    bar.update(1)
    for _ in range(decoding.max_new_tokens - 1):
        if all(finish):
            break
        token = take(engine.decode(token))
        bar.update(1)
    bar.close()
    synchronize(device)
    decode_s = time.perf_counter() - start

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
        prompt_lengths=engine.prompt_lengths.tolist(),
        finish_reasons=finish,
        timings=Timings(prefill_s, decode_s, generated - batch, prefill_s + decode_s, first_token_s),
        kv_bytes=engine.cache.peak_bytes,
        cache_lengths=engine.cache.lengths(),
        logits=step_logits if output_logits else None,
    )


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: str | Sequence[str],
    method: Method | None = None,
    max_new_tokens: int = 16,
    *,
    context: str | Sequence[str] | None = None,
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
    different lengths are left-padded into one batch. With `context` (one text per prompt, or one for
    all), the context is prefilled and compressed first and the prompt appended uncompressed, as
    when a cached document answers several questions the compression never saw. Generation of a
    row ends at an EOS token (unless `ignore_eos`), at a `stop` string (cut from the text) or after
    `max_new_tokens`. `stream(row, piece)` receives text as it is produced.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise SqueezegenError("no prompts given")
    if isinstance(context, str):
        context = [context] * len(prompts)
    if context is not None and len(context) != len(prompts):
        raise SqueezegenError(f"{len(context)} contexts for {len(prompts)} prompts: give one per prompt, or one")
    decoding = Decoding(
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        [stop] if isinstance(stop, str) else list(stop or []),
        ignore_eos,
    )
    rows = encode(tokenizer, prompts, context, chat)
    limit = model.config.max_position_embeddings
    longest = max(sum(len(chunk) for chunk in row) for row in rows)
    if longest + max_new_tokens > limit:
        raise SqueezegenError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's {limit}-token context: "
            "shorten the prompt or lower max_new_tokens"
        )
    engine = Engine(model, method, reserve=max_new_tokens)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start = time.perf_counter()
    logits = prefill_rows(engine, rows, pad_id, progress)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    return decode_loop(
        engine, tokenizer, logits, decoding, prefill_s, stream, progress and stream is None, output_logits
    )
