"""`squeezegen demo`: a long-context question answered by the bundled real model, with its costs."""

from __future__ import annotations

import squeezegen as sg
from squeezegen.evals.needle import needle_sample
from squeezegen.methods import method


def run_demo(model_name: str = "smollm2-135m", context_tokens: int = 4000, seed: int = 0) -> None:
    print(f"loading {model_name} ...")
    model, tok = sg.load(model_name)
    sample = needle_sample(tok, context_tokens, seed)
    print(
        f"question after ~{context_tokens} tokens of Python documentation prose "
        f"(needle at {sample.depth:.0%} depth): {sample.question}"
    )
    print(f"expected answer: {sample.answer}\n")
    rows = []
    for name in ("full",):
        res = sg.generate(model, tok, sample.prompt, method=method(name), max_new_tokens=24, chat=True, progress=True)
        t = res.timings
        rows.append(
            (
                name,
                res.texts[0].strip().replace("\n", " "),
                sample.is_correct(res.texts[0]),
                res.prompt_lengths[0],
                t.prefill_s,
                t.decode_tokens_per_s,
                res.kv_bytes,
            )
        )
    print("| method | answer | correct | prompt tokens | prefill s | decode tok/s | KV cache MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, answer, ok, n, prefill, tps, kv in rows:
        print(f"| {name} | {answer} | {'yes' if ok else 'no'} | {n} | {prefill:.2f} | {tps:.1f} | {kv / 2**20:.1f} |")
