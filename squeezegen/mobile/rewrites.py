"""Graph rewrites that keep a diffusers SD module on the mobile GPU delegate, applied to a copy.

Each replacement computes the same function as the module it replaces (tests check it) but lowers to
ops the LiteRT GPU delegate accepts and that stay finite in FP16:
- GroupNorm: reshape to 4-D groups, keepdim mean/variance, implicit broadcasting (no BROADCAST_TO),
  variance of a pre-scaled difference so the squares do not overflow FP16;
- GELU: exact GELU through a bounded erf polynomial (no cubic term, no erf op), or the tanh form with
  its cubic computed on a clamped input;
- attention: heads folded into the batch so every tensor is 3-D, explicit softmax(QK^T)V; in the
  text encoder the causal mask becomes a MINIMUM (an ADDed mask computes wrong values on LiteRT's GPU);
- oversized convolutions / linears: split along the output channels into sequential pieces below a
  weight-size threshold (mobile GPUs cannot allocate one huge texture).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RewriteConfig:
    """Which rewrites to apply; `split_threshold` is the largest weight (elements) kept in one piece."""

    group_norm: bool = True
    gelu: bool = True
    attention: bool = True
    split: bool = True
    timestep: bool = True  # the UNet's timestep projection as a matmul (MobileTimesteps), not a broadcast MUL
    split_threshold: int = 2**23
    # the largest attention-score tensor (fp16 bytes) computed at once; larger ones go in query blocks.
    # SD 1.5's 64x64 self-attention holds 512 MiB of scores, past a GPU's largest buffer (lavapipe's: 128 MiB)
    attention_bytes: int = 2**26

    def disabled(self, *names: str) -> RewriteConfig:
        out = copy.copy(self)
        for name in names:
            setattr(out, name, False)
        return out


NO_REWRITES = RewriteConfig(group_norm=False, gelu=False, attention=False, split=False)


class MobileGroupNorm(nn.Module):
    """GroupNorm as (N, G, C/G, L) with keepdim statistics; same parameters as the original."""

    # Power-of-two scale: exact in FP32; keeps the squares below the FP16 maximum up to |x - mean| ~ 4096.
    VAR_SCALE = 1.0 / 16.0

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.num_groups = norm.num_groups
        self.num_channels = norm.num_channels
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        n, c = shape[0], shape[1]
        xg = x.reshape(n, self.num_groups, c // self.num_groups, -1)
        mean = xg.mean(dim=(2, 3), keepdim=True)
        # (d*s) * rsqrt(mean((d*s)^2) + eps*s^2) == d * rsqrt(var + eps), with every intermediate s^2 smaller.
        ds = (xg - mean) * self.VAR_SCALE
        var_s = (ds * ds).mean(dim=(2, 3), keepdim=True)
        y = (ds * torch.rsqrt(var_s + self.eps * self.VAR_SCALE**2)).reshape(shape)
        if self.weight is not None:
            param_shape = (1, c) + (1,) * (len(shape) - 2)
            y = y * self.weight.reshape(param_shape) + self.bias.reshape(param_shape)
        return y


# Abramowitz & Stegun 7.1.26: |erf(z) - approx| <= 1.5e-7 for all z.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def safe_erf(z: torch.Tensor) -> torch.Tensor:
    """erf from ABS/SIGN/EXP/DIV ops; z is clamped so z^2 stays far below the FP16 maximum."""
    z = z.clamp(-6.0, 6.0)
    a = z.abs()
    t = 1.0 / (1.0 + _AS_P * a)
    poly = t * (_AS_A[0] + t * (_AS_A[1] + t * (_AS_A[2] + t * (_AS_A[3] + t * _AS_A[4]))))
    return torch.sign(z) * (1.0 - poly * torch.exp(-a * a))


def safe_gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU without overflowing intermediates: erf form for exact GELU, clamped cubic for the tanh form."""
    if approximate == "tanh":
        xc = x.clamp(-10.0, 10.0)  # beyond +-10 the sigmoid is saturated in FP32 already
        return x * torch.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (xc + 0.044715 * xc * xc * xc))
    return 0.5 * x * (1.0 + safe_erf(x * (1.0 / math.sqrt(2.0))))


class SafeGELU(nn.Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return safe_gelu(x, self.approximate)


class MobileAttnProcessor:
    """diffusers attention with heads folded into the batch: every tensor is at most 3-D (4-D input only
    at the VAE's spatial attention entry/exit), and softmax(QK^T * scale)V is spelled out, in blocks of
    queries where the scores would pass `max_bytes` in fp16 (a GPU allocates each op's output whole)."""

    def __init__(self, max_bytes: int = 2**26):
        self.max_bytes = max_bytes

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError("MobileAttnProcessor does not take attention masks (SD does not use them)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.reshape(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch, q_len, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        heads = attn.heads
        head_dim = query.shape[-1] // heads
        kv_len = key.shape[1]

        def fold(t: torch.Tensor, length: int) -> torch.Tensor:
            return t.reshape(batch, length, heads, head_dim).transpose(1, 2).reshape(batch * heads, length, head_dim)

        q = fold(query, q_len) * attn.scale
        k = fold(key, kv_len)
        v = fold(value, kv_len)
        blocks = math.ceil(batch * heads * q_len * kv_len * 2 / self.max_bytes)
        kt = k.transpose(1, 2)
        if blocks == 1:
            out = torch.bmm(torch.softmax(torch.bmm(q, kt), dim=-1), v)
        else:  # each block normalised after its product with V: cat(softmax(s_i) V) is folded back by the
            # converter into one softmax(s) V over the whole score tensor, cat(exp(s_i) V / sum) is not
            step = math.ceil(q_len / blocks)
            outs = []
            for i in range(0, q_len, step):
                scores = torch.bmm(q[:, i : i + step], kt)
                weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
                outs.append(torch.bmm(weights, v) / weights.sum(dim=-1, keepdim=True))
            out = torch.cat(outs, dim=1)
        out = out.reshape(batch, heads, q_len, head_dim).transpose(1, 2).reshape(batch, q_len, heads * head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class MobileTextAttention(nn.Module):
    """CLIP's text self-attention with heads folded into the batch (3-D tensors, as MobileAttnProcessor)
    and the additive causal mask applied as `minimum(scores, bound)`: on LiteRT's GPU accelerator a
    constant ADDed to the scores before the softmax gave wrong probabilities (rows past the second
    token, in fp16 and fp32 alike), where MINIMUM with the same constant computes them exactly."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj
        self.heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scale

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, None]:
        batch, length, width = hidden_states.shape

        def fold(t: torch.Tensor) -> torch.Tensor:
            return (
                t.reshape(batch, length, self.heads, self.head_dim).transpose(1, 2).reshape(-1, length, self.head_dim)
            )

        q = fold(self.q_proj(hidden_states)) * self.scale
        scores = torch.bmm(q, fold(self.k_proj(hidden_states)).transpose(1, 2))
        if attention_mask is not None:  # additive (0 kept, very negative masked): the same as a bound
            mask = attention_mask.reshape(-1, length, length)
            scores = torch.minimum(scores, torch.where(mask < 0, mask, torch.full_like(mask, MASK_BOUND)))
        out = torch.bmm(torch.softmax(scores, dim=-1), fold(self.v_proj(hidden_states)))
        out = out.reshape(batch, self.heads, length, self.head_dim).transpose(1, 2).reshape(batch, length, width)
        return self.out_proj(out), None


MASK_BOUND = 30000.0  # above any attention score, below fp16's largest value (65504)


class SplitConv2d(nn.Module):
    """A Conv2d computed as sequential convolutions over slices of its output channels, concatenated."""

    def __init__(self, conv: nn.Conv2d, pieces: int):
        super().__init__()
        bounds = [round(i * conv.out_channels / pieces) for i in range(pieces + 1)]
        self.parts = nn.ModuleList()
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            part = nn.Conv2d(
                conv.in_channels,
                hi - lo,
                conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                groups=1,
                bias=conv.bias is not None,
                padding_mode=conv.padding_mode,
            )
            part.weight = nn.Parameter(conv.weight[lo:hi].detach().clone(), requires_grad=False)
            if conv.bias is not None:
                part.bias = nn.Parameter(conv.bias[lo:hi].detach().clone(), requires_grad=False)
            self.parts.append(part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=1)


class SplitLinear(nn.Module):
    """A Linear computed as sequential matmuls over slices of its output features, concatenated."""

    def __init__(self, linear: nn.Linear, pieces: int):
        super().__init__()
        bounds = [round(i * linear.out_features / pieces) for i in range(pieces + 1)]
        self.parts = nn.ModuleList()
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            part = nn.Linear(linear.in_features, hi - lo, bias=linear.bias is not None)
            part.weight = nn.Parameter(linear.weight[lo:hi].detach().clone(), requires_grad=False)
            if linear.bias is not None:
                part.bias = nn.Parameter(linear.bias[lo:hi].detach().clone(), requires_grad=False)
            self.parts.append(part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def _pieces(weight: torch.Tensor, threshold: int) -> int:
    return max(1, math.ceil(weight.numel() / threshold))


def _gelu_approximation(module: nn.Module) -> str | None:
    """'none' / 'tanh' for the GELU activation modules of torch and transformers, None otherwise."""
    name = type(module).__name__
    if isinstance(module, nn.GELU):
        return module.approximate
    if name == "GELUActivation":
        return "none"
    if name in {"NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation"}:
        return "tanh"
    return None


def apply_rewrites(module: nn.Module, config: RewriteConfig | None = None) -> nn.Module:
    """Return a rewritten deep copy of `module` (the original is left untouched)."""
    config = config or RewriteConfig()
    module = copy.deepcopy(module).eval()
    if config.attention and hasattr(module, "set_attn_processor"):
        module.set_attn_processor(MobileAttnProcessor(config.attention_bytes))
    elif config.attention:
        for sub in module.modules():
            if type(sub).__name__ == "Attention" and hasattr(sub, "set_processor"):
                sub.set_processor(MobileAttnProcessor(config.attention_bytes))
    for parent in list(module.modules()):
        if config.attention and type(parent).__name__ == "CLIPEncoderLayer":
            parent.self_attn = MobileTextAttention(parent.self_attn)
        # diffusers' GELU / GEGLU call self.gelu(...): shadow the method on the instance.
        if config.gelu and type(parent).__name__ in {"GELU", "GEGLU"} and hasattr(parent, "gelu"):
            approx = getattr(parent, "approximate", "none")
            parent.gelu = lambda x, _a=approx: safe_gelu(x, _a)
        for name, child in list(parent.named_children()):
            replacement = None
            if config.group_norm and isinstance(child, nn.GroupNorm):
                replacement = MobileGroupNorm(child)
            elif config.gelu and _gelu_approximation(child) is not None:
                replacement = SafeGELU(_gelu_approximation(child))
            elif config.split and isinstance(child, nn.Conv2d) and child.groups == 1:
                if child.weight.numel() > config.split_threshold:
                    replacement = SplitConv2d(child, _pieces(child.weight, config.split_threshold))
            elif config.split and isinstance(child, nn.Linear) and child.weight.numel() > config.split_threshold:
                replacement = SplitLinear(child, _pieces(child.weight, config.split_threshold))
            if replacement is not None:
                setattr(parent, name, replacement)
    return module


def count_replacements(module: nn.Module) -> dict[str, int]:
    """How many modules of each rewritten kind a module holds (for the export manifest)."""
    kinds = {"MobileGroupNorm": 0, "SafeGELU": 0, "MobileTextAttention": 0, "SplitConv2d": 0, "SplitLinear": 0}
    for sub in module.modules():
        if type(sub).__name__ in kinds:
            kinds[type(sub).__name__] += 1
    return kinds
