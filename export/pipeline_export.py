"""SD3's text encoders and VAE decoder as bundle stages, from a diffusers pipeline folder (docs/pipeline.md).

Stages (roles):
- clip_l, clip_g (text_encoder/, text_encoder_2/: CLIPTextModelWithProjection): input_ids int64 [B, N] ->
  hidden_states [B, N, D], N the CLIP tokenizers' model_max_length (77 for SD3; clip_length) (the penultimate layer's, `hidden_states[-2]`, as diffusers' SD3 pipeline takes them) and
  pooled [B, P] (the projection's text_embeds).
- t5 (text_encoder_3/: T5EncoderModel): input_ids int64 [B, L], L up to max_sequence_length -> hidden_states [B, L, d_model].
- vae_decode (vae/: AutoencoderKL): latents [B, C, h, w] -> image [B, 3, 8h, 8w], AutoencoderKL.decode's output in
  [-1, 1] (unclamped). The scaling (latents / scaling_factor + shift_factor) before it is the runtime's, from the
  manifest's `pipeline` block.

Every stage keeps the float32 boundary of the transformer stages (int64 ids in). In fp16/bf16 bundles the fragile
nodes stay float32, through explicit casts (every ONNX node sees one dtype): in T5 the residual stream, the RMS norms,
the attention softmax and the feed-forward product and `wo` (t5_export.py; its weights are all stored in the bundle's
dtype); in the VAE the group norms.

T5 is never loaded whole: the stage is traced from a weightless skeleton and each weight is read from
text_encoder_3/'s safetensors as it is written (t5_export.py), so a T5-XXL exports within a few GiB of memory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .bundle import refuse_special_files
from .errors import CheckpointError
from .lowering import DTYPES, StageModule, trace_stage
from .stage_spec import StageSpec, TensorSpec
from .t5_export import T5EncoderStage, T5Source, all_finite, export_t5_stage, module_weights, stored_shapes

DEFAULT_CLIP_LENGTH = 77  # SD3's CLIP tokenizers' model_max_length (diffusers' tokenizer_max_length when it has none)
# role -> (folder, what it is, the class diffusers' SD3 pipeline loads)
COMPONENTS = {
    "clip_l": ("text_encoder", "CLIP-L text encoder", "CLIPTextModelWithProjection"),
    "clip_g": ("text_encoder_2", "CLIP-G text encoder", "CLIPTextModelWithProjection"),
    "t5": ("text_encoder_3", "T5 text encoder", "T5EncoderModel"),
    "vae_decode": ("vae", "VAE", "AutoencoderKL"),
}
TOKENIZERS = {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5": "tokenizer_3"}
MAX_LATENT = 1024  # latent height/width limit of the VAE stage's dynamic dimensions (8192 pixels)
# role -> the config fields that count layers, each with the weight-key pattern whose indices are those layers: the
# config must claim the layers its weights hold, checked on the key names before a module is built (a config of 10^7
# layers is otherwise built first, for minutes).
LAYERS = {
    "clip_l": (("num_hidden_layers", r"text_model\.encoder\.layers\.(\d+)\."),),
    "clip_g": (("num_hidden_layers", r"text_model\.encoder\.layers\.(\d+)\."),),
    "t5": (("num_layers", r"encoder\.block\.(\d+)\."),),
    "vae_decode": (("block_out_channels", r"encoder\.down_blocks\.(\d+)\."), ("layers_per_block", r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
}
# The manifest's pipeline numbers as the runtime's open checks them (runtime/src/manifest.cpp, the pipeline block):
# the integers' ranges (clip_length from 2: a tokenizer's max_length, bos and eos); scaling_factor and shift_factor are
# check_pipeline_number's. What depends on the transformer is check_against_transformer's.
RANGES = {"clip_length": (2, 4096), "clip_l_dim": (1, 1 << 20), "clip_g_dim": (1, 1 << 20), "clip_l_pooled_dim": (1, 1 << 20),
          "clip_g_pooled_dim": (1, 1 << 20), "latent_channels": (1, 1 << 16), "scale_factor": (1, 64)}


def is_pipeline_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


class ComponentRoles:
    """The stage and tokenizer roles an export of encoders and VAE writes: T5's only when `t5` (PipelineFolder,
    single_file.SingleFile)."""

    t5: bool

    def roles(self) -> list[str]:
        return [r for r in COMPONENTS if r != "t5" or self.t5]

    def tokenizer_roles(self) -> tuple[str, ...]:
        return tuple(r for r in TOKENIZERS if r != "t5" or self.t5)


@dataclasses.dataclass(frozen=True)
class PipelineFolder(ComponentRoles):
    path: Path
    t5: bool  # export the T5 stage (and its tokenizer)
    shift: float | None  # scheduler/scheduler_config.json's shift, when present
    clip_length: int = DEFAULT_CLIP_LENGTH  # CLIP tokens: the CLIP tokenizers' model_max_length (clip_length)

    def load(self) -> dict[str, nn.Module]:
        return load_components(self)


def open_pipeline(path: Path, t5: bool = True, transformer: bool = False) -> PipelineFolder:
    """Check a diffusers SD3 pipeline folder has every component the export needs; raise CheckpointError with one
    line naming what is missing. `transformer`: its transformer/ is needed too (the whole-folder export)."""
    path = Path(path)
    if not is_pipeline_folder(path):
        raise CheckpointError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}/model_index.json: cannot read it ({e})") from None
    needed = [(folder, what) for role, (folder, what, _) in COMPONENTS.items() if role != "t5" or t5]
    needed += [(folder, f"{role} tokenizer") for role, folder in TOKENIZERS.items() if role != "t5" or t5]
    if transformer:
        needed.insert(0, ("transformer", "SD3 transformer"))
    missing = []
    for folder, what in needed:
        listed = index.get(folder)
        present = (path / folder).is_dir() and any((path / folder).iterdir())
        if not present or (isinstance(listed, list) and None in listed):
            missing.append(f"{folder}/ ({what})")
    if missing:
        hint = "; pass --no-t5 to export without T5" if t5 and all("text_encoder_3" in m or "tokenizer_3" in m for m in missing) else ""
        raise CheckpointError(f"{path}: pipeline folder is missing {', '.join(missing)}{hint}")
    for folder, _ in needed:
        refuse_special_files(path / folder)
    roles = [r for r in COMPONENTS if r != "t5" or t5]
    configs = {role: component_config(path / COMPONENTS[role][0], role) for role in roles}
    length = clip_length(path)
    check_pipeline_numbers(path, configs)
    if t5:
        from .tokenizer_export import check_t5_tokenizer

        check_t5_tokenizer(path / TOKENIZERS["t5"])
    shift = None
    scheduler = path / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        try:
            shift = json.loads(scheduler.read_text()).get("shift")
        except ValueError as e:
            raise CheckpointError(f"{scheduler}: not valid JSON ({e})") from None
        if shift is not None and not (isinstance(shift, (int, float)) and not isinstance(shift, bool) and shift > 0):
            raise CheckpointError(f"{scheduler}: shift must be a positive number, got {shift!r}")
    return PipelineFolder(path=path, t5=t5, shift=None if shift is None else float(shift), clip_length=length)


def clip_length(path: Path) -> int:
    """The CLIP token count of a pipeline folder: its CLIP tokenizers' model_max_length, as diffusers' SD3 pipeline takes
    it (tokenizer_max_length). SD3 joins the CLIP-L and CLIP-G hidden states token by token, so both must agree."""
    from .tokenizer_export import clip_max_length

    lengths = {folder: clip_max_length(path / folder) for folder in (TOKENIZERS["clip_l"], TOKENIZERS["clip_g"])}
    for folder, length in lengths.items():
        check_pipeline_number("clip_length", length, f"{path}/{folder}/tokenizer_config.json: model_max_length")
    if len(set(lengths.values())) != 1:
        raise CheckpointError(f"{path}: the CLIP tokenizers disagree on their length (model_max_length: "
                              f"{', '.join(f'{f}/ {n}' for f, n in lengths.items())}); SD3 joins CLIP-L's and CLIP-G's tokens "
                              "one to one: set the same model_max_length in both tokenizer_config.json")
    return lengths[TOKENIZERS["clip_l"]]


def component_config(folder: Path, role: str):
    """The config of a pipeline folder's component (transformers' config class; the VAE's config.json over
    AutoencoderKL's defaults), whose layer counts are checked against the weights present (LAYERS) before any module
    is built; one line naming config.json and the field otherwise."""
    import re

    what, cls = COMPONENTS[role][1], COMPONENTS[role][2]
    try:
        if role == "vae_decode":
            import inspect
            import types

            from diffusers import AutoencoderKL

            defaults = {k: p.default for k, p in inspect.signature(AutoencoderKL.__init__).parameters.items()
                        if p.default is not inspect.Parameter.empty}
            config = types.SimpleNamespace(**{**defaults, **AutoencoderKL.load_config(str(folder))})
        else:
            from transformers import CLIPTextConfig, T5Config

            config = (T5Config if role == "t5" else CLIPTextConfig).from_pretrained(str(folder))
    except Exception as e:  # no or an unreadable config.json: one line
        text = str(e).strip().splitlines()
        raise CheckpointError(f"{folder}/config.json: cannot read the {what}'s config as {cls}'s ({type(e).__name__}: "
                              f"{text[0] if text else ''})") from None
    keys = list(stored_shapes(folder))
    for field, pattern in LAYERS[role]:
        value = getattr(config, field)
        claimed = len(value) if isinstance(value, (list, tuple)) else value  # block_out_channels: one width per block
        held = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
        if claimed != len(held):
            shown = pattern.replace("\\.", ".").replace("(\\d+)", "N").rstrip(".")
            raise CheckpointError(f"{folder}/config.json: {field} {value!r} does not match the {what}'s weights, which hold "
                                  f"{len(held)} ({shown})")
    return config


def check_pipeline_numbers(path: Path, configs: dict) -> None:
    """The pipeline block's numbers that come from the components' configs, each checked by check_pipeline_number."""
    vae, folder = configs["vae_decode"], f"{path}/vae/config.json"
    numbers = [("latent_channels", vae.latent_channels, f"{folder}: latent_channels"),
               ("scale_factor", 2 ** (len(vae.block_out_channels) - 1), f"{folder}: block_out_channels' scale factor"),
               ("scaling_factor", vae.scaling_factor, f"{folder}: scaling_factor")]
    if vae.shift_factor is not None:  # none: no shift (diffusers), 0 in the manifest
        numbers.append(("shift_factor", vae.shift_factor, f"{folder}: shift_factor"))
    for role in ("clip_l", "clip_g"):
        config, folder = configs[role], f"{path}/{COMPONENTS[role][0]}/config.json"
        numbers += [(f"{role}_dim", config.hidden_size, f"{folder}: hidden_size"),
                    (f"{role}_pooled_dim", config.projection_dim, f"{folder}: projection_dim")]
    for field, value, source in numbers:
        check_pipeline_number(field, value, source)


def check_pipeline_number(field: str, value, source: str) -> None:
    """One number of the manifest's pipeline block as the runtime's open checks it (runtime/src/manifest.cpp): the
    integers' RANGES, scaling_factor a normal float32 (the latents are divided by it in float32: 0 or a denormal gives
    inf or NaN), shift_factor a finite float32. Refused here, one line naming `source` (the file and its field), before
    any work, rather than exported into a bundle that open refuses."""
    if field in RANGES:
        low, high = RANGES[field]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise CheckpointError(f"{source} {value!r} is not an integer from {low} to {high} (the bundle's pipeline.{field})")
        return
    with np.errstate(over="ignore"):  # a float beyond float32's range becomes inf, refused below
        as32 = float(np.float32(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")
    if field == "scaling_factor" and not (np.isfinite(as32) and abs(as32) >= np.finfo(np.float32).tiny):
        raise CheckpointError(f"{source} {value!r} is not a finite, nonzero and normal float32 number")
    if field == "shift_factor" and not np.isfinite(as32):
        raise CheckpointError(f"{source} {value!r} is not a finite float32 number")


def load_components(pipeline: PipelineFolder) -> dict[str, nn.Module]:
    """The pipeline's CLIP encoders and VAE in float32, eval mode (weights read from safetensors by from_pretrained), and
    T5 as a T5Source: its config, its weights read one at a time when the stage is written."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection

    classes = {"clip_l": CLIPTextModelWithProjection, "clip_g": CLIPTextModelWithProjection, "vae_decode": AutoencoderKL}
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the CLI has its own progress bar
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    modules = {}
    for role in pipeline.roles():
        folder = pipeline.path / COMPONENTS[role][0]
        try:
            if role == "t5":  # read lazily, one weight at a time (t5_export.py): a T5-XXL is 19 GB in float32
                modules[role] = T5Source(folder)
            else:
                modules[role], info = classes[role].from_pretrained(str(folder), torch_dtype=torch.float32, output_loading_info=True)
                modules[role].eval()
        except Exception as e:  # a folder diffusers/transformers cannot load: one line
            text = str(e).strip().splitlines()
            raise CheckpointError(f"{folder}: cannot load the {COMPONENTS[role][1]} as {COMPONENTS[role][2]} "
                                  f"({type(e).__name__}: {text[0] if text else ''})") from None
        if role != "t5":  # T5's keys are checked by T5Source, its values as they are streamed (t5_export.export_t5_stage)
            missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
            if missing:  # initialised at random by the loader
                raise CheckpointError(f"{folder}: the {COMPONENTS[role][1]} is missing {len(missing)} weights its config implies, "
                                      f"e.g. {', '.join(missing[:3])}")
            if unexpected:  # dropped by the loader
                raise CheckpointError(f"{folder}: the {COMPONENTS[role][1]} has {len(unexpected)} unexpected weights its config has "
                                      f"no place for, e.g. {', '.join(unexpected[:3])}")
            check_finite_weights(modules[role], f"{folder}: the {COMPONENTS[role][1]}")
    return modules


def check_finite_weights(module: nn.Module, what: str) -> None:
    """Refuses NaN or Inf weights: an encoder with them makes NaN conditioning, a VAE NaN (then black) images."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if not all_finite(tensor):
            raise CheckpointError(f"{what}'s weight '{name}' contains NaN or Inf")


def check_against_transformer(modules: dict, config, pipeline: PipelineFolder) -> None:
    """The encoders' widths and the VAE's channels must be what the transformer takes. CLIP-L + CLIP-G may be wider
    than joint_attention_dim: diffusers' encode_prompt pads their concatenation to it with F.pad, which truncates then,
    and the runtime keeps the first joint_attention_dim features as well (docs/pipeline.md, Conditioning)."""
    p = pipeline.path
    pooled = sum(modules[r].config.projection_dim for r in ("clip_l", "clip_g"))
    if pooled != config.pooled_projection_dim:
        raise CheckpointError(f"{p}: CLIP-L and CLIP-G project to {pooled} pooled features in all, the transformer takes "
                              f"pooled_projection_dim {config.pooled_projection_dim}")
    if "t5" in modules and modules["t5"].config.d_model != config.joint_attention_dim:
        raise CheckpointError(f"{p}: T5's d_model {modules['t5'].config.d_model} is not the transformer's joint_attention_dim "
                              f"{config.joint_attention_dim}")
    for role in ("clip_l", "clip_g"):
        positions = modules[role].config.max_position_embeddings
        if pipeline.clip_length > positions:
            raise CheckpointError(f"{p}: the CLIP tokenizers give {pipeline.clip_length} tokens, the {COMPONENTS[role][1]} has "
                                  f"{positions} positions (max_position_embeddings)")
    if modules["vae_decode"].config.latent_channels != config.in_channels:
        raise CheckpointError(f"{p}: the VAE has {modules['vae_decode'].config.latent_channels} latent channels, the transformer "
                              f"{config.in_channels}")


# --- stage modules -------------------------------------------------------------------------------


class ClipStage(StageModule):
    """input_ids -> (penultimate hidden states, pooled text_embeds), as diffusers' _get_clip_prompt_embeds (clip_skip None)."""

    def __init__(self, encoder: nn.Module, dtype):
        super().__init__(dtype)
        self.encoder = encoder

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=True)
        return self._out(out.hidden_states[-2], out.text_embeds)


class VaeDecodeStage(StageModule):
    """latents (already scaled: latents / scaling_factor + shift_factor) -> image, AutoencoderKL.decode's sample."""

    def __init__(self, vae: nn.Module, dtype):
        super().__init__(dtype)
        self.vae = vae

    def forward(self, latents):
        return self._out(self.vae.decode(*self._in(latents), return_dict=False)[0])


class _Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 in a half-precision VAE (its statistics over large maps lose precision in fp16)."""

    def forward(self, x):
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def to_precision(role: str, module: nn.Module, precision: str) -> nn.Module:
    """The module in the bundle's precision, with its fragile nodes kept float32 (module docstring)."""
    dtype = DTYPES[precision]
    module = module.to(dtype)  # T5: every weight; T5EncoderStage computes its fragile nodes in float32
    if role == "vae_decode":
        for sub in module.modules():
            if type(sub) is nn.GroupNorm:
                sub.float()
                sub.__class__ = _Fp32GroupNorm
    return module


def stage_module(role: str, module: nn.Module, precision: str) -> nn.Module:
    dtype = DTYPES[precision]
    if role in ("clip_l", "clip_g"):
        return ClipStage(module, dtype)
    if role == "t5":
        return T5EncoderStage(module, dtype)
    return VaeDecodeStage(module, dtype)


# --- specs, example inputs, export ---------------------------------------------------------------


def t5_spec(config) -> StageSpec:
    return StageSpec("t5", (TensorSpec("input_ids", ("batch", "text"), "int64"),),
                     (TensorSpec("hidden_states", ("batch", "text", config.d_model)),), role="t5")


def stage_specs(modules: dict, max_sequence_length: int, clip_length: int) -> list[StageSpec]:
    specs = []
    for role in ("clip_l", "clip_g"):
        c = modules[role].config
        specs.append(StageSpec(role, (TensorSpec("input_ids", ("batch", clip_length), "int64"),),
                               (TensorSpec("hidden_states", ("batch", clip_length, c.hidden_size)),
                                TensorSpec("pooled", ("batch", c.projection_dim))), role=role))
    if "t5" in modules:
        specs.append(t5_spec(modules["t5"].config))
    c = modules["vae_decode"].config
    specs.append(StageSpec("vae_decode", (TensorSpec("latents", ("batch", c.latent_channels, "height", "width")),),
                           (TensorSpec("image", ("batch", c.out_channels, "image_height", "image_width")),), role="vae_decode"))
    return specs


def example_input(role: str, module: nn.Module, clip_length: int, batch: int = 2, text: int = 7, height: int = 6, width: int = 4,
                  seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if role in ("clip_l", "clip_g", "t5"):
        vocab = module.config.vocab_size
        return torch.randint(0, vocab, (batch, clip_length if role != "t5" else text), generator=g)
    return torch.randn(batch, module.config.latent_channels, height, width, generator=g)


def _dynamic_shapes(role: str, max_sequence_length: int):
    batch = torch.export.Dim("batch", min=1, max=4096)
    if role in ("clip_l", "clip_g"):
        return ({0: batch},)
    if role == "t5":
        return ({0: batch, 1: torch.export.Dim("text", min=1, max=max_sequence_length)},)
    return ({0: batch, 2: torch.export.Dim("height", min=1, max=MAX_LATENT), 3: torch.export.Dim("width", min=1, max=MAX_LATENT)},)


def export_pipeline_stages(modules: dict, directory: Path, precision: str, max_sequence_length: int, clip_length: int,
                           progress=None) -> list[StageSpec]:
    """Write stages/ROLE.onnx (+ .data) for each encoder and the VAE decoder; returns their specs."""
    specs = stage_specs(modules, max_sequence_length, clip_length)
    (directory / "stages").mkdir(parents=True, exist_ok=True)
    for spec in specs:
        if spec.role == "t5":
            t5 = modules["t5"]  # a folder's T5Source (streamed), or the module a single file was loaded into
            weights = t5.weights() if isinstance(t5, T5Source) else module_weights(t5)
            export_t5(t5.config, weights, directory / spec.file, precision, max_sequence_length)
            if progress is not None:
                progress(spec.name)
            continue
        module = to_precision(spec.role, modules[spec.role], precision)
        program = trace_stage(stage_module(spec.role, module, precision), spec, (example_input(spec.role, module, clip_length),),
                              dynamic_shapes=_dynamic_shapes(spec.role, max_sequence_length))
        program.save(directory / spec.file, external_data=True)
        if progress is not None:
            progress(spec.name)
    return specs


def export_t5(config, weights, path: Path, precision: str, max_sequence_length: int) -> StageSpec:
    """Write the t5 stage of a T5 encoder of `config` to `path` (+ .data), streamed: traced without weights, each weight
    read from `weights` (a T5EncoderModel key -> tensor) as it is written (t5_export.py)."""
    spec = t5_spec(config)
    export_t5_stage(config, weights, Path(path), spec, DTYPES[precision], _dynamic_shapes("t5", max_sequence_length))
    return spec


def verify_pipeline_stages(modules: dict, directory: Path, specs: list[StageSpec], precision: str, clip_length: int) -> dict[str, float]:
    """max |ORT - PyTorch| per stage, on inputs of shapes other than the traced ones."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    errors = {}
    for spec in specs:
        module = modules[spec.role]
        if isinstance(module, T5Source):  # a folder's T5: loaded whole, for the check
            module = module.load()
        module = to_precision(spec.role, module, precision)
        x = example_input(spec.role, module, clip_length, batch=3, text=11, height=5, width=7, seed=1)
        with torch.no_grad():
            expected = stage_module(spec.role, module, precision)(x)
        session = ort.InferenceSession(str(directory / spec.file), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {"input_ids" if x.dtype == torch.int64 else "latents": x.numpy()})
        errors[spec.name] = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))
    return errors


def pipeline_manifest(modules: dict, pipeline: PipelineFolder, config, max_sequence_length: int) -> dict:
    """The manifest's `pipeline` block: what the runtime needs to assemble SD3's conditioning and decode (docs/pipeline.md)."""
    vae = modules["vae_decode"].config
    shift_factor = getattr(vae, "shift_factor", None)
    return {
        "source": str(pipeline.path),
        "clip_length": pipeline.clip_length,
        "clip_l_dim": modules["clip_l"].config.hidden_size,
        "clip_g_dim": modules["clip_g"].config.hidden_size,
        "clip_l_pooled_dim": modules["clip_l"].config.projection_dim,
        "clip_g_pooled_dim": modules["clip_g"].config.projection_dim,
        "joint_attention_dim": config.joint_attention_dim,
        "pooled_projection_dim": config.pooled_projection_dim,
        "t5": "t5" in modules,
        "max_sequence_length": max_sequence_length,
        "vae": {"latent_channels": vae.latent_channels, "scale_factor": 2 ** (len(vae.block_out_channels) - 1),
                "scaling_factor": float(vae.scaling_factor), "shift_factor": float(shift_factor or 0.0)},
        "scheduler_shift": pipeline.shift,
    }
