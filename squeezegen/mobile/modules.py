"""Export-side views of the three SD modules: fixed-shape forwards that lower to mobile-GPU ops.

The UNet is driven stage by stage (conv_in + time embedding, each down block, the mid block, each up
block, the output head) so that it can be cut into parts that convert and load separately, as the
paper and Apple's Core ML converter do for the full-size UNet; with one part it is the whole UNet.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MobileTimesteps(nn.Module):
    """diffusers' sinusoidal timestep projection with t x freq as a K=1 matmul: the stock
    `t[:, None] * freq[None, :]` is a mutually broadcasting MUL, which the GPU delegate rejects."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        half = proj.num_channels // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - proj.downscale_freq_shift)
        self.register_buffer("freqs", (proj.scale * torch.exp(exponent))[:, None], persistent=False)
        self.flip = proj.flip_sin_to_cos
        self.odd = proj.num_channels % 2 == 1

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = torch.nn.functional.linear(t[:, None], self.freqs)
        emb = torch.cat([torch.cos(arg), torch.sin(arg)] if self.flip else [torch.sin(arg), torch.cos(arg)], dim=-1)
        if self.odd:
            emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
        return emb


class TextEncoder(nn.Module):
    """CLIP text encoder from token embeddings to the last hidden state. The token lookup itself happens
    on the host (`embed`): the GPU delegate takes neither EMBEDDING_LOOKUP nor int32 tensors. Positions
    and the causal mask are constants."""

    def __init__(self, clip_text_model: nn.Module, length: int):
        super().__init__()
        tm = getattr(clip_text_model, "text_model", clip_text_model)  # transformers 5 flattened it
        self.tokens = tm.embeddings.token_embedding
        self.register_buffer(
            "positions", tm.embeddings.position_embedding.weight[:length].detach().clone()[None], persistent=False
        )
        mask = torch.full((length, length), torch.finfo(torch.float16).min / 2).triu(1)
        self.register_buffer("mask", mask[None, None], persistent=False)
        self.encoder = tm.encoder
        self.final_layer_norm = tm.final_layer_norm

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(input_ids)

    def forward(self, token_embeds: torch.Tensor) -> torch.Tensor:
        out = self.encoder(inputs_embeds=token_embeds + self.positions, attention_mask=self.mask)
        return self.final_layer_norm(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])


class VaeDecoder(nn.Module):
    """Latents (already divided by nothing: the raw UNet-space latents) to an image in [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.scale = 1.0 / vae.config.scaling_factor
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents * self.scale
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def unet_stages(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The UNet's stages in execution order, named for the manifest."""
    stages = [("in", unet.conv_in)]
    stages += [(f"down{i}", b) for i, b in enumerate(unet.down_blocks)]
    stages.append(("mid", unet.mid_block))
    stages += [(f"up{i}", b) for i, b in enumerate(unet.up_blocks)]
    stages.append(("out", unet.conv_out))
    return stages


def _check_sd_unet(unet: nn.Module) -> None:
    cfg = unet.config
    extras = [
        k
        for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim", "num_class_embeds")
        if cfg.get(k) is not None
    ]
    if extras or cfg.get("time_cond_proj_dim") is not None:
        raise ValueError(f"UNet uses {extras or ['time_cond_proj_dim']}, which SD 1.x/2.x UNets do not")


class UNetPart(nn.Module):
    """Stages [start, stop) of a UNet2DConditionModel, carrying (sample, temb, skip connections).

    Inputs: part 0 takes (sample, timestep, context); later parts take (sample, temb, context, *skips).
    Outputs: the last part returns the noise prediction; others return (sample, temb, *skips).
    """

    def __init__(self, unet: nn.Module, start: int, stop: int, n_skips_in: int, use_mobile_timesteps: bool = True):
        super().__init__()
        _check_sd_unet(unet)
        self.unet = unet
        self.time_proj = MobileTimesteps(unet.time_proj) if use_mobile_timesteps else unet.time_proj
        stages = unet_stages(unet)
        self.names = [name for name, _ in stages[start:stop]]
        self.first = start == 0
        self.last = stop == len(stages)
        self.n_skips_in = n_skips_in

    def forward(self, sample: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *skips: torch.Tensor):
        unet = self.unet
        skips = list(skips)
        if self.first:
            emb = unet.time_embedding(self.time_proj(t).to(sample.dtype))
        else:
            emb = t
        h = sample
        for name in self.names:
            if name == "in":
                h = unet.conv_in(h)
                skips = [h]
            elif name.startswith("down"):
                block = unet.down_blocks[int(name[4:])]
                if getattr(block, "has_cross_attention", False):
                    h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
                else:
                    h, res = block(hidden_states=h, temb=emb)
                skips.extend(res)
            elif name == "mid":
                if getattr(unet.mid_block, "has_cross_attention", False):
                    h = unet.mid_block(h, emb, encoder_hidden_states=context)
                else:
                    h = unet.mid_block(h, emb)
            elif name.startswith("up"):
                block = unet.up_blocks[int(name[2:])]
                n = len(block.resnets)
                res, skips = tuple(skips[-n:]), skips[:-n]
                if getattr(block, "has_cross_attention", False):
                    h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=context)
                else:
                    h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res)
            elif name == "out":
                if unet.conv_norm_out is not None:
                    h = unet.conv_act(unet.conv_norm_out(h))
                h = unet.conv_out(h)
        if self.last:
            return h
        return (h, emb, *skips)


def plan_unet_parts(unet: nn.Module, parts: int) -> list[tuple[int, int]]:
    """Cut the stage list into `parts` contiguous ranges of roughly equal parameter count."""
    stages = unet_stages(unet)
    sizes = [sum(p.numel() for p in m.parameters()) for _, m in stages]
    sizes[0] += sum(p.numel() for p in unet.time_embedding.parameters())
    sizes[-1] += sum(p.numel() for p in unet.conv_norm_out.parameters()) if unet.conv_norm_out is not None else 0
    parts = max(1, min(parts, len(stages)))
    total = sum(sizes)
    bounds, acc, start = [], 0, 0
    for i, s in enumerate(sizes):
        acc += s
        remaining_parts = parts - len(bounds) - 1
        if remaining_parts > 0 and acc >= total * (len(bounds) + 1) / parts and len(stages) - i - 1 >= remaining_parts:
            bounds.append((start, i + 1))
            start = i + 1
    bounds.append((start, len(stages)))
    return bounds


def skip_count(unet: nn.Module, stop: int) -> int:
    """Skip connections alive after running stages [0, stop)."""
    n = 0
    for name, module in unet_stages(unet)[:stop]:
        if name == "in":
            n = 1
        elif name.startswith("down"):
            n += len(module.resnets) + (1 if module.downsamplers is not None else 0)
        elif name.startswith("up"):
            n -= len(module.resnets)
    return n
