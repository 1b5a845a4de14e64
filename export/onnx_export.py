"""Lower the SD3 stages to ONNX (torch.export -> opset 23, attention as the ONNX `Attention` op).

Every stage takes and returns float32 at its boundary and computes in the bundle's precision
inside, so the runtime's buffers are precision-independent. Batch, latent height/width, text length
and token count are dynamic.

Joint blocks share one graph structure (per kind: plain, dual-attention, last), so each kind is
traced once, from a copy with distinct random weights, and every block's own weights are swapped
into that graph by parameter name: tracing a 24-block model 24 times would dominate export time.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .sd3_model import DistilledSD3

OPSET = 23
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def stage_specs(model: DistilledSD3, token_stages: bool = False) -> list[StageSpec]:
    """Every stage of the bundle. With `token_stages` (X-Slim token level), block_N also outputs its image
    keys/values and each block without dual attention gets a block_N_tokens stage."""
    from .token_block import kv_stage_spec, token_stage_spec

    c = model.config
    d, dc = c.inner_dim, c.caption_projection_dim
    img, txt, temb = TensorSpec("img", ("batch", "tokens", d)), TensorSpec("txt", ("batch", "text", dc)), TensorSpec("temb", ("batch", d))
    latents = TensorSpec("latents", ("batch", c.in_channels, "height", "width"))
    specs = [StageSpec("embed", (latents, TensorSpec("timestep", ("batch",)), TensorSpec("pooled", ("batch", c.pooled_projection_dim)),
                                 TensorSpec("text", ("batch", "text", c.joint_attention_dim))), (img, txt, temb), role="embed")]
    for i in range(c.num_layers):
        last = i == c.num_layers - 1
        outs = (TensorSpec("img_out", img.shape),) if last else (TensorSpec("img_out", img.shape), TensorSpec("txt_out", txt.shape))
        if token_stages and i not in c.dual_attention_layers:  # dual-attention blocks run whole in token steps
            specs.append(dataclasses.replace(kv_stage_spec(model, i), name=f"block_{i}"))
        else:
            specs.append(StageSpec(f"block_{i}", (img, txt, temb), outs, role="block", block=i))
    if token_stages:
        specs += [token_stage_spec(model, i) for i in range(c.num_layers) if i not in c.dual_attention_layers]
    if model.has_compensation:
        specs.append(StageSpec("compensate", (TensorSpec("delta_img", img.shape), TensorSpec("delta_txt", txt.shape)),
                               (TensorSpec("comp_img", img.shape), TensorSpec("comp_txt", txt.shape)), role="compensate"))
    specs.append(StageSpec("final", (img, temb, TensorSpec("latents", ("batch", c.out_channels, "height", "width"))),
                           (TensorSpec("velocity", ("batch", c.out_channels, "height", "width")),), role="final"))
    return specs


class _Stage(nn.Module):
    """Casts float32 inputs to the compute dtype and outputs back to float32."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def _in(self, *xs):
        return [x.to(self.dtype) for x in xs]

    @staticmethod
    def _out(*xs):
        return tuple(x.float() for x in xs)


class EmbedStage(_Stage):
    def __init__(self, model: DistilledSD3, dtype):
        super().__init__(dtype)
        self.model = model

    def forward(self, latents, timestep, pooled, text):
        return self._out(*self.model.embed(*self._in(latents, timestep, pooled, text)))


class BlockStage(_Stage):
    def __init__(self, block: nn.Module, dtype):
        super().__init__(dtype)
        self.block = block

    def forward(self, img, txt, temb):
        txt_out, img_out = self.block(*self._in(img, txt, temb))
        return self._out(img_out) if txt_out is None else self._out(img_out, txt_out)


class CompensateStage(_Stage):
    def __init__(self, model: DistilledSD3, dtype):
        super().__init__(dtype)
        self.hidden, self.encoder = model.delta_pred_hidden, model.delta_pred_encoder

    def forward(self, delta_img, delta_txt):
        delta_img, delta_txt = self._in(delta_img, delta_txt)
        return self._out(self.hidden(delta_img), self.encoder(delta_txt))


class FinalStage(_Stage):
    def __init__(self, model: DistilledSD3, dtype):
        super().__init__(dtype)
        self.model = model

    def forward(self, img, temb, latents):
        img, temb = self._in(img, temb)
        return self._out(self.model.final(img, temb, latents))


def example_inputs(model: DistilledSD3, batch: int = 2, height: int = 8, width: int = 6, text: int = 5, seed: int = 0):
    """Consistent float32 inputs for every stage, from running the PyTorch stages on random data."""
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


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def stage_module(model: DistilledSD3, spec: StageSpec, dtype, block: nn.Module | None = None) -> nn.Module:
    """The module a stage traces; `block` replaces the model's joint block (BlockGraphs' templates)."""
    from .token_block import KVBlockStage, TokenBlockStage

    if spec.role == "embed":
        return EmbedStage(model, dtype)
    if spec.role == "compensate":
        return CompensateStage(model, dtype)
    if spec.role == "final":
        return FinalStage(model, dtype)
    block = block if block is not None else model.transformer.transformer_blocks[spec.block]
    if spec.role == "block_tokens":
        return TokenBlockStage(block, dtype)
    if any(t.name == "img_k" for t in spec.outputs):
        return KVBlockStage(block, dtype)
    return BlockStage(block, dtype)


def stage_example_inputs(model: DistilledSD3, specs: list[StageSpec], **sizes) -> dict[str, tuple]:
    """Float32 example inputs of every stage in `specs` (sizes as example_inputs takes them)."""
    from .token_block import token_example_inputs

    args = {k: tuple(t.float() for t in v) for k, v in example_inputs(model, **sizes).items()}
    for spec in specs:
        if spec.role == "block_tokens":
            args[spec.name] = token_example_inputs(model, spec.block, model_dtype(model), **sizes)
    return args


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


def trace_stage(module: nn.Module, spec: StageSpec, args: tuple, patch: int = 1, max_patches: int = 1, dynamic_shapes=None):
    """torch.export + ONNX lowering of one stage (the token ops lowered to ai.slimengine); returns the
    ONNXProgram. `dynamic_shapes` defaults to the SD3 stages' dimensions."""
    from .token_block import ONNX_TRANSLATIONS

    with warnings.catch_warnings(), _quiet_logs():
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            module, args, dynamo=True, opset_version=OPSET, verbose=False,
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


def _block_kind(model: DistilledSD3, index: int) -> str:
    if index == model.num_layers - 1:
        return "last"
    return "dual" if index in model.config.dual_attention_layers else "plain"


class BlockGraphs:
    """One traced graph per block kind; `graph_for(i)` returns it carrying block i's weights.

    The template is traced from a copy with distinct random weights, so every weight initializer of
    the graph can be bound to the parameter it came from: by name, or by value when the optimiser
    folded a transpose into a new constant (MatMul weights). A graph with any initializer that
    cannot be bound is not reused."""

    def __init__(self, model: DistilledSD3, dtype: torch.dtype, args_of):
        self.model, self.dtype, self.args_of = model, dtype, args_of
        self.templates = {}  # (block kind, stage kind) -> (ONNXProgram, {initializer: (parameter, transposed)}) or None

    def _trace_template(self, spec: StageSpec):
        scrambled = copy.deepcopy(self.model.transformer.transformer_blocks[spec.block])
        with torch.no_grad():
            g = torch.Generator().manual_seed(1234)
            for p in scrambled.parameters():
                p.copy_((torch.randn(p.shape, generator=g) * 0.02 + 1.0).to(p.dtype))
        program = trace_stage(stage_module(self.model, spec, self.dtype, block=scrambled), spec, self.args_of(spec.name),
                              self.model.config.patch_size, self.model.config.pos_embed_max_size)
        params = {f"block.{k}": v.detach().cpu().float() for k, v in scrambled.state_dict().items()}
        candidates = [(n, False, v) for n, v in params.items()] + [(n, True, v.t()) for n, v in params.items() if v.ndim == 2]
        bindings = {}
        for iname, init in program.model.graph.initializers.items():
            if iname in params:
                bindings[iname] = (iname, False)
                continue
            value = torch.from_numpy(np.asarray(init.const_value.numpy(), dtype=np.float32))
            match = next(((n, t) for n, t, c in candidates if c.shape == value.shape and torch.equal(c, value)), None)
            # Shape constants, scalars and uniform fills (LayerNorm without affine): never a scrambled weight.
            if match is None and (value.numel() <= 64 or bool((value == value.flatten()[0]).all())):
                continue
            if match is None:
                return None
            bindings[iname] = match
        if {n for n, _ in bindings.values()} != set(params):
            return None
        return program, bindings

    def graph_for(self, spec: StageSpec):
        index = spec.block
        kind = (_block_kind(self.model, index), spec.role, len(spec.outputs))
        if kind not in self.templates:
            self.templates[kind] = self._trace_template(spec)
        if self.templates[kind] is None:
            return None
        program, bindings = self.templates[kind]
        import onnx_ir as ir

        params = {f"block.{k}": v.detach().cpu() for k, v in self.model.transformer.transformer_blocks[index].state_dict().items()}
        for iname, (pname, transposed) in bindings.items():
            tensor = params[pname].t().contiguous() if transposed else params[pname]
            program.model.graph.initializers[iname].const_value = ir.tensor(_to_numpy(tensor), name=iname)
        return program


def _to_numpy(tensor: torch.Tensor):
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def export_stages(model: DistilledSD3, directory: Path, precision: str, progress=None, token_stages: bool = False) -> list[StageSpec]:
    """Write every stage of `model` as stages/NAME.onnx (+ NAME.onnx.data) under `directory`."""
    dtype = DTYPES[precision]
    model = model.to(dtype)
    specs = stage_specs(model, token_stages)
    args = stage_example_inputs(model, specs)
    blocks = BlockGraphs(model, dtype, args.__getitem__)
    (directory / "stages").mkdir(parents=True, exist_ok=True)
    for spec in specs:
        program = None
        if spec.role in ("block", "block_tokens"):
            program = blocks.graph_for(spec)
        if program is None:
            program = trace_stage(stage_module(model, spec, dtype), spec, args[spec.name],
                                  model.config.patch_size, model.config.pos_embed_max_size)
        program.save(directory / spec.file, external_data=True)
        if progress is not None:
            progress(spec.name)
    return specs


def verify_stages(model: DistilledSD3, directory: Path, specs: list[StageSpec], precision: str) -> dict[str, float]:
    """Run every stage in ONNX Runtime on inputs of new shapes and return max |ORT - PyTorch| per stage."""
    import onnxruntime as ort

    dtype = DTYPES[precision]
    model = model.to(dtype)
    args = stage_example_inputs(model, specs, batch=3, height=5, width=7, text=9, seed=1)
    errors = {}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if any(t.dtype == "int64" for s in specs for t in s.inputs):
        from slimengine._native import ops_library_path

        options.register_custom_ops_library(str(ops_library_path()))
    for spec in specs:
        module = stage_module(model, spec, dtype)
        inputs = args[spec.name]
        with torch.no_grad():
            expected = module(*inputs)
        session = ort.InferenceSession(str(directory / spec.file), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)})
        errors[spec.name] = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))
    return errors
