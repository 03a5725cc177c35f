"""`sg.generate`: prompts in, texts and measurements out, through the engine and any method."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from squeezegen.errors import SqueezegenError
from squeezegen.runtime.engine import Engine, check_causal_lm, check_method
from squeezegen.runtime.hooks import Method
from squeezegen.runtime.rows import Row
from squeezegen.runtime.rows import choose as choose_tokens
from squeezegen.runtime.rows import read as read_tokens
from squeezegen.runtime.sampling import Sampler
from squeezegen.runtime.text import RowText
from squeezegen.runtime.timing import synchronize

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
    kv_bytes_decode: int  # bytes the decode buffers held once the prompt was compressed
    cache_lengths: list[int]  # entries per layer at the end
    logits: list[torch.Tensor] | None = field(default=None, repr=False)  # per step (B, V) if asked


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


def compile_by_default(device: torch.device) -> bool:
    """Compiled decode steps are for a GPU (CUDA graphs). On the CPU the step in C decodes faster
    than inductor's code of the torch step at steady state (which was 0.5-0.6x even the torch step
    in bf16 on an AMX host, docs/engine.md), so compiling never pays back there and is asked for
    explicitly."""
    return device.type == "cuda"


def eos_ids(model, tokenizer) -> set[int]:
    """The token ids that end a generation: the model's generation config, else the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token rows of any lengths, padded on the left to one width."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


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
    look_every: int | None = None  # decode steps between host reads (None: 1 on the CPU, 8 on a GPU)

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise SqueezegenError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise SqueezegenError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if any(not isinstance(s, str) for s in self.stop):
            raise SqueezegenError("stop must be a string or a list of strings")
        if any(not s for s in self.stop):
            raise SqueezegenError("stop strings must not be empty")
        self.sampler = Sampler(self.temperature, self.top_k, self.top_p, self.seed)


def stop_strings(stop: object) -> list[str]:
    """`stop` as a list: one string, a list or tuple of them, or None."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not isinstance(stop, (list, tuple)):
        raise SqueezegenError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    return list(stop)


def prefill_rows(engine: Engine, rows: list[list[list[int]]], pad_id: int, progress: bool = False) -> torch.Tensor:
    """Prefill the chunks of every row: the first compressed by the engine's method, a second one
    (a question after its context) appended as is. Returns the last position's logits."""
    device = next(engine.model.parameters()).device
    logits = None
    for chunk in range(len(rows[0])):
        ids, mask = left_pad([row[chunk] for row in rows], pad_id, device)
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
    """Sample from the prefill's logits and keep decoding until every row has finished.

    Tokens are chosen (by runtime/rows.py, the step the server shares), and EOS marked, on the
    device; the host reads the new tokens every `decoding.look_every` steps (every step on the CPU,
    where reading costs nothing) to detokenize, stream and match stop strings. A row that has
    finished is fed padding; rows never affect each other, so the steps run past a row's end
    change nothing it returns.
    """
    device = logits.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = set() if decoding.ignore_eos else eos_ids(engine.model, tokenizer)
    eos_tensor = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    batch = logits.shape[0]
    rows = [Row(RowText(tokenizer, eos, list(decoding.stop)), decoding.max_new_tokens) for _ in range(batch)]
    every = decoding.look_every or (8 if device.type == "cuda" else 1)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    pending: list[torch.Tensor] = []
    step_logits: list[torch.Tensor] = []

    def choose(logits: torch.Tensor) -> torch.Tensor:
        nonlocal done
        if output_logits:
            step_logits.append(logits.clone())
        token = choose_tokens(rows, logits, decoding.sampler)
        pending.append(token)
        done = done | torch.isin(token, eos_tensor)
        return token.masked_fill(done, pad_id)

    def look() -> bool:
        """Read the pending tokens; True once every row has finished."""
        nonlocal done
        stopped = read_tokens(rows, torch.stack(pending, dim=1).tolist(), stream)
        pending.clear()
        if stopped:
            done = done.index_fill(0, torch.tensor(stopped, device=device), True)
        return all(row.finish for row in rows)

    start = time.perf_counter()
    token = choose(logits)
    finished = look()
    first_token_s = prefill_s + time.perf_counter() - start
    bar = tqdm(total=decoding.max_new_tokens, desc="decode", unit="tok", leave=False, disable=not progress)
    bar.update(1)
    for step in range(1, decoding.max_new_tokens):
        if finished:
            break
        token = choose(engine.decode(token))
        bar.update(1)
        if step % every == 0 or step == decoding.max_new_tokens - 1:
            finished = look()
    if pending:
        look()
    bar.close()
    synchronize(device)
    decode_s = time.perf_counter() - start

    decoded = sum(len(row.ids) for row in rows) - batch  # the first tokens came from the prefill's logits
    timings = Timings(prefill_s, decode_s, decoded, prefill_s + decode_s, first_token_s)
    return _result(engine, rows, timings, step_logits if output_logits else None)


def _result(engine: Engine, rows: list[Row], timings: Timings, logits: list[torch.Tensor] | None) -> GenerationResult:
    return GenerationResult(
        texts=[row.text.final() for row in rows],
        token_ids=[row.ids for row in rows],
        prompt_lengths=engine.prompt_lengths.tolist(),
        finish_reasons=[row.finish for row in rows],
        timings=timings,
        kv_bytes=engine.cache.peak_bytes,
        kv_bytes_decode=engine.cache.decode_bytes or engine.cache.nbytes(),
        cache_lengths=engine.cache.lengths(),
        logits=logits,
    )


def _check_inputs(tokenizer, prompts, context, stream, ignore_eos, compile) -> tuple[list[str], list[str] | None]:
    """`generate`'s arguments checked, with one line naming the fix: (prompts, contexts) as lists."""
    if not callable(tokenizer):
        raise SqueezegenError(
            f"tokenizer must be the model's tokenizer (model, tok = sg.load(name)), got {tokenizer!r}"
        )
    if stream is not None and not callable(stream):
        raise SqueezegenError(f"stream must be a function of (row, text), got {type(stream).__name__}")
    for name, flag in (("ignore_eos", ignore_eos), ("compile", compile)):
        if flag is not None and not isinstance(flag, bool):
            raise SqueezegenError(f"{name} must be True or False, got {flag!r}")
    if isinstance(prompts, str):
        prompts = [prompts]
    elif not isinstance(prompts, (list, tuple)):
        raise SqueezegenError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise SqueezegenError("no prompts given")
    if isinstance(context, str):
        context = [context] * len(prompts)
    if context is not None and not isinstance(context, (list, tuple)):
        raise SqueezegenError(f"context must be a string or one string per prompt, got {type(context).__name__}")
    if context is not None and len(context) != len(prompts):
        raise SqueezegenError(f"{len(context)} contexts for {len(prompts)} prompts: give one per prompt, or one")
    return prompts, context


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
    compile: bool | None = None,
) -> GenerationResult:
    """Generate a continuation of each prompt with the engine, compressing the cache by `method`.

    `method=None` keeps the full cache (token-identical to `model.generate` when greedy). Prompts of
    different lengths are left-padded into one batch. With `context` (one text per prompt, or one for
    all), the context is prefilled and compressed first and the prompt appended uncompressed, as
    when a cached document answers several questions the compression never saw. Generation of a
    row ends at an EOS token (unless `ignore_eos`), at a `stop` string (cut from the text) or after
    `max_new_tokens`. `stream(row, piece)` receives text as it is produced. `compile` runs the
    decode steps through `torch.compile` (None: where it pays, see `compile_by_default`).
    """
    check_causal_lm(model)
    check_method(method)
    prompts, context = _check_inputs(tokenizer, prompts, context, stream, ignore_eos, compile)
    decoding = Decoding(
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        stop_strings(stop),
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
    device = next(model.parameters()).device
    compile = compile_by_default(device) if compile is None else compile
    engine = Engine(model, method, reserve=max_new_tokens - 1, compile=compile, tokenizer=tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start = time.perf_counter()
    logits = prefill_rows(engine, rows, pad_id, progress)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    return decode_loop(
        engine, tokenizer, logits, decoding, prefill_s, stream, progress and stream is None, output_logits
    )
