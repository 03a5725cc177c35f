"""`squeezegen demo`: a long-context question answered by the bundled real model, with its costs."""

from __future__ import annotations

import squeezegen as sg
from squeezegen.errors import SqueezegenError
from squeezegen.evals.tasks import make_sample
from squeezegen.methods import method

ANSWER_TOKENS = 32
ROOM = 100  # tokens of chat template and question around the context

# (label, method name, parameters): the reference, SnapKV and FastKV keeping the same 25% of the
# prompt's KV (FastKV also propagates 25% past its middle layer), and FastKV at its defaults
DEMO_METHODS = (
    ("full", "full", {}),
    ("snapkv 25%", "snapkv", {"budget": 0.25}),
    ("fastkv 25%", "fastkv", {"retain_rate": 0.25, "tsp_rate": 0.25}),
    ("fastkv 10% (tsp 20%)", "fastkv", {"retain_rate": 0.1, "tsp_rate": 0.2}),
)


def run_demo(model_name: str = "smollm2-135m", context_tokens: int = 4000, seed: int = 0) -> None:
    print(f"loading {model_name} ...")
    model, tok = sg.load(model_name)
    most = model.config.max_position_embeddings - ANSWER_TOKENS - ROOM
    if context_tokens > most:
        raise SqueezegenError(f"--context {context_tokens} is beyond what {model_name} takes: use at most {most}")
    sample = make_sample("niah_number", tok, context_tokens, seed)
    print(f"question after ~{context_tokens} tokens of Python documentation prose: {sample.question}")
    print(f"expected answer: {sample.answers[0]}\n")
    rows = []
    for label, name, params in DEMO_METHODS:
        res = sg.generate(
            model,
            tok,
            sample.prompt,
            method=method(name, **params),
            max_new_tokens=ANSWER_TOKENS,
            chat=True,
            progress=True,
        )
        t = res.timings
        answer = res.texts[0].strip().replace("\n", " ")
        rows.append((label, answer, sample.score(answer) == 1, res.prompt_lengths[0], t, res.kv_bytes))
    full_t, full_kv = rows[0][4], rows[0][5]
    print("| method | answer | correct | prompt tokens | prefill s | decode tok/s | KV cache MiB | vs full |")
    print("|---|---|---|---|---|---|---|---|")
    for label, answer, ok, n, t, kv in rows:
        ratios = (
            f"prefill {full_t.prefill_s / t.prefill_s:.2f}x, decode "
            f"{t.decode_tokens_per_s / full_t.decode_tokens_per_s:.2f}x, KV {kv / full_kv:.0%}"
        )
        print(
            f"| {label} | {answer} | {'yes' if ok else 'no'} | {n} | {t.prefill_s:.2f} "
            f"| {t.decode_tokens_per_s:.1f} | {kv / 2**20:.1f} | {ratios} |"
        )
