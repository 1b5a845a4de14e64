"""The token ops of X-Slim's token stages: `slimengine::gather_tokens` / `slimengine::scatter_tokens`
(torch custom ops) and their lowering to the "ai.slimengine" ONNX Runtime kernels GatherTokens /
ScatterTokens (opset 1, float32 only, kernels/ort/register_ops.cpp).

    gather_tokens(x [B,N,C], idx [B,K]) -> out [B,K,C],  out[b, j] = x[b, idx[b, j]]
    scatter_tokens(cache [B,N,C], idx [B,K], values [B,K,C]) -> a copy of cache with rows idx[b, j] = values[b, j]

Indices are int64, distinct within a row and in [0, N); their order is free. lowering.trace_stage
passes ONNX_TRANSLATIONS to every trace, so any stage using the ops lowers them.
"""

from __future__ import annotations

import onnxscript
import torch
from onnx.defs import OpSchema

DOMAIN = "ai.slimengine"


def _check_token_args(name: str, x: torch.Tensor, idx: torch.Tensor) -> None:
    if x.dim() != 3 or idx.dim() != 2 or idx.shape[0] != x.shape[0] or idx.dtype != torch.int64:
        raise ValueError(f"{name}: expected x [B, N, C] and int64 idx [B, K], got {tuple(x.shape)} and {idx.dtype} {tuple(idx.shape)}")


@torch.library.custom_op("slimengine::gather_tokens", mutates_args=())
def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """out[b, j, :] = x[b, idx[b, j], :]: x [B, N, C], idx [B, K] int64 -> [B, K, C]."""
    _check_token_args("gather_tokens", x, idx)
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))


@gather_tokens.register_fake
def _gather_tokens_fake(x, idx):
    torch._check(idx.shape[0] == x.shape[0])
    return x.new_empty((x.shape[0], idx.shape[1], x.shape[2]))


@torch.library.custom_op("slimengine::scatter_tokens", mutates_args=())
def scatter_tokens(cache: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of cache [B, N, C] with rows idx [B, K] (distinct) replaced by values [B, K, C]."""
    _check_token_args("scatter_tokens", cache, idx)
    if values.shape != (cache.shape[0], idx.shape[1], cache.shape[2]) or values.dtype != cache.dtype:
        raise ValueError(f"scatter_tokens: values must be {cache.dtype} [B, K, C], got {values.dtype} {tuple(values.shape)}")
    return cache.scatter(1, idx.unsqueeze(-1).expand(-1, -1, cache.shape[2]), values)


@scatter_tokens.register_fake
def _scatter_tokens_fake(cache, idx, values):
    torch._check(idx.shape[0] == cache.shape[0])
    torch._check(values.shape[1] == idx.shape[1])
    return torch.empty_like(cache)


def _onnx_op(name: str, inputs: tuple[tuple[str, str], ...]) -> onnxscript.values.Op:
    """An "ai.slimengine" opset-1 op for onnxscript, with a schema held here (not registered with onnx)."""
    schema = OpSchema(name, DOMAIN, 1, inputs=[OpSchema.FormalParameter(n, t) for n, t in inputs],
                      outputs=[OpSchema.FormalParameter("out", "T")],
                      type_constraints=[("T", ["tensor(float)"], "float32 only"), ("I", ["tensor(int64)"], "token indices")])
    return onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), name, schema)


_GatherTokens = _onnx_op("GatherTokens", (("x", "T"), ("idx", "I")))
_ScatterTokens = _onnx_op("ScatterTokens", (("cache", "T"), ("idx", "I"), ("values", "T")))


def _gather_tokens_onnx(x, idx):
    return _GatherTokens(x, idx)


def _scatter_tokens_onnx(cache, idx, values):
    return _ScatterTokens(cache, idx, values)


# For torch.onnx.export(..., dynamo=True, custom_translation_table=ONNX_TRANSLATIONS).
ONNX_TRANSLATIONS = {
    torch.ops.slimengine.gather_tokens.default: _gather_tokens_onnx,
    torch.ops.slimengine.scatter_tokens.default: _scatter_tokens_onnx,
}
