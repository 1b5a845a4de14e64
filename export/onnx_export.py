"""The SD3 stages as torch modules, and writing and checking them as ONNX files.

Joint blocks share one graph structure (per kind: plain, dual-attention, last), so each kind is
traced once, from a copy with distinct random weights, and every block's own weights are swapped
into that graph by parameter name: tracing a 24-block model 24 times would dominate export time.

Which stages a bundle has is stage_spec.py's; how one stage is traced and lowered is lowering.py's;
the X-Slim token stages' modules are token_block.py's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .lowering import DTYPES, StageModule, example_inputs, model_dtype, trace_stage
from .sd3_model import DistilledSD3
from .stage_spec import StageSpec, stage_specs
from .token_block import KVBlockStage, TokenBlockStage, token_example_inputs


class EmbedStage(StageModule):
    def __init__(self, model: DistilledSD3, dtype):
        super().__init__(dtype)
        self.model = model

    def forward(self, latents, timestep, pooled, text):
        return self._out(*self.model.embed(*self._in(latents, timestep, pooled, text)))


class BlockStage(StageModule):
    def __init__(self, block: nn.Module, dtype):
        super().__init__(dtype)
        self.block = block

    def forward(self, img, txt, temb):
        txt_out, img_out = self.block(*self._in(img, txt, temb))
        return self._out(img_out) if txt_out is None else self._out(img_out, txt_out)


class CompensateStage(StageModule):
    def __init__(self, model: DistilledSD3, dtype):
        super().__init__(dtype)
        self.hidden, self.encoder = model.delta_pred_hidden, model.delta_pred_encoder

    def forward(self, delta_img, delta_txt):
        delta_img, delta_txt = self._in(delta_img, delta_txt)
        return self._out(self.hidden(delta_img), self.encoder(delta_txt))


class FinalStage(StageModule):
    def __init__(self, model: DistilledSD3, dtype):
        super().__init__(dtype)
        self.model = model

    def forward(self, img, temb, latents):
        img, temb = self._in(img, temb)
        return self._out(self.model.final(img, temb, latents))


def stage_module(model: DistilledSD3, spec: StageSpec, dtype, block: nn.Module | None = None) -> nn.Module:
    """The module a stage traces; `block` replaces the model's joint block (BlockGraphs' templates)."""
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
    args = {k: tuple(t.float() for t in v) for k, v in example_inputs(model, **sizes).items()}
    for spec in specs:
        if spec.role == "block_tokens":
            args[spec.name] = token_example_inputs(model, spec.block, model_dtype(model), **sizes)
    return args


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
