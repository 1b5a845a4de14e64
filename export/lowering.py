"""Lowering one stage to ONNX: torch.export -> opset 23 (attention as the ONNX `Attention` op, the
token ops as "ai.slimengine" ops), the float32 boundary every stage module keeps, and the example
inputs a trace is made from.

Every stage takes and returns float32 at its boundary and computes in the bundle's precision
inside, so the runtime's buffers are precision-independent. Batch, latent height/width, text length
and token count are dynamic.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from .sd3_model import DistilledSD3
from .stage_spec import StageSpec
from .token_ops import ONNX_TRANSLATIONS

OPSET = 23
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class StageModule(nn.Module):
    """A stage's module: casts float32 inputs to the compute dtype and outputs back to float32."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def _in(self, *xs):
        return [x.to(self.dtype) for x in xs]

    @staticmethod
    def _out(*xs):
        return tuple(x.float() for x in xs)


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def example_inputs(model: DistilledSD3, batch: int = 2, height: int = 8, width: int = 6, text: int = 5, seed: int = 0):
    """Consistent float32 inputs for every SD3 stage, from running the PyTorch stages on random data."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    p = c.patch_size
    latents = torch.randn(batch, c.in_channels, height * p, width * p, generator=g)
    timestep = torch.rand(batch, generator=g) * 1000
    pooled = torch.randn(batch, c.pooled_projection_dim, generator=g)
    text_in = torch.randn(batch, text, c.joint_attention_dim, generator=g)
    with torch.no_grad():
        img, txt, temb = (t.float() for t in model.embed(latents.to(model_dtype(model)), timestep, pooled.to(model_dtype(model)),
                                                      text_in.to(model_dtype(model))))
    inputs = {"embed": (latents, timestep, pooled, text_in)}
    for i in range(c.num_layers):
        inputs[f"block_{i}"] = (img, txt, temb)
    inputs["compensate"] = (img * 0.1, txt * 0.1)
    inputs["final"] = (img, temb, latents)
    return inputs


def _dynamic_shapes(spec: StageSpec, patch: int, max_patches: int):
    dims = {
        "batch": torch.export.Dim("batch", min=1, max=4096),
        "text": torch.export.Dim("text", min=1, max=8192),
        "tokens": torch.export.Dim("tokens", min=1, max=max_patches * max_patches),
        "selected": torch.export.Dim("selected", min=1, max=max_patches * max_patches),  # token stages' recomputed tokens
    }
    h = torch.export.Dim("height_patches", min=1, max=max_patches)
    w = torch.export.Dim("width_patches", min=1, max=max_patches)
    dims["height"], dims["width"] = patch * h, patch * w
    return tuple({axis: dims[d] for axis, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs)


def trace_stage(module: nn.Module, spec: StageSpec, args: tuple, patch: int = 1, max_patches: int = 1, dynamic_shapes=None,
                optimize: bool = True):
    """torch.export + ONNX lowering of one stage (the token ops lowered to ai.slimengine); returns the
    ONNXProgram. `dynamic_shapes` defaults to the SD3 stages' dimensions; `optimize` runs torch.onnx's graph
    optimizer (constant folding included)."""
    with warnings.catch_warnings(), _quiet_logs():
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            module, args, dynamo=True, opset_version=OPSET, verbose=False, optimize=optimize,
            dynamic_shapes=dynamic_shapes if dynamic_shapes is not None else _dynamic_shapes(spec, patch, max_patches),
            custom_translation_table=ONNX_TRANSLATIONS,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
        )


class _quiet_logs:
    """torch.onnx prints progress lines and warnings per trace; the CLI has its own progress bar."""

    def __enter__(self):
        self.levels = {n: logging.getLogger(n).level for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")}
        for n in self.levels:
            logging.getLogger(n).setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for n, level in self.levels.items():
            logging.getLogger(n).setLevel(level)
