"""The T5 encoder stage: mixed precision, and a streamed export that never holds the whole model.

Mixed precision. T5 in fp16 overflows (its feed-forward outputs and the residual stream exceed 65504; transformers
keeps `wo` in float32 and clamps the hidden states). The stage computes in the bundle's dtype only where values are
bounded, with explicit casts so that every ONNX node sees one dtype:
- bundle dtype (fp16/bf16): the embedding lookup, the q/k/v/o projections, wi (wi_0, wi_1) and the attention's
  weighted sum of values;
- float32: the residual stream, every RMS norm (variance and scale), the attention scores + position bias + softmax,
  the feed-forward activation and gate product, and `wo` (its fp16-stored weight cast to float32 in the graph).
All weights are stored in the bundle's dtype (so the stage's weights are half the float32 size). With float32 the same
module computes exactly what transformers' T5EncoderModel does.

Streamed export (`export_t5_stage`). The stage is traced from a skeleton whose parameters are zero-stride tensors (one
element each, whatever their shape), so the trace holds no weights; each ONNX initializer is then bound, by its
parameter name, to a lazy tensor that reads (or generates) that one weight when the external data file is written.
Peak memory is the trace plus the largest single weight, not the model: a T5-XXL-sized encoder (4.76 B parameters)
exports with a peak RSS of 1.5 GiB in fp16 or float32 (benchmarks/bench_export_memory.py; docs/pipeline.md).
The trace is unoptimized (trace_t5_stage says why); ONNX Runtime optimizes the graph when it loads it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .lowering import StageModule, trace_stage
from .stage_spec import StageSpec

TIED = {"encoder.embed_tokens.weight": "shared.weight"}  # the encoder's embedding is the shared one
WeightSource = Callable[[str], torch.Tensor]  # transformers' T5EncoderModel key ("shared.weight", ...) -> tensor


def _rms(h: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """T5LayerNorm in float32 (h is float32): the variance of large activations overflows fp16."""
    variance = h.pow(2).mean(-1, keepdim=True)
    return norm.weight.float() * (h * torch.rsqrt(variance + norm.variance_epsilon))


class T5EncoderStage(StageModule):
    """input_ids -> last hidden states of a transformers T5EncoderModel (as diffusers' _get_t5_prompt_embeds, no
    attention mask), in the mixed precision of the module docstring. Reads the model's submodules' weights; does not
    call their forwards (whose dtype handling differs between fp16 and fp32)."""

    def __init__(self, t5: nn.Module, dtype: torch.dtype):
        super().__init__(dtype)
        self.t5 = t5

    def forward(self, input_ids):
        stack = self.t5.encoder
        h = self.t5.shared(input_ids).float()
        length = input_ids.shape[1]
        bias = stack.block[0].layer[0].SelfAttention.compute_bias(length, length).float()  # [1, heads, L, L]
        for block in stack.block:
            attention, ff = block.layer[0], block.layer[-1]
            h = h + self._attention(attention.SelfAttention, _rms(h, attention.layer_norm).to(self.dtype), bias)
            h = h + self._feed_forward(ff.DenseReluDense, _rms(h, ff.layer_norm).to(self.dtype))
        return self._out(_rms(h, stack.final_layer_norm))

    def _attention(self, a: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, length = x.shape[0], x.shape[1]

        def heads(t):
            return t.view(batch, length, a.n_heads, a.key_value_proj_dim).transpose(1, 2)

        q, k, v = heads(a.q(x)), heads(a.k(x)), heads(a.v(x))
        scores = torch.matmul(q.float(), k.float().transpose(2, 3)) + bias  # T5 does not scale the scores
        weights = torch.softmax(scores, dim=-1).to(self.dtype)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, length, a.inner_dim)
        return a.o(out).float()

    def _feed_forward(self, d: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if hasattr(d, "wi_0"):  # gated-gelu (T5 v1.1, T5-XXL)
            hidden = d.act(d.wi_0(x).float()) * d.wi_1(x).float()
        else:
            hidden = d.act(d.wi(x).float())
        return nn.functional.linear(hidden, d.wo.weight.float())


# --- streamed export -----------------------------------------------------------------------------


def skeleton(config, dtype: torch.dtype) -> nn.Module:
    """A T5EncoderModel of `config` whose parameters are zero-stride tensors of `dtype`: the right shapes for a trace,
    one element of memory each."""
    from transformers import T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(config)
    model.encoder.embed_tokens = model.shared  # tied; the stage reads `shared`
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(torch.zeros((), dtype=dtype).expand(p.shape), requires_grad=False)
    return model.eval()


def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """transformers' T5EncoderModel keys -> shapes, from the config alone (the meta device: no memory)."""
    from transformers import T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in TIED}


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def trace_t5_stage(config, spec: StageSpec, dtype: torch.dtype, dynamic_shapes, text: int = 7):
    """The T5 stage traced from a skeleton (no weights); returns (ONNXProgram, {initializer name: T5 key})."""
    stage = T5EncoderStage(skeleton(config, dtype), dtype)
    ids = torch.randint(0, config.vocab_size, (2, text), generator=torch.Generator().manual_seed(0))
    # optimize=False: the optimizer folds small weights into new constants (a transposed MatMul weight), computed
    # from the skeleton's zeros; unoptimized, every weight stays an initializer named by its parameter.
    program = trace_stage(stage, spec, (ids,), dynamic_shapes=dynamic_shapes, optimize=False)
    params = {name.removeprefix("t5.") for name, _ in stage.named_parameters(remove_duplicate=False)}
    bindings = {}
    for name, init in program.model.graph.initializers.items():
        key = TIED.get(name.removeprefix("t5."), name.removeprefix("t5."))
        if key in params:
            bindings[name] = key
        elif init.const_value is not None and init.const_value.size > 64:
            raise RuntimeError(f"T5 stage: initializer {name} ({init.const_value.size} values) is not a parameter: "
                               "the streamed export cannot bind it to a weight")
    missing = params - set(TIED) - set(bindings.values())
    if missing:
        raise RuntimeError(f"T5 stage: parameters with no initializer in the graph: {sorted(missing)[:3]}")
    return program, bindings


def export_t5_stage(config, weights: WeightSource, path: Path, spec: StageSpec, dtype: torch.dtype, dynamic_shapes) -> None:
    """Write the T5 stage to `path` (+ `path`.data): traced without weights, each weight read from `weights` (a
    transformers T5EncoderModel key -> tensor of any float dtype) as it is written, then dropped."""
    import onnx_ir as ir

    program, bindings = trace_t5_stage(config, spec, dtype, dynamic_shapes)
    shapes = parameter_shapes(config)
    for name, key in bindings.items():
        value = program.model.graph.initializers[name]

        def load(key=key, name=name):
            tensor = weights(key)
            if tuple(tensor.shape) != shapes[key]:
                raise ValueError(f"T5 weight {key} has shape {list(tensor.shape)}, the config implies {list(shapes[key])}")
            if not all_finite(tensor):  # NaN conditioning otherwise
                raise ValueError(f"T5 weight {key} contains NaN or Inf")
            return ir.tensor(_to_numpy(tensor.to(dtype).contiguous()), name=name)

        value.const_value = ir.LazyTensor(load, dtype=value.const_value.dtype, shape=value.const_value.shape)
    program.save(path, external_data=True)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf, checked 4 Mi elements at a time: the check adds 4 MB to the streamed export's peak, not a
    boolean copy of the embedding."""
    if not tensor.is_floating_point():
        return True
    return all(bool(torch.isfinite(chunk).all()) for chunk in tensor.reshape(-1).split(1 << 22))


def module_weights(module: nn.Module) -> WeightSource:
    """The weights of a loaded transformers T5EncoderModel."""
    state = module.state_dict()
    return state.__getitem__


def safetensors_weights(folder: Path) -> WeightSource:
    """The weights of a T5EncoderModel saved by save_pretrained (one or several .safetensors files), read one tensor at
    a time (memory-mapped): the model is never loaded whole."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    where = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            where.update({k: f for k in handle.keys()})

    def read(key: str) -> torch.Tensor:
        if key not in where and key == "shared.weight":  # some checkpoints store only the tied encoder copy
            key = "encoder.embed_tokens.weight"
        if key not in where:
            raise KeyError(f"{folder}: no tensor {key} in its safetensors files")
        with safe_open(str(where[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    return read


def stored_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the weights a saved model folder holds, from its .safetensors headers (no tensor is read; every
    file, so a sharded or variant save counts whole), else from its PyTorch .bin files (memory-mapped)."""
    from safetensors import safe_open

    shapes = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            shapes.update({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})
    if not files:
        for f in sorted(Path(folder).glob("*.bin")):
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            shapes.update({k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)})
    return shapes


def random_weights(config, seed: int = 0) -> WeightSource:
    """Random weights of `config` generated per tensor on demand (deterministic per key), at transformers' init scales:
    a T5-XXL-sized source without 19 GB of memory."""
    d, kv, heads, ff = config.d_model, config.d_kv, config.num_heads, config.d_ff
    shapes = parameter_shapes(config)

    def generate(key: str) -> torch.Tensor:
        shape = shapes[key]
        if "layer_norm" in key:
            return torch.ones(shape)
        std = {"q": (d * kv) ** -0.5, "k": d ** -0.5, "v": d ** -0.5, "o": (heads * kv) ** -0.5, "wi": d ** -0.5,
               "wi_0": d ** -0.5, "wi_1": d ** -0.5, "wo": ff ** -0.5}.get(key.split(".")[-2], 1.0)
        g = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(key.encode()))
        return torch.randn(shape, generator=g) * std

    return generate


class T5Source:
    """A saved T5EncoderModel folder (text_encoder_3/), read lazily: its config now, its weights one tensor at a time
    from its .safetensors files (a folder with only PyTorch .bin weights is loaded whole)."""

    def __init__(self, folder: Path):
        from transformers import T5Config

        self.folder = Path(folder)
        self.config = T5Config.from_pretrained(str(folder))
        self.config._attn_implementation = "eager"
        self._module = None
        stored = stored_shapes(self.folder)
        if "shared.weight" not in stored and "encoder.embed_tokens.weight" in stored:
            stored["shared.weight"] = stored["encoder.embed_tokens.weight"]
        expected = parameter_shapes(self.config)
        missing = sorted(set(expected) - set(stored))
        unexpected = sorted(set(stored) - set(expected) - set(TIED))
        if missing:  # transformers would initialise them at random
            raise ValueError(f"missing {len(missing)} weights its config implies, e.g. {', '.join(missing[:3])}")
        if unexpected:  # transformers would drop them
            raise ValueError(f"{len(unexpected)} unexpected weights its config has no place for, e.g. {', '.join(unexpected[:3])}")
        for key, shape in expected.items():
            if stored[key] != shape:
                raise ValueError(f"{key} has shape {list(stored[key])}, its config implies {list(shape)}")
        if not any(self.folder.glob("*.safetensors")):  # PyTorch .bin weights only: loaded whole
            self._module = self.load()

    def weights(self) -> WeightSource:
        return module_weights(self._module) if self._module is not None else safetensors_weights(self.folder)

    def load(self) -> nn.Module:
        """The whole model in float32 (for --verify; a T5-XXL takes 19 GB)."""
        from transformers import T5EncoderModel

        if self._module is not None:
            return self._module
        return T5EncoderModel.from_pretrained(str(self.folder), torch_dtype=torch.float32, attn_implementation="eager").eval()
