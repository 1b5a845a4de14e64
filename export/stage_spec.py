"""What a bundle states about each stage: its name, role, block and named float32/int64 inputs and
outputs (the manifest's `stages` entries), and the SD3 stage list.

Torch-free: the SD3 list reads only the model's config and whether it has compensation weights.
Lowering a stage to ONNX is lowering.py's; the stage modules are onnx_export.py's and token_block.py's.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sd3_model import DistilledSD3


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, or strings for dynamic dimensions
    dtype: str = "float32"  # or "int64" (SD3 token indices, LEMUR token ids)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str  # the file's name and what stats and profiles call the stage; nothing reads meaning from it
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    role: str = dataclasses.field(kw_only=True)  # what the stage computes: slimengine.bundle.SD3_ROLES / LEMUR_ROLES
    block: int | None = dataclasses.field(default=None, kw_only=True)  # the joint block, for roles block and block_tokens

    def __post_init__(self):
        if (self.block is not None) != (self.role in ("block", "block_tokens")):
            raise ValueError(f"stage {self.name}: role {self.role!r} {'needs' if self.block is None else 'takes no'} block index")

    @property
    def file(self) -> str:
        return f"stages/{self.name}.onnx"

    def to_json(self) -> dict:
        block = {} if self.block is None else {"block": self.block}
        return {"name": self.name, "role": self.role, **block, "file": self.file, "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs]}


# --- SD3 ------------------------------------------------------------------------------------------


def _block_io(model: DistilledSD3, index: int):
    """A joint block's (img, txt, temb) inputs and its outputs: img_out, and txt_out unless it is the last
    block (whose text stream ends there)."""
    c = model.config
    img = TensorSpec("img", ("batch", "tokens", c.inner_dim))
    txt = TensorSpec("txt", ("batch", "text", c.caption_projection_dim))
    temb = TensorSpec("temb", ("batch", c.inner_dim))
    last = index == c.num_layers - 1
    outs = (TensorSpec("img_out", img.shape),) if last else (TensorSpec("img_out", img.shape), TensorSpec("txt_out", txt.shape))
    return img, txt, temb, outs


def block_stage_spec(model: DistilledSD3, index: int) -> StageSpec:
    """block_{index}: (img, txt, temb) -> (img_out, [txt_out])."""
    img, txt, temb, outs = _block_io(model, index)
    return StageSpec(f"block_{index}", (img, txt, temb), outs, role="block", block=index)


def kv_stage_spec(model: DistilledSD3, index: int) -> StageSpec:
    """block_{index}_kv: (img, txt, temb) -> (img_out, [txt_out,] img_k, img_v)."""
    img, txt, temb, outs = _block_io(model, index)
    kv = (TensorSpec("img_k", img.shape), TensorSpec("img_v", img.shape))
    return StageSpec(f"block_{index}_kv", (img, txt, temb), outs + kv, role="block", block=index)


def token_stage_spec(model: DistilledSD3, index: int) -> StageSpec:
    """block_{index}_tokens: (img, txt, temb, token_index, k_cache, v_cache, residual_cache) -> (img_out, [txt_out])."""
    img, txt, temb, outs = _block_io(model, index)
    caches = tuple(TensorSpec(n, img.shape) for n in ("k_cache", "v_cache", "residual_cache"))
    return StageSpec(f"block_{index}_tokens", (img, txt, temb, TensorSpec("token_index", ("batch", "selected"), dtype="int64"), *caches), outs,
                     role="block_tokens", block=index)


def stage_specs(model: DistilledSD3, token_stages: bool = False) -> list[StageSpec]:
    """Every stage of the bundle. With `token_stages` (X-Slim token level), block_N also outputs its image
    keys/values and each block without dual attention gets a block_N_tokens stage."""
    c = model.config
    d, dc = c.inner_dim, c.caption_projection_dim
    img, txt, temb = TensorSpec("img", ("batch", "tokens", d)), TensorSpec("txt", ("batch", "text", dc)), TensorSpec("temb", ("batch", d))
    latents = TensorSpec("latents", ("batch", c.in_channels, "height", "width"))
    specs = [StageSpec("embed", (latents, TensorSpec("timestep", ("batch",)), TensorSpec("pooled", ("batch", c.pooled_projection_dim)),
                                 TensorSpec("text", ("batch", "text", c.joint_attention_dim))), (img, txt, temb), role="embed")]
    for i in range(c.num_layers):
        if token_stages and i not in c.dual_attention_layers:  # dual-attention blocks run whole in token steps
            specs.append(dataclasses.replace(kv_stage_spec(model, i), name=f"block_{i}"))
        else:
            specs.append(block_stage_spec(model, i))
    if token_stages:
        specs += [token_stage_spec(model, i) for i in range(c.num_layers) if i not in c.dual_attention_layers]
    if model.has_compensation:
        specs.append(StageSpec("compensate", (TensorSpec("delta_img", img.shape), TensorSpec("delta_txt", txt.shape)),
                               (TensorSpec("comp_img", img.shape), TensorSpec("comp_txt", txt.shape)), role="compensate"))
    specs.append(StageSpec("final", (img, temb, TensorSpec("latents", ("batch", c.out_channels, "height", "width"))),
                           (TensorSpec("velocity", ("batch", c.out_channels, "height", "width")),), role="final"))
    return specs
