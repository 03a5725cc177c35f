"""Seeded random decoder models built from a config: small enough for unit tests, real in structure.

They use the vocabulary of the bundled SmolLM2 tokenizer so that text round-trips through them, and
keep the quirks of each family (GQA, q/k norms, sliding windows, scaled embeddings).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

VOCAB = 49152  # SmolLM2's tokenizer
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=8192,
    # A wide init spreads the logits so greedy decoding has no near-ties for numerics to flip.
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    tie_word_embeddings=False,
)

TINY_CONFIGS: dict[str, dict] = {
    "tiny-llama": dict(model_type="llama", rope_theta=10000.0),
    "tiny-qwen2": dict(model_type="qwen2", rope_theta=10000.0, use_sliding_window=False),
    "tiny-qwen3": dict(model_type="qwen3", rope_theta=10000.0, use_sliding_window=False),
    "tiny-mistral": dict(model_type="mistral", rope_theta=10000.0, sliding_window=None),
    "tiny-gemma3": dict(
        model_type="gemma3_text",
        num_hidden_layers=6,
        sliding_window=16,  # small, so tests cross the window
        query_pre_attn_scalar=16,
        rope_theta=10000.0,
        rope_local_base_freq=10000.0,
    ),
}


def tiny_config(name: str) -> PretrainedConfig:
    kwargs = {**_COMMON, **TINY_CONFIGS[name]}
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Build the named tiny model with weights drawn from `seed` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(name), dtype=dtype)
    return model.eval()
