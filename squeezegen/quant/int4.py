"""4-bit weights, one verb: `sg.quantize_(model, sg.Int4WeightOnlyConfig())` (torchao's spelling).

Every nn.Linear of the decoder blocks (and the LM head) keeps its weight as 4-bit codes with a
float16 scale and min per group, w = q * scale + min, in GGUF Q4_1's layout and by llama.cpp's
rounding: 0.625 bytes a weight in groups of 32, under a third of bf16, and the bytes a decode
step reads are what decides its speed on a CPU. Decoding (a few tokens a call) runs the C kernel
(runtime/csrc/int4_linear.c) over the codes; a prefill dequantizes one layer at a time for a
dense matrix product. Activations stay in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from squeezegen.errors import SqueezegenError
from squeezegen.quant.binary import BinaryLinear
from squeezegen.runtime.engine import check_causal_lm
from squeezegen.runtime.native import kernel_input, runtime_library
from squeezegen.runtime.native_step import PROJ_INT4, WEIGHT_KINDS, NativeProjection

BLOCK = 32  # weights per 16 packed bytes (a Q4_1 block)


@dataclass
class Int4WeightOnlyConfig:
    """4-bit weights in groups of `group_size` inputs (a multiple of 32), activations untouched.

    The codes, scales and mins are GGUF Q4_1's, made by llama.cpp's rule, so that with the default
    group of 32 a Q4_1 GGUF model's weights, dequantized and quantized again, come back bit for bit
    (and a model quantized here holds what llama.cpp would make of it). `include_head` quantizes
    the LM head too: for a small model with a large vocabulary it is the largest product a decode
    step makes (SmolLM2-135M: 28M of its 135M weights).
    """

    group_size: int = 32
    include_head: bool = True

    def __post_init__(self) -> None:
        group = self.group_size
        if isinstance(group, bool) or not isinstance(group, int) or group < BLOCK or group % BLOCK:
            raise SqueezegenError(f"group_size must be a whole positive multiple of {BLOCK}, got {group!r}")
        if not isinstance(self.include_head, bool):
            raise SqueezegenError(f"include_head must be True or False, got {self.include_head!r}")


QUANTIZE_ROWS = 8192


@torch.no_grad()
def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 (out, in / 2), scales float16 (out, in / group), mins float16) of `weight` by
    llama.cpp's quantize_row_q4_1_ref: per group, min and scale = (max - min) / 15, and
    q = min(15, trunc((w - min) / scale + 0.5)) from the float32 scale and min, which are then
    stored as float16. In float32 step by step as the C does, so the codes are llama.cpp's. Rows
    go QUANTIZE_ROWS at a time (each row's codes are its own), which bounds the float32
    temporaries of a large LM head (151,936 rows in Qwen2.5) to a few hundred MB."""
    if weight.shape[0] > QUANTIZE_ROWS:
        parts = [quantize_int4(weight[i : i + QUANTIZE_ROWS], group) for i in range(0, weight.shape[0], QUANTIZE_ROWS)]
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))
    out, width = weight.shape
    w = weight.detach().float().reshape(out, width // group, group)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = (high - low) / 15
    inverse = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    q = ((w - low) * inverse + 0.5).trunc().clamp(0, 15).to(torch.uint8).reshape(out, width // BLOCK, BLOCK)
    packed = q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)  # byte i: weight i low, weight i + 16 high
    return packed.reshape(out, width // 2), scale.squeeze(-1).half(), low.squeeze(-1).half()


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int) -> torch.Tensor:
    """The float32 weight (out, in) that 4-bit codes stand for: q * scale + min."""
    out, width = packed.shape[0], 2 * packed.shape[1]
    blocks = packed.reshape(out, width // BLOCK, BLOCK // 2)
    q = torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).reshape(out, width // group, group)
    return (q.float() * scales.float()[..., None] + mins.float()[..., None]).reshape(out, width)


def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int
) -> torch.Tensor | None:
    """y (..., out) = x @ W.T for 4-bit W, in x's dtype, summed in float32 over the dequantized
    weights; None where the kernel does not apply (more than 16 tokens, another dtype or device,
    inside torch.compile, no compiler), and the caller computes it with torch."""
    stored = (packed, scales, mins)
    if torch.compiler.is_compiling() or any(t.device.type != "cpu" or not t.is_contiguous() for t in stored):
        return None
    out, width = packed.shape[0], 2 * packed.shape[1]
    grouped = (out, width // group) if isinstance(group, int) and group > 0 and width % group == 0 else None
    if packed.dtype != torch.uint8 or packed.dim() != 2 or scales.shape != grouped or mins.shape != grouped:
        raise SqueezegenError(
            "4-bit weights need packed uint8 (out, in / 2) with scales and mins (out, in / group): got packed "
            f"{packed.dtype} {tuple(packed.shape)}, scales {tuple(scales.shape)}, mins {tuple(mins.shape)}, "
            f"group {group}"
        )
    if scales.dtype != torch.float16 or mins.dtype != torch.float16:
        raise SqueezegenError(f"4-bit scales and mins are float16, got {scales.dtype} and {mins.dtype}")
    flat = kernel_input(x, width)
    lib = runtime_library() if flat is not None else None
    if lib is None:
        return None
    y = torch.empty((*x.shape[:-1], out), dtype=x.dtype)
    bf16 = int(x.dtype == torch.bfloat16)
    tokens = flat.numel() // width
    pointers = (t.data_ptr() for t in stored)
    if lib.sg_int4_linear(flat.data_ptr(), y.data_ptr(), bf16, tokens, width, out, *pointers, group):
        raise MemoryError("the 4-bit kernel could not allocate its scratch memory")
    return y


class Int4Linear(nn.Module):
    """A linear layer over 4-bit weights (buffers `packed`, `scales`, `mins`) and its own bias."""

    def __init__(self, in_features: int, out_features: int, group: int, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, in_features // group, dtype=torch.float16))
        self.register_buffer("mins", torch.zeros(out_features, in_features // group, dtype=torch.float16))
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def of(cls, linear: nn.Linear, group: int) -> Int4Linear:
        """`linear` quantized (its bias kept as it is, in its dtype)."""
        bias = None if linear.bias is None else linear.bias.detach().clone()
        layer = cls(linear.in_features, linear.out_features, group, bias)
        packed, scales, mins = quantize_int4(linear.weight, group)
        device = linear.weight.device
        layer.packed, layer.scales, layer.mins = packed.to(device), scales.to(device), mins.to(device)
        return layer

    def _apply(self, fn, recurse: bool = True):
        # .to(dtype) / .half() reach the bias; the codes and their float16 scales only follow the device
        device = fn(torch.empty(0, device=self.packed.device)).device
        for name in ("packed", "scales", "mins"):
            self._buffers[name] = self._buffers[name].to(device)
        if self.bias is not None:
            self._buffers["bias"] = fn(self.bias)
        return self

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) the codes stand for, in `dtype`."""
        return dequantize_int4(self.packed, self.scales, self.mins, self.group).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = not (torch.is_grad_enabled() and x.requires_grad)
        y = int4_linear(x, self.packed, self.scales, self.mins, self.group) if kernel else None
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if y is None:  # a prefill, gradients, another device: the whole weight, one layer at a time
            return F.linear(x, self.dequantized(x.dtype), bias)
        return y if bias is None else y.add_(bias)

    @classmethod
    def native_projection(cls, modules: list[Int4Linear]) -> NativeProjection | None:
        """4-bit layers that read one input as one product of the C decode step: their codes,
        scales, mins (and biases) concatenated once, each layer's buffers becoming views of them."""
        first = modules[0]
        if any(
            (m.group, m.in_features, m.bias is None) != (first.group, first.in_features, first.bias is None)
            for m in modules
        ):
            return None
        whole = {name: _concat_buffers(modules, name) for name in ("packed", "scales", "mins", "bias")}
        if any(t is not None and (t.device.type != "cpu" or not t.is_contiguous()) for t in whole.values()):
            return None
        fields = {"kind": PROJ_INT4, "weight": whole["packed"].data_ptr(), "group": first.group}
        fields |= {"scales": whole["scales"].data_ptr(), "mins": whole["mins"].data_ptr()}
        if whole["bias"] is not None:
            if whole["bias"].dtype not in WEIGHT_KINDS:
                return None
            fields |= {"bias": whole["bias"].data_ptr(), "bias_kind": WEIGHT_KINDS[whole["bias"].dtype]}
        return NativeProjection(fields, list(whole.values()))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, "
            f"bias={self.bias is not None}"
        )


def _concat_buffers(modules: list[Int4Linear], name: str) -> torch.Tensor | None:
    """One tensor holding the modules' buffer `name` end to end (rows), each module's buffer now a view of it."""
    parts = [m._buffers[name] for m in modules]
    if parts[0] is None:
        return None
    if len(parts) == 1:
        return parts[0]
    whole = torch.cat(parts)
    at = 0
    for m, part in zip(modules, parts, strict=True):
        m._buffers[name] = whole[at : at + part.shape[0]]
        at += part.shape[0]
    return whole


def int4_layers(model: nn.Module) -> list[Int4Linear]:
    return [m for m in model.modules() if isinstance(m, Int4Linear)]


def _targets(model: nn.Module, config: Int4WeightOnlyConfig) -> list[tuple]:
    """(parent, attribute or None for the head, where, linear) of every layer `quantize_` replaces."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise SqueezegenError(
            f"{type(model).__name__} has no model.layers: 4-bit quantization supports decoder-only Hugging Face LMs"
        )
    targets = [
        (parent, name, f"model.layers.{path}.{name}", child)
        for path, parent in layers.named_modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    head = model.get_output_embeddings() if config.include_head else None
    if isinstance(head, nn.Linear):
        targets.append((model, None, "the LM head", head))
    return targets


def group_misfit(model: nn.Module, config: Int4WeightOnlyConfig) -> str | None:
    """The first layer whose inputs `config`'s groups do not divide ("<where> has N inputs"), or None."""
    for _, _, where, linear in _targets(model, config):
        if linear.in_features % config.group_size:
            return f"{where} has {linear.in_features} inputs"
    return None


@torch.no_grad()
def quantize_(model: nn.Module, config: Int4WeightOnlyConfig) -> nn.Module:
    """Replace every nn.Linear of the decoder blocks (and the LM head when `config.include_head`)
    by an Int4Linear, in place. A head tied to the embedding is quantized alone: the embedding
    keeps its weight and the model no longer ties them."""
    check_causal_lm(model)
    if not isinstance(config, Int4WeightOnlyConfig):
        raise SqueezegenError(f"config must be sg.Int4WeightOnlyConfig(...), got {type(config).__name__}")
    if any(isinstance(m, BinaryLinear) for m in model.modules()):
        raise SqueezegenError("this model holds 1-bit layers (sg.binarize_): quantize the float model instead")
    if int4_layers(model):
        raise SqueezegenError("this model is already quantized to 4 bits: load the float model again to requantize")
    targets = _targets(model, config)
    misfit = group_misfit(model, config)
    if misfit is not None:
        raise SqueezegenError(
            f"{misfit}, not a multiple of group_size {config.group_size}: pick a group_size that divides it "
            "(32 divides most models' widths)"
        )
    for parent, name, _, linear in targets:
        if name is None:  # the head: its tie (if any) is broken, and nothing may tie it again
            model.set_output_embeddings(Int4Linear.of(linear, config.group_size))
            model.config.tie_word_embeddings = False
            if getattr(model, "all_tied_weights_keys", None):
                model.all_tied_weights_keys = {}
        else:
            setattr(parent, name, Int4Linear.of(linear, config.group_size))
    return model
