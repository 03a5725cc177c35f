"""The pieces of a Hugging Face causal LM that the engine drives by hand.

The engine never re-implements a layer: it calls each HF decoder layer module with its own weights
and quirks (q/k norms, scaled embeddings, sandwich norms), and only takes over the loop around them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from squeezegen.errors import UnsupportedModelError

# Decoder families whose HF layers the engine drives: embeddings, a list of decoder layers called
# with position embeddings, a final norm and an lm_head.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


@dataclass
class DecoderParts:
    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module
    layer_types: list[str]  # "full_attention" or "sliding_attention" per layer
    rotary_per_type: bool  # Gemma-3 keeps one RoPE table per layer type
    logit_softcap: float | None

    @classmethod
    def of(cls, model: nn.Module) -> DecoderParts:
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"the engine cannot drive a {config.model_type!r} model; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        body = model.model
        n_layers = config.num_hidden_layers
        types = list(getattr(config, "layer_types", None) or ["full_attention"] * n_layers)
        rotary = body.rotary_emb
        return cls(
            embed=body.embed_tokens,
            layers=body.layers,
            norm=body.norm,
            lm_head=model.lm_head,
            rotary=rotary,
            layer_types=types,
            rotary_per_type="layer_type" in inspect.signature(rotary.forward).parameters,
            logit_softcap=getattr(config, "final_logit_softcapping", None),
        )

    def rope(self, hidden: torch.Tensor, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin for each layer type at the given absolute positions (B, L)."""
        if self.rotary_per_type:
            return {t: self.rotary(hidden, positions, t) for t in set(self.layer_types)}
        table = self.rotary(hidden, positions)
        return {t: table for t in set(self.layer_types)}

    def scaling(self, layer: int) -> float:
        """The softmax scale of a layer's attention (Gemma-3 uses query_pre_attn_scalar, not head_dim)."""
        return self.layers[layer].self_attn.scaling

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden)).float()
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits
