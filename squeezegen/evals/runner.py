"""`squeezegen eval`: tasks x context lengths x methods x budgets x question modes, on one model.

A run keeps what it computed: each finished sample is appended to `records.jsonl` in its output
folder, so an interrupted run resumes where it stopped (`EvalFolder`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from squeezegen.errors import SqueezegenError
from squeezegen.evals import ruler
from squeezegen.evals.fanout import answer_all
from squeezegen.evals.math_problems import chosen
from squeezegen.evals.report import EARLIER_DEFAULTS, FINAL_FILES, claim, refuse_file_as_folder, refuse_unwritable
from squeezegen.evals.tasks import TASKS, Sample, make_sample
from squeezegen.methods.spec import MethodSpec, expand
from squeezegen.runtime.generate import Decoding, encode

MODES = {"seen": True, "unseen": False}  # was the question inside the compressed prompt?
# the tasks of evals/tasks.py, NVIDIA's RULER (evals/ruler.py), math reasoning (evals/math_problems.py)
BENCHMARKS = ("squeezegen", "ruler", "gsm8k", "aime2025")
MATH = ("gsm8k", "aime2025")

SampleKey = tuple[int, str, int]  # (context, task, sample)


@dataclass
class EvalConfig:
    tasks: list[str]
    contexts: list[int]
    methods: list[MethodSpec]
    budgets: list[float | int]
    samples: int = 20
    modes: list[str] = field(default_factory=lambda: ["seen", "unseen"])
    seed: int = 0
    max_new_tokens: int | None = 32  # None: each RULER task's own tokens_to_generate
    chat: bool = True
    benchmark: str = "squeezegen"
    batch_size: int = 8  # math: problems decoded together

    def __post_init__(self) -> None:
        if self.benchmark not in BENCHMARKS:
            raise SqueezegenError(f"unknown benchmark {self.benchmark!r}; available: {', '.join(BENCHMARKS)}")
        names = {"squeezegen": TASKS, "ruler": ruler.TASKS}.get(self.benchmark, [self.benchmark])
        if self.tasks == ["all"]:
            self.tasks = list(names)
        for task in self.tasks:
            if task not in names:
                raise SqueezegenError(f"unknown {self.benchmark} task {task!r}; available: {', '.join(names)} (or all)")
        if self.benchmark == "ruler":
            ruler.package_folder()  # not installed: said before a model loads
        elif self.benchmark in MATH:
            chosen(self.benchmark, self.samples, self.seed)  # likewise, and no more samples than problems
        if self.max_new_tokens is None and self.benchmark != "ruler":
            self.max_new_tokens = {"squeezegen": 32, "gsm8k": 512, "aime2025": 2048}[self.benchmark]
        for mode in self.modes:
            if mode not in MODES:
                raise SqueezegenError(f"unknown question mode {mode!r}; use 'seen' and/or 'unseen'")
        if self.samples < 1:
            raise SqueezegenError("samples must be at least 1")

    def settings(self, model: str, dtype: str, weights: str = "model", device: str = "cpu") -> dict:
        """What decides a run's records, as JSON values: a resumed run must match it exactly."""
        return json.loads(
            json.dumps(
                {
                    "model": model,
                    "dtype": dtype,
                    "weights": weights,
                    "device": device,
                    "tasks": self.tasks,
                    "contexts": self.contexts,
                    "methods": [m.label for m in self.methods],
                    "budgets": self.budgets,
                    "samples": self.samples,
                    "modes": self.modes,
                    "seed": self.seed,
                    "max_new_tokens": self.max_new_tokens,
                    "chat": self.chat,
                    "benchmark": self.benchmark,
                    "batch_size": self.batch_size,
                }
            )
        )


def benchmark_sample(tokenizer, config: EvalConfig, task: str, context: int, i: int) -> Sample:
    """Sample `i` of `task` at `context` tokens from the config's benchmark."""
    if config.benchmark == "ruler":
        return ruler.ruler_samples(task, tokenizer, context, config.samples, config.seed)[i]
    return make_sample(task, tokenizer, context, config.seed + i)


def sample_chunks(tokenizer, sample: Sample, chat: bool) -> list[list[int]]:
    """[context ids, question ids] of a sample, the question chunk ending with RULER's answer prefix
    where the sample has one (after the chat template's assistant turn begins, as kvpress puts it)."""
    (chunks,) = encode(tokenizer, [sample.question], [sample.context], chat)
    prefix = getattr(sample, "answer_prefix", "")
    if prefix:
        chunks[1] = chunks[1] + tokenizer(prefix if chat else " " + prefix, add_special_tokens=False).input_ids
    return chunks


def eval_sample(model, tokenizer, config: EvalConfig, task: str, context: int, i: int) -> list[dict]:
    """The records of one sample: every question mode x method x budget."""
    sample = benchmark_sample(tokenizer, config, task, context, i)
    chunks = sample_chunks(tokenizer, sample, config.chat)
    own = getattr(sample, "max_new_tokens", None)  # RULER's tokens_to_generate, capped by --max-new-tokens
    max_new_tokens = min(n for n in (config.max_new_tokens, own) if n is not None)
    methods = expand(config.methods, config.budgets)
    labelled = {f"{label}@{budget}": m for (label, budget), m in methods.items()}
    records = []
    for mode in config.modes:
        results = answer_all(model, tokenizer, chunks, labelled, Decoding(max_new_tokens), MODES[mode])
        for (label, budget), res in zip(methods, results.values(), strict=True):
            records.append(
                {
                    "task": task,
                    "context": context,
                    "sample": i,
                    "mode": mode,
                    "method": label,
                    "budget": budget,
                    "score": sample.score(res.texts[0]),
                    "output": res.texts[0],
                    "answers": list(sample.answers),
                    "prompt_tokens": res.prompt_lengths[0],
                    "kv_bytes": res.kv_bytes,
                    "kv_bytes_decode": res.kv_bytes_decode,
                }
            )
    return records


def run_eval(
    model,
    tokenizer,
    config: EvalConfig,
    progress: bool = True,
    done: dict[SampleKey, list[dict]] | None = None,
    save: Callable[[SampleKey, list[dict]], None] | None = None,
) -> list[dict]:
    """One record per (task, context, sample, mode, method, budget): score, output and costs.

    done: records of samples finished earlier (an interrupted run), reused instead of recomputed;
    save: called with each sample's records as soon as it finishes, so nothing is lost on a stop.
    """
    Decoding(config.max_new_tokens or 1)  # refuse a bad value before the first sample
    limit = model.config.max_position_embeddings
    for context in config.contexts:  # a RULER length includes the answer
        answer = 0 if config.benchmark == "ruler" else config.max_new_tokens
        if context + answer + 100 > limit:
            raise SqueezegenError(
                f"context {context} is beyond what the model takes ({limit} tokens with question and answer)"
            )
    done = done or {}
    records = []
    # sample-major: a run stopped early has every task at the same number of samples
    keys = [(context, task, i) for context in config.contexts for i in range(config.samples) for task in config.tasks]
    with tqdm(total=len(keys), desc="eval", unit="sample", disable=not progress) as bar:  # closed on Ctrl-C too
        bar.update(sum(key in done for key in keys))
        for key in keys:
            if key in done:
                records.extend(done[key])
                continue
            context, task, i = key
            sample_records = eval_sample(model, tokenizer, config, task, context, i)
            if save is not None:
                save(key, sample_records)
            records.extend(sample_records)
            bar.update(1)
    return records


class EvalFolder:
    """The output folder of one `squeezegen eval`, held under an exclusive lock for the whole run
    (a second process on the same folder is refused at once): `config.json` is the run's settings,
    `records.jsonl` gains one line per finished sample, flushed and fsynced."""

    def __init__(self, out: str | Path, settings: dict, resume: bool = False, overwrite: bool = False) -> None:
        if resume and overwrite:
            raise SqueezegenError("--resume continues the run in --out and --overwrite discards it: pass one of them")
        self.out = Path(out)
        self.settings = settings
        self.resume = resume
        self.overwrite = overwrite
        self.config_path = self.out / "config.json"
        self.records_path = self.out / "records.jsonl"
        self.lock_path = self.out / "eval.lock"
        self._made: list[Path] = []
        self.done: dict[SampleKey, list[dict]] = {}
        self._lock = None
        self._records = None

    def __enter__(self) -> EvalFolder:
        refuse_file_as_folder(self.out)
        for path in (self.out, self.config_path, self.records_path, self.lock_path):
            refuse_unwritable(path)
        made = [p for p in (self.out, self.lock_path) if not p.exists()]  # what a run that never starts removes
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.lock_path, "a")  # noqa: SIM115  (held until __exit__)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise SqueezegenError(
                f"{self.out} is in use by another `squeezegen eval`: wait for it or choose another --out"
            ) from None
        self._made = made
        try:
            if self.resume:
                self._load()
            else:
                self._refuse_earlier_run()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _release(self) -> None:
        if self._records is not None:
            self._records.close()
        if self._lock is None:
            return
        if self._records is None:  # never started (the model did not load): leave no trace of the run
            for path in reversed(self._made):
                with contextlib.suppress(OSError):  # a folder someone has put files in stays
                    path.rmdir() if path.is_dir() else path.unlink()
        self._lock.close()  # closing the file drops the lock

    def _refuse_earlier_run(self) -> None:
        """Refuse to replace an earlier run's results (a run that finished no sample holds none)."""
        paths = {name: self.out / name for name in FINAL_FILES}
        if self.records_path.exists() and self.records_path.stat().st_size:
            paths["records_jsonl"] = self.records_path
        hint = ", --resume to continue it" if "records_jsonl" in paths and not self.resume else ""
        claim(paths, self.overwrite, hint=hint)

    def _load(self) -> None:
        """The finished samples of the run being resumed, after checking it is the same run."""
        if not self.config_path.is_file():
            self._refuse_earlier_run()  # nothing was started here: the run begins afresh
            return
        try:
            stored = json.loads(self.config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SqueezegenError(f"{self.config_path} is unreadable: pass --overwrite to start again") from None
        stored = {**EARLIER_DEFAULTS, **stored}  # runs begun before these settings were recorded
        differing = [k for k in sorted(stored.keys() | self.settings.keys()) if stored.get(k) != self.settings.get(k)]
        if differing:
            shown = "; ".join(f"{k}: {stored.get(k)!r} then, {self.settings.get(k)!r} now" for k in differing)
            raise SqueezegenError(
                f"{self.out} holds a run with other settings ({shown}): resume with the same flags, "
                "choose another --out or pass --overwrite"
            )
        if not self.records_path.is_file():
            return
        raw = self.records_path.read_bytes()
        good = 0  # bytes up to the last complete line: a stop mid-write leaves a partial one
        for line in raw.splitlines(keepends=True):
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if not line.endswith(b"\n"):
                break
            self.done[(entry["context"], entry["task"], entry["sample"])] = entry["records"]
            good += len(line)
        if good < len(raw):
            with open(self.records_path, "r+b") as f:
                f.truncate(good)

    def start(self) -> None:
        """Store the settings and open records.jsonl for appending (emptied unless resuming)."""
        self.config_path.write_text(json.dumps(self.settings, indent=1) + "\n")
        self._records = open(self.records_path, "a" if self.done else "w")  # noqa: SIM115

    def save(self, key: SampleKey, records: list[dict]) -> None:
        """Append one finished sample, on disk before the next one starts."""
        context, task, i = key
        self._records.write(json.dumps({"context": context, "task": task, "sample": i, "records": records}) + "\n")
        self._records.flush()
        os.fsync(self._records.fileno())
        self.done[key] = records
