"""The engine on a CUDA GPU: parity with Hugging Face, every method running, and GPU timings.

    python benchmarks/cuda_check.py --tokenizer DIR [--contexts 8192 32768]

1. Each tiny architecture on the GPU (fp32): greedy tokens identical to `model.generate`, and a
   left-padded batch's logits within 1e-4 of Hugging Face's at every step.
2. Every registered method generates on the GPU and holds the KV bytes its budget says.
3. Timings on a random 1B-parameter Llama-shaped model in bf16 (weights do not matter for speed):
   HF generate vs the engine's full cache vs SnapKV at 10%, prefill seconds and decode tokens/s,
   measured back to back in one process.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LogitsProcessor, LogitsProcessorList

import squeezegen as sg
from squeezegen.methods import REGISTRY, method
from squeezegen.models.tiny import TINY_CONFIGS, tiny_model

PROMPT = "The history of the printing press begins in the fifteenth century, when movable type"
BATCH = ["Short prompt about cats.", PROMPT * 3, "Medium length prompt on rivers, lakes and the sea."]


def parity(tok, device: str) -> None:
    for name in TINY_CONFIGS:
        model = tiny_model(name).to(device)
        ids = tok(PROMPT, return_tensors="pt").to(device)
        ref = model.generate(**ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        ours = sg.generate(model, tok, PROMPT, max_new_tokens=64, ignore_eos=True)
        same = ours.token_ids[0] == ref[0, ids.input_ids.shape[1] :].tolist()
        enc = tok(BATCH, return_tensors="pt", padding=True, padding_side="left").to(device)
        out = model.generate(
            **enc, max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        res = sg.generate(model, tok, BATCH, max_new_tokens=8, ignore_eos=True, output_logits=True)
        diff = max((a - b).abs().max().item() for a, b in zip(res.logits, out.logits, strict=True))
        print(f"parity {name:13s} tokens identical: {same}   padded batch max logit diff: {diff:.2e}", flush=True)


def methods_run(tok, device: str) -> None:
    model = tiny_model("tiny-llama").to(device)
    prompt = PROMPT * 20
    full = sg.generate(model, tok, prompt, max_new_tokens=16, ignore_eos=True)
    for name in REGISTRY:
        params = {"full": {}, "rpc": {"P": 16, "R": 4}}.get(name, {"budget": 0.25})
        m = method(name, **params)
        res = sg.generate(model, tok, prompt, method=m, max_new_tokens=16, ignore_eos=True)
        print(f"method {name:14s} kv {res.kv_bytes / full.kv_bytes:6.1%} of full, lengths {res.cache_lengths}")


class Clock(LogitsProcessor):
    """Stamps the time each time HF has new logits: the first after prefill, then one per step."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.stamps: list[float] = []

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def __call__(self, input_ids, scores):
        self.sync()
        self.stamps.append(time.perf_counter())
        return scores


def timing(contexts: list[int], new_tokens: int, device: str) -> None:
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=max(contexts) + new_tokens + 8,
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    print(f"timing model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, bf16")

    class Tok:  # ids in, no text needed: the engine reads only these attributes
        pad_token_id = 0
        eos_token_id = None
        chat_template = None

        def __call__(self, text, add_special_tokens=True):
            n = int(text)
            return type("Enc", (), {"input_ids": torch.randint(10, 30000, (n,), generator=gen).tolist()})()

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    gen = torch.Generator().manual_seed(0)
    tok = Tok()
    model.generation_config.eos_token_id = None
    for context in contexts:
        rows = {}
        for label, m in (("engine full", None), ("engine snapkv 10%", method("snapkv", budget=0.1))):
            sg.generate(model, tok, "256", method=m, max_new_tokens=4, ignore_eos=True)  # warm-up
            res = sg.generate(model, tok, str(context), method=m, max_new_tokens=new_tokens, ignore_eos=True)
            rows[label] = (res.timings.prefill_s, res.timings.decode_tokens_per_s, res.kv_bytes)
        ids = torch.randint(10, 30000, (1, context), device=device)

        clock = Clock(device)
        clock.sync()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]))
        stamps = clock.stamps
        rows["HF generate"] = (stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0]), None)
        for label, (prefill, tps, kv) in rows.items():
            kv_text = f"{kv / 2**20:8.1f} MiB" if kv else "       -    "
            print(f"context {context:6d}  {label:18s} prefill {prefill:7.3f} s  decode {tps:7.1f} tok/s  KV {kv_text}")
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="folder holding the SmolLM2 tokenizer files")
    parser.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(name, "torch", torch.__version__, flush=True)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    parity(tok, args.device)
    methods_run(tok, args.device)
    timing(args.contexts, args.new_tokens, args.device)


if __name__ == "__main__":
    main()
