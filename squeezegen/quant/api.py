"""One verb binarizes a model: `sg.binarize_(model, sg.BinaryMoSConfig(experts=4))`.

Every nn.Linear inside the decoder blocks (attention and MLP projections) becomes a binary layer;
embeddings, lm_head and norms stay as they are. `pack_` deploys it (1-bit signs, 16-bit scales),
`bits_per_weight` and `stored_bytes` tell what that costs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from squeezegen.errors import SqueezegenError
from squeezegen.quant.binary import (
    BinaryLinear,
    BinaryMoSLinear,
    OneBitLinear,
    SignLinear,
    round_to_stored_,
    share_inputs_,
)
from squeezegen.quant.half_head import keep_head_16bit_
from squeezegen.quant.int4 import int4_layers
from squeezegen.runtime.engine import check_causal_lm


@dataclass
class SignConfig:
    """sign(W) with a per-output-channel mean-|W| scale; no training (the floor)."""

    name = "sign"

    def make(self, linear: nn.Linear) -> BinaryLinear:
        return SignLinear(linear)


@dataclass
class OneBitConfig:
    """OneBit: static input/output scales (SVID rank-1 init), no-affine LayerNorm on the output."""

    layernorm: bool = True
    name = "onebit"

    def __post_init__(self) -> None:
        if not isinstance(self.layernorm, bool):
            raise SqueezegenError(f"layernorm must be True or False, got {self.layernorm!r}")

    def make(self, linear: nn.Linear) -> BinaryLinear:
        return OneBitLinear(linear, layernorm=self.layernorm)


@dataclass
class BinaryMoSConfig:
    """BinaryMoS: `experts` scaling experts mixed per token by a router (rank-1 SVD init)."""

    experts: int = 4
    name = "binarymos"

    def __post_init__(self) -> None:
        if isinstance(self.experts, bool) or not isinstance(self.experts, int) or self.experts < 1:
            raise SqueezegenError(f"experts must be a whole number >= 1, got {self.experts!r}")

    def make(self, linear: nn.Linear) -> BinaryLinear:
        return BinaryMoSLinear(linear, experts=self.experts)


BinaryConfig = SignConfig | OneBitConfig | BinaryMoSConfig
CONFIGS = {c.name: c for c in (SignConfig, OneBitConfig, BinaryMoSConfig)}


def config_from_dict(spec: dict) -> BinaryConfig:
    spec = dict(spec)
    name = spec.pop("method", None)
    if name not in CONFIGS:
        raise SqueezegenError(f"unknown binarization {name!r}: use one of {', '.join(CONFIGS)}")
    return CONFIGS[name](**spec)


def config_to_dict(config: BinaryConfig) -> dict:
    return {"method": config.name, **asdict(config)}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise SqueezegenError(
            f"{type(model).__name__} has no model.layers: binarization supports decoder-only Hugging Face LMs"
        )
    return layers


@torch.no_grad()
def binarize_(model: nn.Module, config: BinaryConfig) -> nn.Module:
    """Replace every nn.Linear in the decoder blocks by `config`'s binary layer, in place."""
    check_causal_lm(model)
    if not isinstance(config, SignConfig | OneBitConfig | BinaryMoSConfig):
        raise SqueezegenError(
            f"config must be sg.BinaryMoSConfig(...), sg.OneBitConfig() or sg.SignConfig(), got {type(config).__name__}"
        )
    if binary_layers(model):
        raise SqueezegenError("this model is already binarized")
    if int4_layers(model):
        raise SqueezegenError("this model holds 4-bit layers (sg.quantize_): binarize the float model instead")
    for block in decoder_layers(model):
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, config.make(child))
    model.config.squeezegen_binary = config_to_dict(config)
    return model


def binary_layers(model: nn.Module) -> list[BinaryLinear]:
    return [m for m in model.modules() if isinstance(m, BinaryLinear)]


def _require_binary(model: nn.Module) -> list[BinaryLinear]:
    layers = binary_layers(model)
    if not layers:
        raise SqueezegenError("the model has no binary layers: apply sg.binarize_(model, config) first")
    return layers


@torch.no_grad()
def pack_(model: nn.Module) -> nn.Module:
    """Deploy in place, to exactly what a checkpoint holds: 1-bit signs, every other weight rounded
    to 16 bits, the embedding and LM head kept as float16. Decoding then runs the packed-model
    kernels (1-bit layers from their signs, those that share an input in one call; the head from
    its 16-bit weight); many tokens at once (a prefill) unpack one layer at a time for a dense
    matrix product."""
    for layer in _require_binary(model):
        layer.pack_()
    for tensor in model.parameters():
        round_to_stored_(tensor)
    share_inputs_(decoder_layers(model))
    return keep_head_16bit_(model)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a (binarized) model computes in: that of its decoder blocks' floating tensors
    (a packed model's embedding and head stay float16 whatever it computes in)."""
    dtypes = [p.dtype for p in decoder_layers(model).parameters() if p.is_floating_point()]
    return dtypes[0] if dtypes else torch.float32


def bits_per_weight(model: nn.Module) -> float:
    """Storage of the binarized linear layers (signs, scales, router, bias) per weight they replace."""
    layers = _require_binary(model)
    return sum(m.stored_bits() for m in layers) / sum(m.in_features * m.out_features for m in layers)


def stored_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the deployed model: binarized linear layers, and everything else at 16 bits; and
    what the same linear layers take in float32."""
    layers = _require_binary(model)
    inside = {id(p) for m in layers for p in m.parameters()}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    linear = sum(m.stored_bits() for m in layers) // 8
    return {
        "binary_linear": linear,
        "float32_linear": sum(4 * m.in_features * m.out_features for m in layers),
        "other_16bit": 2 * rest,
        "total": linear + 2 * rest,
    }
