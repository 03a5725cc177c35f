"""Engine (full cache) vs Hugging Face `model.generate`, measured side by side in one process.

    python benchmarks/engine_vs_hf.py --model smollm2-135m --context 4096 --new-tokens 64 --repeats 3

Runs alternate (HF then engine, engine then HF, ...) after a warm-up so that machine noise hits
both equally; prints the median of each, the median of the per-pair ratios, and checks that the
tokens agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

import squeezegen as sg
from squeezegen.evals.corpus import prose


class Clock(LogitsProcessor):
    """Stamps the time whenever HF has new logits: first after the prefill, then once per step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def hf_run(model, ids, new_tokens):
    """Prefill seconds and decode tokens/s inside one `model.generate` call."""
    clock = Clock()
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
    )
    prefill = clock.stamps[0] - start
    decode = (len(clock.stamps) - 1) / (clock.stamps[-1] - clock.stamps[0])
    return prefill, decode, out[0, ids.shape[1] :].tolist()


def engine_run(model, tok, prompt, new_tokens):
    res = sg.generate(model, tok, prompt, max_new_tokens=new_tokens)
    return res.timings.prefill_s, res.timings.decode_tokens_per_s, res.token_ids[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, tok = sg.load(args.model)
    prompt = prose(tok, args.context)
    ids = tok(prompt, return_tensors="pt").input_ids
    print(
        f"model {args.model}, prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads"
    )
    engine_run(model, tok, prompt[:2000], 4)  # warm-up both paths
    hf_run(model, tok(prompt[:2000], return_tensors="pt").input_ids, 4)

    hf, eng = [], []
    for i in range(args.repeats):  # alternate which side goes first
        if i % 2 == 0:
            h = hf_run(model, ids, args.new_tokens)
            e = engine_run(model, tok, prompt, args.new_tokens)
        else:
            e = engine_run(model, tok, prompt, args.new_tokens)
            h = hf_run(model, ids, args.new_tokens)
        hf.append(h)
        eng.append(e)
    same = all(h[2] == e[2] for h, e in zip(hf, eng, strict=True))
    median = statistics.median
    print("| | prefill s | decode tok/s |")
    print("|---|---|---|")
    print(f"| HF generate | {median(r[0] for r in hf):.2f} | {median(r[1] for r in hf):.2f} |")
    print(f"| squeezegen engine | {median(r[0] for r in eng):.2f} | {median(r[1] for r in eng):.2f} |")
    prefill_ratio = median(h[0] / e[0] for h, e in zip(hf, eng, strict=True))
    decode_ratio = median(e[1] / h[1] for h, e in zip(hf, eng, strict=True))
    print(f"| engine vs HF (median of per-pair ratios) | {prefill_ratio:.2f}x as fast | {decode_ratio:.2f}x |")
    print(f"tokens identical in every run: {same}")


if __name__ == "__main__":
    main()
