"""Binary linear layers: one core (sign(W) with a straight-through estimator, or packed signs when
deployed) and three ways to scale it.

- `SignLinear`: sign(W) times the mean |W| of each output row (XNOR-style), no training: the floor.
- `OneBitLinear`: static input and output scales from a rank-1 factorisation of |W| (SVID),
  output through a LayerNorm without affine parameters (OneBit).
- `BinaryMoSLinear`: E scaling experts mixed per token by a router (BinaryMoS); with E = 1 it is
  OneBit's scaled product without the LayerNorm.

Training updates the latent full-precision weight through sign(); `pack_()` replaces it by the
signs at one bit per weight and the scales by 16-bit copies, which is what a checkpoint stores and
what the forward pass then unpacks, one layer at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from squeezegen.quant.kernels import BinaryPlan
from squeezegen.quant.packing import pack_signs, unpack_signs
from squeezegen.runtime.native_step import NativeProjection

STORED_DTYPE = torch.float16  # scales, router and bias in the deployed format


def round_to_stored_(tensor: torch.Tensor) -> None:
    """Round in place to what the checkpoint stores (16-bit), keeping the compute dtype."""
    tensor.data = tensor.data.to(STORED_DTYPE).to(tensor.dtype)


class SignSTE(torch.autograd.Function):
    """sign(w) forward (0 counts as +1); backward passes the gradient where |w| < 1."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return torch.where(weight >= 0, 1.0, -1.0).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (weight,) = ctx.saved_tensors
        return grad * (weight.abs() < 1).to(grad.dtype)


def rank1_abs(weight: torch.Tensor, iterations: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """|W| ~ outer(out_scale, in_scale) from its leading singular pair, both non-negative: power
    iteration from a positive start (|W| is non-negative, so its leading pair is; a full SVD of
    every layer costs minutes on a small CPU). Computed in float32, returned in `weight`'s dtype:
    a layer's tensors share its model's dtype (FSDP shards only uniform ones)."""
    a = weight.detach().float().abs()
    v = torch.ones(a.shape[1], device=a.device) / a.shape[1] ** 0.5
    for _ in range(iterations):
        u = a @ v
        u = u / u.norm().clamp_min(1e-30)
        v = a.T @ u
        sigma = v.norm().clamp_min(1e-30)
        v = v / sigma
    root = sigma.sqrt()
    return (u * root).to(weight.dtype), (v * root).to(weight.dtype)


class BinaryLinear(nn.Module):
    """The shared core: a latent weight seen through sign(), or packed signs once deployed.

    Subclasses define `scaled(x, signs)`; `scale_names` lists their stored tensors.
    """

    scale_names: tuple[str, ...] = ()

    def __init__(self, linear: nn.Linear, latent: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach() if latent is None else latent
        self.weight: nn.Parameter | None = nn.Parameter(weight.clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.register_buffer("packed", None)

    @property
    def is_packed(self) -> bool:
        return self.weight is None

    def signs(self, dtype: torch.dtype) -> torch.Tensor:
        if self.is_packed:
            return unpack_signs(self.packed, self.in_features, dtype)
        return SignSTE.apply(self.weight).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None and not torch.is_grad_enabled():  # packed, inference: the kernel
            group = self.__dict__.get("shared_input")
            if group is None:  # a layer no other shares its input with: a group of one
                group = self.shared_input = SharedInput([self])
            y = group.output(self, x)
            if y is not None:
                return y
        y = self.scaled(x, self.signs(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse: bool = True):
        self.__dict__.pop("_kernel_watch", None)  # moved or cast: the kernel's tensors are made again
        return super()._apply(fn, recurse)

    @classmethod
    def native_projection(cls, modules: list[BinaryLinear]) -> NativeProjection | None:
        """Packed layers that read one input, as one call of the C decode step (their kernel)."""
        if not all(m.is_packed for m in modules) or len({m.in_features for m in modules}) != 1:
            return None
        plan = BinaryPlan(modules[0].in_features, [(m.packed, m.out_features, *m.kernel_args()) for m in modules])
        fields = plan.native_fields()
        return None if fields is None else NativeProjection(fields, [plan])

    def kernel_args(self) -> tuple:
        """(in_scales (E, in) | None, out_scales (E, out), router (E, in) | None, bias | None,
        layernorm) in float32 for the packed kernel, made again whenever a stored tensor changes
        (moved, cast, loaded into, edited in place: its storage or version counter differs)."""
        watched = self.__dict__.get("_kernel_watch")
        if watched is None or any(t._version != v or t.data_ptr() != p for t, v, p in watched):
            self._kernel_args = self._kernel_tensors()
            self._kernel_watch = [(t, t._version, t.data_ptr()) for t in (self.packed, *self.stored_tensors())]
        return self._kernel_args

    def _kernel_tensors(self) -> tuple:
        raise NotImplementedError

    def scaled(self, x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stored_tensors(self) -> list[torch.Tensor]:
        """The 16-bit tensors the deployed layer keeps besides the signs (scales, router, bias)."""
        named = [getattr(self, n) for n in self.scale_names]
        tensors = [t.weight if isinstance(t, nn.Linear) else t for t in named]
        return tensors + ([self.bias] if self.bias is not None else [])

    @torch.no_grad()
    def pack_(self) -> None:
        """Deploy: signs at one bit per weight, scales/router/bias rounded to 16-bit values."""
        if self.is_packed:
            return
        self.packed = pack_signs(self.weight)
        self.weight = None
        for tensor in self.stored_tensors():
            round_to_stored_(tensor)

    def stored_bits(self) -> int:
        signs = self.out_features * -(-self.in_features // 8) * 8
        return signs + sum(t.numel() * 16 for t in self.stored_tensors())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={self.is_packed}"


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().contiguous()


def _cast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == like.dtype else t.to(like.dtype)


class SignLinear(BinaryLinear):
    scale_names = ("out_scale",)

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        self.out_scale = nn.Parameter(linear.weight.detach().abs().mean(dim=1))

    def scaled(self, x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        return (x @ signs.T) * _cast(self.out_scale, x)

    def _kernel_tensors(self) -> tuple:
        return None, _f32(self.out_scale)[None], None, _f32(self.bias), False


class OneBitLinear(BinaryLinear):
    scale_names = ("in_scale", "out_scale")

    def __init__(self, linear: nn.Linear, layernorm: bool = True) -> None:
        # OneBit's latent weights start small, at sign(W) * 0.01, so signs flip easily in training
        weight = linear.weight.detach()
        super().__init__(linear, latent=torch.where(weight >= 0, 0.01, -0.01).to(weight.dtype))
        out_scale, in_scale = rank1_abs(linear.weight)
        self.in_scale, self.out_scale = nn.Parameter(in_scale), nn.Parameter(out_scale)
        self.layernorm = layernorm

    def scaled(self, x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        y = ((x * _cast(self.in_scale, x)) @ signs.T) * _cast(self.out_scale, x)
        return F.layer_norm(y, (self.out_features,)) if self.layernorm else y

    def _kernel_tensors(self) -> tuple:
        return _f32(self.in_scale)[None], _f32(self.out_scale)[None], None, _f32(self.bias), self.layernorm


class BinaryMoSLinear(BinaryLinear):
    scale_names = ("in_scales", "out_scales", "router")

    def __init__(self, linear: nn.Linear, experts: int = 4) -> None:
        super().__init__(linear)
        out_scale, in_scale = rank1_abs(linear.weight)
        self.experts = experts
        self.in_scales = nn.Parameter(in_scale.repeat(experts, 1))  # (E, d_in)
        self.out_scales = nn.Parameter(out_scale.repeat(experts, 1))  # (E, d_out)
        self.router = nn.Linear(self.in_features, experts, bias=False, dtype=linear.weight.dtype)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token mixture weights (..., E), softmax in fp32."""
        return F.softmax(F.linear(x, _cast(self.router.weight, x)), dim=-1, dtype=torch.float32).to(x.dtype)

    def scaled(self, x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        g = self.gates(x)
        s_in, s_out = g @ _cast(self.in_scales, x), g @ _cast(self.out_scales, x)
        return ((x * s_in) @ signs.T) * s_out

    def _kernel_tensors(self) -> tuple:
        return _f32(self.in_scales), _f32(self.out_scales), _f32(self.router.weight), _f32(self.bias), False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.experts}"


class SharedInput:
    """Packed layers that read one input (attention's q/k/v, the MLP's gate/up): the first of them
    asked computes all their outputs in one kernel call, the others take theirs from it, so a
    decoder block makes four kernel calls a token instead of seven. Asked with another input (or
    the same one changed in place, or twice), it computes again: only fewer calls, never a stale
    output."""

    def __init__(self, layers: list[BinaryLinear]) -> None:
        self.layers = tuple(layers)
        self._plan, self._plan_args = None, None
        self._x, self._input_version, self._outputs = None, -2, {}

    def _current_plan(self) -> BinaryPlan:
        args = tuple(layer.kernel_args() for layer in self.layers)
        if self._plan_args is None or any(a is not b for a, b in zip(args, self._plan_args, strict=True)):
            specs = [(layer.packed, layer.out_features, *a) for layer, a in zip(self.layers, args, strict=True)]
            self._plan, self._plan_args = BinaryPlan(self.layers[0].in_features, specs), args
        return self._plan

    def output(self, layer: BinaryLinear, x: torch.Tensor) -> torch.Tensor | None:
        version = _version(x)
        if x is not self._x or version != self._input_version or layer not in self._outputs:
            ys = self._current_plan()(x)
            if ys is None:
                return None
            self._x, self._input_version, self._outputs = x, version, dict(zip(self.layers, ys, strict=True))
        y = self._outputs.pop(layer)
        if not self._outputs:
            self._x = None  # all taken: hold nothing between tokens
        return y


def _version(x: torch.Tensor) -> int:
    """In-place changes of x so far; inference-mode tensors count none (the blocks never change
    their projections' input in place)."""
    return -1 if x.is_inference() else x._version


SHARED_INPUTS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


def share_inputs_(blocks: nn.ModuleList) -> None:
    """Group the packed projections of each decoder block that read the same input (Llama-style
    names, `SHARED_INPUTS`) into one `SharedInput`; others stay single."""
    for block in blocks:
        for parent_name, names in SHARED_INPUTS.items():
            parent = getattr(block, parent_name, None)
            layers = [getattr(parent, name, None) for name in names]
            if not all(isinstance(layer, BinaryLinear) and layer.is_packed for layer in layers):
                continue
            if len({(type(layer), layer.in_features) for layer in layers}) != 1:
                continue
            group = SharedInput(layers)
            for layer in layers:
                layer.shared_input = group
