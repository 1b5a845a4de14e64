"""X-Slim token-level reuse for one SD3 joint block: the two stages and their ONNX lowering.

A token step recomputes only a subset of a block's image tokens. It needs, from the last full
step, every image token's attention keys and values and the block's image-stream residual
(output - input). So a block comes in two graphs that share the block's own weights:

- `KVBlockStage`: the full block, diffusers' output plus the image tokens' K and V ([B, N, D],
  heads flattened, after norm_k when the block has qk-norm), for the runtime's K/V cache.
- `TokenBlockStage`: the block on the image tokens `token_index` only:
      sub   = gather_tokens(img, token_index)
      q, k, v of `sub`; K = scatter_tokens(k_cache, token_index, k), V likewise
      attention of [sub; text] queries over [K; text K] / [V; text V]
      the rest of the block on `sub` and on the whole text stream, as diffusers does
      img_out = scatter_tokens(img + residual_cache, token_index, sub_out)
  so the tokens not recomputed reuse their cached residual, and the text stream is recomputed in
  full (against keys of which the unselected ones are stale).

Every image-stream operation of a joint block but attention works token by token, so with K/V
caches from the same input the subset rows equal the full block's rows.

Gather and scatter are the custom ops `slimengine::gather_tokens` / `slimengine::scatter_tokens`
(token_ops.py), lowered to the "ai.slimengine" ONNX Runtime kernels GatherTokens / ScatterTokens
(opset 1, float32 only, kernels/ort/register_ops.cpp). They therefore always run on the float32 side of a stage's
boundary: in an fp16/bf16 stage the scattered K/V are cast to the compute dtype afterwards.
Indices must be distinct and in [0, N); their order is free (the runtime passes them ascending).
Dual-attention blocks (SD3.5's attn2) are not supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lowering import StageModule, example_inputs, trace_stage
from .sd3_model import DistilledSD3
from .stage_spec import kv_stage_spec, token_stage_spec
from .token_ops import DOMAIN, gather_tokens, scatter_tokens

# Everything of the token stages in one import: the ops (token_ops.py) and specs (stage_spec.py) too.
__all__ = ["DOMAIN", "KVBlockStage", "TokenBlockStage", "gather_tokens", "kv_stage_spec", "scatter_tokens",
           "token_example_inputs", "token_stage_spec", "trace_kv_block", "trace_token_block"]


# --- The block, cut open ------------------------------------------------------------------------
# diffusers' JointTransformerBlock.forward and JointAttnProcessor2_0, split where the image tokens'
# K/V leave and enter. Only the block's own submodules are called; nothing is copied.


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, H*d] -> [B, H, S, d]"""
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, d] -> [B, S, H*d]"""
    return x.transpose(1, 2).reshape(x.shape[0], -1, x.shape[1] * x.shape[3])


class _JointBlockStage(StageModule):
    def __init__(self, block: nn.Module, dtype: torch.dtype):
        super().__init__(dtype)
        if block.attn2 is not None:
            raise ValueError("token-level reuse does not support dual-attention joint blocks (attn2)")
        self.block = block

    @property
    def last(self) -> bool:
        """The last block (context_pre_only) has no text-stream output."""
        return self.block.context_pre_only

    def _image_in(self, img, temb):
        """img [B, n, D] -> q, k, v [B, H, n, d] and the image stream's modulation."""
        b, attn = self.block, self.block.attn
        norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = b.norm1(img, emb=temb)
        q, k, v = (_split_heads(proj(norm), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        return q, k, v, (gate_msa, shift_mlp, scale_mlp, gate_mlp)

    def _text_in(self, txt, temb):
        """txt [B, L, Dc] -> q (None for the last block, whose text output is unused), k, v, modulation."""
        b, attn = self.block, self.block.attn
        if self.last:
            norm, mod = b.norm1_context(txt, temb), None
        else:
            norm, *mod = b.norm1_context(txt, emb=temb)
        k, v = _split_heads(attn.add_k_proj(norm), attn.heads), _split_heads(attn.add_v_proj(norm), attn.heads)
        if attn.norm_added_k is not None:
            k = attn.norm_added_k(k)
        q = None
        if not self.last:
            q = _split_heads(attn.add_q_proj(norm), attn.heads)
            if attn.norm_added_q is not None:
                q = attn.norm_added_q(q)
        return q, k, v, mod

    def _attend(self, img_q, txt_q, k, v):
        """Joint attention; returns the image rows' and (unless last) text rows' outputs, [B, S, D]."""
        q = img_q if txt_q is None else torch.cat([img_q, txt_q], dim=2)
        out = _merge_heads(F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)).to(q.dtype)
        n = img_q.shape[2]
        return out[:, :n], (None if txt_q is None else out[:, n:])

    def _image_out(self, img, attn_out, mod):
        b = self.block
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        attn_out = b.attn.to_out[1](b.attn.to_out[0](attn_out))
        img = img + gate_msa.unsqueeze(1) * attn_out
        norm = b.norm2(img) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return img + gate_mlp.unsqueeze(1) * b.ff(norm)

    def _text_out(self, txt, attn_out, mod):
        b = self.block
        c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = mod
        txt = txt + c_gate_msa.unsqueeze(1) * b.attn.to_add_out(attn_out)
        norm = b.norm2_context(txt) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        return txt + c_gate_mlp.unsqueeze(1) * b.ff_context(norm)


class KVBlockStage(_JointBlockStage):
    """The full joint block, also returning the image tokens' attention keys and values.

    forward(img [B,N,D], txt [B,L,Dc], temb [B,D]) -> (img_out, txt_out, img_k, img_v), or
    (img_out, img_k, img_v) for the last block; img_k/img_v are [B, N, D], heads flattened.
    """

    def forward(self, img, txt, temb):
        img, txt, temb = self._in(img, txt, temb)
        q, k, v, mod = self._image_in(img, temb)
        txt_q, txt_k, txt_v, txt_mod = self._text_in(txt, temb)
        img_attn, txt_attn = self._attend(q, txt_q, torch.cat([k, txt_k], dim=2), torch.cat([v, txt_v], dim=2))
        img_out = self._image_out(img, img_attn, mod)
        if self.last:
            return self._out(img_out, _merge_heads(k), _merge_heads(v))
        return self._out(img_out, self._text_out(txt, txt_attn, txt_mod), _merge_heads(k), _merge_heads(v))


class TokenBlockStage(_JointBlockStage):
    """The joint block recomputing the image tokens `token_index` only (see the module docstring).

    forward(img [B,N,D], txt [B,L,Dc], temb [B,D], token_index [B,n] int64, k_cache, v_cache,
    residual_cache [B,N,D]) -> (img_out [B,N,D], txt_out [B,L,Dc]), or (img_out,) for the last block.
    """

    def forward(self, img, txt, temb, token_index, k_cache, v_cache, residual_cache):
        heads = self.block.attn.heads
        sub = gather_tokens(img, token_index)  # float32: the custom ops take float32 only
        sub, txt, temb = self._in(sub, txt, temb)
        q, k, v, mod = self._image_in(sub, temb)
        k_all, v_all = (_split_heads(scatter_tokens(cache, token_index, _merge_heads(new).float()).to(self.dtype), heads)
                        for cache, new in ((k_cache, k), (v_cache, v)))
        txt_q, txt_k, txt_v, txt_mod = self._text_in(txt, temb)
        sub_attn, txt_attn = self._attend(q, txt_q, torch.cat([k_all, txt_k], dim=2), torch.cat([v_all, txt_v], dim=2))
        sub_out = self._image_out(sub, sub_attn, mod).float()
        img_out = scatter_tokens(img + residual_cache, token_index, sub_out)
        if self.last:
            return (img_out,)
        return (img_out, self._text_out(txt, txt_attn, txt_mod).float())


# --- Example inputs and tracing ----------------------------------------------------------


def token_example_inputs(model: DistilledSD3, index: int, dtype: torch.dtype = torch.float32, batch: int = 2, height: int = 8,
                         width: int = 6, text: int = 5, selected: int | None = None, seed: int = 0):
    """Float32 (img, txt, temb, token_index, k_cache, v_cache, residual_cache) for block `index`: the
    caches come from KVBlockStage on the same img/txt/temb (so the token stage reproduces the full
    block on the subset); the indices are a random ascending subset, `selected` tokens per sample
    (default about a third, kept distinct from the other dynamic sizes so the tracer cannot equate them)."""
    img, txt, temb = example_inputs(model, batch=batch, height=height, width=width, text=text, seed=seed)[f"block_{index}"]
    tokens = img.shape[1]
    if selected is None:
        selected = next((s for s in range(max(2, tokens // 3), tokens) if s not in (batch, text)), None)
        if selected is None:
            raise ValueError(f"{tokens} image tokens are too few to trace a token stage from; use a larger example")
    g = torch.Generator().manual_seed(seed + 1)
    token_index = torch.stack([torch.randperm(tokens, generator=g)[:selected].sort().values for _ in range(batch)])
    with torch.no_grad():
        k_cache, v_cache = KVBlockStage(model.transformer.transformer_blocks[index], dtype)(img, txt, temb)[-2:]
    residual_cache = torch.randn(img.shape, generator=g) * 0.1
    return img, txt, temb, token_index, k_cache, v_cache, residual_cache


def trace_kv_block(model: DistilledSD3, index: int, dtype: torch.dtype = torch.float32, args: tuple | None = None):
    """ONNXProgram of KVBlockStage for block `index` (dynamic batch, tokens, text)."""
    if args is None:
        args = token_example_inputs(model, index, dtype)[:3]
    c = model.config
    return trace_stage(KVBlockStage(model.transformer.transformer_blocks[index], dtype), kv_stage_spec(model, index), args,
                       c.patch_size, c.pos_embed_max_size)


def trace_token_block(model: DistilledSD3, index: int, dtype: torch.dtype = torch.float32, args: tuple | None = None):
    """ONNXProgram of TokenBlockStage for block `index` (dynamic batch, tokens, text, selected)."""
    if args is None:
        args = token_example_inputs(model, index, dtype)
    c = model.config
    return trace_stage(TokenBlockStage(model.transformer.transformer_blocks[index], dtype), token_stage_spec(model, index), args,
                       c.patch_size, c.pos_embed_max_size)
