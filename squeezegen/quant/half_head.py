"""The 16-bit embedding and LM head of a packed model.

A packed model's embedding and LM head (tied in SmolLM2 and Gemma 3) are by far its largest
tensors, and the checkpoint stores them as float16. Widening them to the compute dtype would
double their memory and, for the head, the bytes read per decoded token; so `pack_` keeps them
float16 here, the head computing through the packed-model kernel (float32 arithmetic, a few tokens
per call) and the embedding widening only the rows it looks up. `model.to(dtype)` then changes
what they compute in, never the 16-bit weight itself; device moves move it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from squeezegen.runtime.native import dense_linear
from squeezegen.runtime.native_step import NativeProjection, dense_projection

STORED = torch.float16


class _Sixteen(nn.Module):
    """A module over a 16-bit `weight` that computes in the dtype of its `compute` marker."""

    weight: nn.Parameter

    def _apply(self, fn, recurse: bool = True):
        # .to(dtype) / .float() / .cuda() reach the marker; the weight only follows its device
        self.compute = fn(self.compute)
        if self.weight.device != self.compute.device:
            self.weight.data = self.weight.data.to(self.compute.device)
        for name, buffer in self._buffers.items():
            if name != "compute" and buffer is not None:
                self._buffers[name] = fn(buffer)
        return self


class HalfHead(_Sixteen):
    """The LM head over a float16 weight (shared with the embedding when tied)."""

    def __init__(self, head: nn.Linear, compute: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = head.in_features, head.out_features
        head.weight.data = head.weight.data.to(STORED)
        self.weight = head.weight
        self.register_buffer("bias", None if head.bias is None else head.bias.detach().to(compute))
        self.register_buffer("compute", torch.empty(0, dtype=compute, device=head.weight.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.weight.dtype == STORED and not torch.is_grad_enabled()
        y = dense_linear(x, self.weight) if kernel else None
        if y is None:  # many tokens (a prefill, a perplexity), gradients, another device: widen
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @classmethod
    def native_projection(cls, modules: list[HalfHead]) -> NativeProjection | None:
        """The head as the C decode step's dense product over its 16-bit weight."""
        (head,) = modules
        if head.bias is not None and head.bias.dtype != head.compute.dtype:
            return None
        return dense_projection(head.weight, head.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.weight.dtype}"


class HalfEmbedding(_Sixteen):
    """The token embedding over a float16 weight, looked-up rows widened to the compute dtype (and
    multiplied by the model's `embed_scale` there, as Gemma's scaled embedding does)."""

    def __init__(self, embedding: nn.Embedding, compute: torch.dtype) -> None:
        super().__init__()
        self.padding_idx = embedding.padding_idx
        embedding.weight.data = embedding.weight.data.to(STORED)
        self.weight = embedding.weight
        scale = getattr(embedding, "embed_scale", None)
        self.register_buffer("embed_scale", None if scale is None else scale.detach().to(compute), persistent=False)
        self.register_buffer("compute", torch.empty(0, dtype=compute, device=embedding.weight.device), persistent=False)

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight, self.padding_idx).to(self.compute.dtype)
        return rows if self.embed_scale is None else rows * self.embed_scale.to(rows.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight={self.weight.dtype}"


@torch.no_grad()
def keep_head_16bit_(model: nn.Module) -> nn.Module:
    """Swap the embedding and LM head for their float16 versions (once; ties kept)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    ends = {id(m.weight) for m in (embedding, head) if m is not None}
    compute = next(p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in ends)
    if isinstance(embedding, nn.Embedding) and not isinstance(embedding, _Sixteen):
        model.set_input_embeddings(HalfEmbedding(embedding, compute))
    if isinstance(head, nn.Linear):
        model.set_output_embeddings(HalfHead(head, compute))
    return model
