"""The SD3 transformer cut into the stages the engine runs, plus 1.x-Distill's compensation MLPs.

diffusers' `SD3Transformer2DModel` is the model itself; this file only adds the cut points
(embed, one joint block, compensate, final) so that a sampler can skip or reuse blocks, and the
`DeltaMLP` that 1.x-Distill adds. `DistilledSD3.forward_full` composes the stages back into one
forward pass, which tests compare with diffusers' own `forward`.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import SD3Transformer2DModel
from torch import nn


@dataclasses.dataclass(frozen=True)
class SD3Config:
    """The diffusers `SD3Transformer2DModel` arguments, all inferable from the weights."""

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    in_channels: int
    out_channels: int
    patch_size: int
    joint_attention_dim: int
    caption_projection_dim: int
    pooled_projection_dim: int
    pos_embed_max_size: int
    sample_size: int = 128
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def diffusers_kwargs(self) -> dict:
        kwargs = dataclasses.asdict(self)
        kwargs["dual_attention_layers"] = tuple(self.dual_attention_layers)
        return kwargs

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        d["inner_dim"] = self.inner_dim
        return d


class DeltaMLP(nn.Module):
    """1.x-Distill's compensation: f(x) = x + fc2(GELU(fc1(LayerNorm(x)))), identity at init."""

    def __init__(self, dim: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        return delta + self.fc2(nn.functional.gelu(self.fc1(self.ln(delta))))


class DistilledSD3(nn.Module):
    """An SD3 transformer with optional 1.x-Distill compensation MLPs, callable stage by stage."""

    def __init__(self, config: SD3Config, with_compensation: bool):
        super().__init__()
        self.config = config
        self.transformer = SD3Transformer2DModel(**config.diffusers_kwargs())
        self.delta_pred_hidden = DeltaMLP(config.inner_dim) if with_compensation else None
        self.delta_pred_encoder = DeltaMLP(config.caption_projection_dim) if with_compensation else None

    @property
    def has_compensation(self) -> bool:
        return self.delta_pred_hidden is not None

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def embed(self, latents, timestep, pooled, text):
        """latents [B,C,H,W], timestep [B], pooled [B,P], text [B,L,J] -> img [B,N,D], txt [B,L,D], temb [B,D]."""
        t = self.transformer
        return self._patch_embed(latents), t.context_embedder(text), t.time_text_embed(timestep, pooled)

    def _patch_embed(self, latents):
        """diffusers' PatchEmbed with pos_embed_max_size (centre crop of the position table), written
        out so that the crop's token count stays symbolic in torch.export (diffusers' reshape(1, -1, D)
        of the crop gets frozen to the example's size)."""
        pe = self.transformer.pos_embed
        size, p = self.config.pos_embed_max_size, self.config.patch_size
        height, width = latents.shape[-2] // p, latents.shape[-1] // p
        if height > size or width > size:
            raise ValueError(f"latent size {latents.shape[-2]}x{latents.shape[-1]} exceeds the position table ({size * p})")
        tokens = pe.proj(latents).flatten(2).transpose(1, 2)
        # Rows/columns picked by index, not slice: the exporter rewrites a slice end `top + height`
        # into a negative floor division that ONNX's truncating Div gets wrong for odd sizes.
        rows = torch.arange(height, device=latents.device) + (size - height) // 2
        cols = torch.arange(width, device=latents.device) + (size - width) // 2
        table = pe.pos_embed.reshape(size, size, -1).index_select(0, rows).index_select(1, cols)
        return tokens + table.reshape(1, height * width, table.shape[-1]).to(tokens.dtype)

    def block(self, index: int, img, txt, temb):
        """Joint block `index`: (img, txt, temb) -> (img, txt); txt is None after the last block."""
        txt, img = self.transformer.transformer_blocks[index](hidden_states=img, encoder_hidden_states=txt, temb=temb)
        return img, txt

    def compensate(self, delta_img, delta_txt):
        """The compensated deltas MLP_h(Δh), MLP_c(Δc) added back in place of the skipped range."""
        return self.delta_pred_hidden(delta_img), self.delta_pred_encoder(delta_txt)

    def final(self, img, temb, latents):
        """norm_out, proj_out and unpatchify -> velocity with the shape of `latents`."""
        t = self.transformer
        p = self.config.patch_size
        batch, _, height, width = latents.shape
        out = t.proj_out(t.norm_out(img, temb))
        out = out.reshape(batch, height // p, width // p, p, p, self.config.out_channels)
        out = torch.einsum("nhwpqc->nchpwq", out)
        return out.reshape(batch, self.config.out_channels, height, width)

    def forward_full(self, latents, timestep, pooled, text):
        """Every block, no caching: the same function as diffusers' forward."""
        img, txt, temb = self.embed(latents, timestep, pooled, text)
        for i in range(self.num_layers):
            img, txt = self.block(i, img, txt, temb)
        return self.final(img, temb, latents)
