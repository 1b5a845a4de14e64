"""SD3 single-file checkpoints that carry the text encoders and the VAE beside the transformer (docs/pipeline.md).

The layout of Stability's sd3_medium_incl_clips*.safetensors, as diffusers' loaders/single_file_utils.py reads it:

- `model.diffusion_model.*`: the MMDiT transformer (export/checkpoint.py reads it; it skips the prefixes below);
- `text_encoders.clip_l.transformer.*`, `text_encoders.clip_g.transformer.*`: transformers' CLIPTextModelWithProjection
  keys (`text_model.*`, `text_projection.weight`);
- `text_encoders.t5xxl.transformer.*`: transformers' T5EncoderModel keys (`shared.weight`, `encoder.*`);
- `first_stage_model.*`: the VAE in the original LDM naming (`encoder.down.0.block.0...`).

The encoders and the VAE are converted with diffusers' own single-file converters (convert_ldm_clip_checkpoint,
convert_sd3_t5_checkpoint_to_diffusers, convert_ldm_vae_checkpoint) into modules whose configuration is built here from
the weights' shapes: diffusers' from_single_file would fetch the configs from the Hub. What the shapes cannot show comes
from the SD3 configuration of that component (DEFAULTS), or from the file's `slimengine` metadata, entry `components`.
A single file has no tokenizers: they come from `--tokenizers FOLDER`.

Tensors are read role by role and converted to float32 one tensor at a time into modules built without weights, so
the export holds one float32 copy of each component, not two.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError
from .pipeline_export import DEFAULT_CLIP_LENGTH, TOKENIZERS, ComponentRoles, check_pipeline_number, clip_length
from .tokenizer_export import check_t5_tokenizer

# role -> the prefix of its keys in the file
PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
            "t5": "text_encoders.t5xxl.transformer.", "vae_decode": "first_stage_model."}
NAMES = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5": "T5", "vae_decode": "VAE"}
# What the weights cannot tell, from SD3's configs (stabilityai/stable-diffusion-3-medium-diffusers): attention heads
# are head_dim 64 wide (CLIP-L 768 = 12 x 64, CLIP-G 1280 = 20 x 64, T5 is told by its relative attention table).
# The file's metadata may override each: {"components": {"clip_l": {"hidden_act": "gelu", "num_attention_heads": 2}}}.
DEFAULTS = {
    "clip_l": {"head_dim": 64, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
    "clip_g": {"head_dim": 64, "hidden_act": "gelu", "layer_norm_eps": 1e-5},
    "t5": {"relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6},
    "vae_decode": {"norm_num_groups": 32, "scaling_factor": 1.5305, "shift_factor": 0.0609},
}
OVERRIDABLE = {"clip_l": {"num_attention_heads", "hidden_act", "layer_norm_eps"},
               "clip_g": {"num_attention_heads", "hidden_act", "layer_norm_eps"},
               "t5": {"relative_attention_max_distance", "layer_norm_epsilon"},
               "vae_decode": {"norm_num_groups", "scaling_factor", "shift_factor"}}
METADATA_NAMES = {"clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5", "vae": "vae_decode"}  # metadata key -> role


def _keys(path: Path) -> list[str]:
    """The file's tensor names, without reading a tensor (safetensors), or from a memory-mapped torch.load."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    from .checkpoint import _read_torch

    return list(_read_torch(path)[0])


def component_roles(path: Path) -> list[str]:
    """The roles (clip_l, clip_g, t5, vae_decode) whose keys a checkpoint file has; [] for a folder, a transformer-only
    file, or a file that cannot be read here (export/checkpoint.py then reports it)."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() not in (".safetensors", ".pt", ".pth", ".ckpt", ".bin"):
        return []
    try:
        keys = _keys(path)
    except Exception:
        return []
    return [role for role, prefix in PREFIXES.items() if any(k.startswith(prefix) for k in keys)]


@dataclasses.dataclass(frozen=True)
class SingleFile(ComponentRoles):
    """A single-file checkpoint's encoders and VAE, the counterpart of pipeline_export.PipelineFolder."""

    path: Path
    tokenizers: Path  # the folder with tokenizer/, tokenizer_2/ (and tokenizer_3/ with T5)
    t5: bool
    shift: float | None = None  # a single file has no scheduler config: --shift stands for it
    clip_length: int = DEFAULT_CLIP_LENGTH  # the --tokenizers folder's CLIP tokenizers' model_max_length

    def load(self) -> dict[str, nn.Module]:
        return load_single_file_components(self)


def open_single_file(path: Path, present: list[str], tokenizers: Path | None, no_t5: bool, pipeline: Path | None,
                     shift: float | None = None) -> SingleFile:
    """Check a file with encoder / VAE keys can be exported with these options; raise CheckpointError with one line.
    `shift` (--shift) becomes the pipeline's scheduler shift too, since a single file has no scheduler config."""
    path = Path(path)
    if pipeline is not None:
        raise CheckpointError(f"{path} has its own text encoders and VAE ({', '.join(NAMES[r] for r in present)}); "
                              "give only the tokenizers, with --tokenizers FOLDER instead of --pipeline")
    needed = ["clip_l", "clip_g", "vae_decode"]
    missing = [r for r in needed if r not in present]
    if missing:
        keys = ", ".join(f"{NAMES[r]} ({PREFIXES[r]}*)" for r in missing)
        raise CheckpointError(f"{path}: has {', '.join(NAMES[r] for r in present)} but not {keys}: a single file needs CLIP-L, "
                              "CLIP-G and the VAE together (T5 optional); for a transformer-only file use --pipeline FOLDER")
    if "t5" not in present and not no_t5:
        raise CheckpointError(f"{path}: has no T5 encoder ({PREFIXES['t5']}*); pass --no-t5 to export without T5 "
                              "(zeros in its place)")
    if tokenizers is None:
        raise CheckpointError(f"{path}: has text encoders but a single file carries no tokenizers; pass --tokenizers FOLDER "
                              "(a folder with tokenizer/, tokenizer_2/ and tokenizer_3/, such as a diffusers SD3 pipeline)")
    t5 = "t5" in present and not no_t5  # --no-t5 drops the file's T5: it is not even read
    wanted = [TOKENIZERS[r] for r in TOKENIZERS if r != "t5" or t5]
    lacking = [f"{f}/" for f in wanted if not (Path(tokenizers) / f).is_dir()]
    if lacking:
        raise CheckpointError(f"{tokenizers}: --tokenizers folder is missing {', '.join(lacking)}"
                              + ("; pass --no-t5 to export without T5" if lacking == ["tokenizer_3/"] else ""))
    length = clip_length(Path(tokenizers))
    vae = {**DEFAULTS["vae_decode"], **_overrides(path).get("vae_decode", {})}  # the numbers the shapes cannot tell
    for field in ("scaling_factor", "shift_factor"):
        check_pipeline_number(field, vae[field], f"{path}: metadata components.vae.{field}")
    if t5:
        check_t5_tokenizer(Path(tokenizers) / TOKENIZERS["t5"])
    return SingleFile(path=path, tokenizers=Path(tokenizers), t5=t5, shift=shift, clip_length=length)


# --- reading -------------------------------------------------------------------------------------


def _metadata(path: Path) -> dict:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get("slimengine")
        return json.loads(text) if text else {}
    from .checkpoint import _read_torch

    return _read_torch(path)[1]


def _overrides(path: Path) -> dict[str, dict]:
    """metadata["components"], checked: known components and fields only."""
    try:
        given = _metadata(path).get("components", {})
    except ValueError as e:
        raise CheckpointError(f"{path}: the slimengine metadata is not valid JSON ({e})") from None
    if not isinstance(given, dict):
        raise CheckpointError(f"{path}: the metadata's components must be a JSON object")
    out = {}
    for name, fields in given.items():
        role = METADATA_NAMES.get(name)
        if role is None or not isinstance(fields, dict):
            raise CheckpointError(f"{path}: metadata components.{name}: expected one of {', '.join(METADATA_NAMES)} with an object")
        unknown = sorted(set(fields) - OVERRIDABLE[role])
        if unknown:
            raise CheckpointError(f"{path}: metadata components.{name}.{unknown[0]} cannot be set (settable: "
                                  f"{', '.join(sorted(OVERRIDABLE[role]))})")
        out[role] = fields
    return out


def _read_role(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix` (names kept), each as float32; the half-precision originals are not kept."""
    from .checkpoint import _check_storage

    tensors = {}
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(prefix):
                    tensors[key] = handle.get_tensor(key)
    else:
        from .checkpoint import _read_torch

        tensors = {k: v for k, v in _read_torch(path)[0].items() if k.startswith(prefix)}
    _check_storage(path, tensors)
    for key, value in tensors.items():
        if not value.dtype.is_floating_point:
            raise CheckpointError(f"{path}: '{key}' has dtype {value.dtype}, expected a floating-point type")
        tensors[key] = value.float()
    return tensors


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules whose parameters take no memory (they are assigned from the file), while buffers that no state
    dict holds (CLIP's position_ids) are real: the trick of accelerate's init_empty_weights(include_buffers=False)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _load(path: Path, role: str, module: nn.Module, weights: dict, shown) -> nn.Module:
    """Assign `weights` (diffusers/transformers names) to `module` built on meta: every key, shape, finite."""
    from .checkpoint import _check_tensors

    expected = module.state_dict()
    _check_tensors(path, weights, expected, shown=shown, finite=True, context=f" for the {NAMES[role]} the other weights imply")
    module.load_state_dict(weights, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a tied or unregistered tensor no key fills
        raise CheckpointError(f"{path}: the {NAMES[role]} has no weights for {', '.join(left[:3])}")
    return module.eval()


def _shape(path: Path, weights: dict, key: str, role: str) -> tuple[int, ...]:
    if key not in weights:
        raise CheckpointError(f"{path}: the {NAMES[role]} has no '{key}'")
    return tuple(weights[key].shape)


def _count(weights: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in weights if (m := re.match(pattern, k))}
    return len(found) if found == set(range(len(found))) else -1


def clip_config(path: Path, role: str, raw: dict, tokenizer: Path, overrides: dict):
    """(CLIPTextConfig, weights in transformers' names) from the file's tensors under PREFIXES[role]."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTokenizer

    prefix = PREFIXES[role]
    weights = convert_ldm_clip_checkpoint(raw, prefix)
    weights.pop("text_model.embeddings.position_ids", None)  # a buffer in older transformers' state dicts
    vocab, hidden = _shape(path, weights, "text_model.embeddings.token_embedding.weight", role)
    positions = _shape(path, weights, "text_model.embeddings.position_embedding.weight", role)[0]
    layers = _count(weights, r"text_model\.encoder\.layers\.(\d+)\.")
    if layers < 1:
        raise CheckpointError(f"{path}: the {NAMES[role]}'s layers are missing or not numbered 0..N-1 ({prefix}text_model.encoder.layers.N)")
    intermediate = _shape(path, weights, "text_model.encoder.layers.0.mlp.fc1.weight", role)[0]
    if "text_projection.weight" not in weights:
        # What diffusers' single-file loader uses for SD3's CLIP-L: the pooled output unprojected (Stability's code).
        weights["text_projection.weight"] = torch.eye(hidden)
    projection = _shape(path, weights, "text_projection.weight", role)[0]
    settings = {**DEFAULTS[role], **overrides}
    heads = settings.get("num_attention_heads") or hidden // settings["head_dim"]
    if not isinstance(heads, int) or heads < 1 or hidden % heads:
        raise CheckpointError(f"{path}: the {NAMES[role]}'s width {hidden} cannot be split into heads of {settings['head_dim']} "
                              f"channels; set the file's slimengine metadata components.{role}.num_attention_heads")
    tok = CLIPTokenizer.from_pretrained(str(tokenizer))
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, projection_dim=projection,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=positions,
                            hidden_act=settings["hidden_act"], layer_norm_eps=settings["layer_norm_eps"],
                            # the pooled output is taken at the first end-of-text token of the tokenizer's ids
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return config, weights


def t5_config(path: Path, raw: dict, overrides: dict):
    """(T5Config, weights in transformers' names) from the file's tensors under PREFIXES["t5"]."""
    from diffusers.loaders.single_file_utils import convert_sd3_t5_checkpoint_to_diffusers
    from transformers import T5Config

    role, prefix = "t5", PREFIXES["t5"]
    weights = convert_sd3_t5_checkpoint_to_diffusers(raw)
    vocab, d_model = _shape(path, weights, "shared.weight", role)
    layers = _count(weights, r"encoder\.block\.(\d+)\.")
    if layers < 1:
        raise CheckpointError(f"{path}: the T5's blocks are missing or not numbered 0..N-1 ({prefix}encoder.block.N)")
    buckets, heads = _shape(path, weights, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", role)
    inner = _shape(path, weights, "encoder.block.0.layer.0.SelfAttention.q.weight", role)[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in weights
    d_ff = _shape(path, weights, f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight", role)[0]
    if inner % heads:
        raise CheckpointError(f"{path}: the T5's attention width {inner} is not a multiple of its {heads} heads (relative_attention_bias)")
    settings = {**DEFAULTS[role], **overrides}
    config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers, num_heads=heads,
                      relative_attention_num_buckets=buckets, relative_attention_max_distance=settings["relative_attention_max_distance"],
                      layer_norm_epsilon=settings["layer_norm_epsilon"], feed_forward_proj="gated-gelu" if gated else "relu",
                      is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    # T5 in eager attention, as pipeline_export.load_components loads it (the ONNX lowering needs it).
    config._attn_implementation = "eager"
    return config, weights


def vae_config(path: Path, raw: dict, overrides: dict):
    """(AutoencoderKL's keyword arguments, weights in diffusers' names) from the file's tensors under first_stage_model."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    role, prefix = "vae_decode", PREFIXES["vae_decode"]
    ldm = {k[len(prefix):]: v for k, v in raw.items()}
    blocks = _count(ldm, r"encoder\.down\.(\d+)\.")
    if blocks < 1:
        raise CheckpointError(f"{path}: the VAE's encoder blocks are missing or not numbered 0..N-1 ({prefix}encoder.down.N)")
    widths = tuple(_shape(path, ldm, f"encoder.down.{i}.block.0.conv1.weight", role)[0] for i in range(blocks))
    layers = _count(ldm, r"encoder\.down\.0\.block\.(\d+)\.")
    decoder_layers = _count(ldm, r"decoder\.up\.0\.block\.(\d+)\.")
    if decoder_layers != layers + 1:
        raise CheckpointError(f"{path}: the VAE's decoder blocks have {decoder_layers} resnets, its encoder blocks {layers}: "
                              f"expected {layers + 1} ({prefix}decoder.up.0.block.N)")
    settings = {**DEFAULTS[role], **overrides}
    groups = settings["norm_num_groups"]
    if not isinstance(groups, int) or groups < 1 or any(w % groups for w in widths):
        raise CheckpointError(f"{path}: the VAE's widths {list(widths)} are not multiples of {groups} norm groups; set the file's "
                              "slimengine metadata components.vae.norm_num_groups")
    config = dict(in_channels=_shape(path, ldm, "encoder.conv_in.weight", role)[1],
                  out_channels=_shape(path, ldm, "decoder.conv_out.weight", role)[0],
                  latent_channels=_shape(path, ldm, "decoder.conv_in.weight", role)[1], block_out_channels=widths,
                  layers_per_block=layers, down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                  norm_num_groups=groups, scaling_factor=float(settings["scaling_factor"]), shift_factor=float(settings["shift_factor"]),
                  use_quant_conv="quant_conv.weight" in ldm, use_post_quant_conv="post_quant_conv.weight" in ldm,
                  mid_block_add_attention="encoder.mid.attn_1.q.weight" in ldm)
    weights = convert_ldm_vae_checkpoint(raw, config)
    if len(weights) != len(raw):  # the converter maps each name it knows to one name and drops the others silently
        raise CheckpointError(f"{path}: {len(raw) - len(weights)} of the VAE's {len(raw)} {prefix}* tensors have names an SD3 VAE "
                              f"of {blocks} blocks has no place for")
    return config, weights


def build(path: Path, role: str, config, weights: dict) -> nn.Module:
    """The module of `config` holding `weights` (assigned, not copied)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    with _parameters_on_meta():
        if role == "vae_decode":
            module = AutoencoderKL(**config)
        else:
            module = (T5EncoderModel if role == "t5" else CLIPTextModelWithProjection)(config)
    if role == "t5":
        expected = module.state_dict()
        if "encoder.embed_tokens.weight" in expected and "encoder.embed_tokens.weight" not in weights:
            weights["encoder.embed_tokens.weight"] = weights["shared.weight"]  # tied to shared, not stored in SD3 files
        if "encoder.embed_tokens.weight" not in expected:
            weights.pop("encoder.embed_tokens.weight", None)
    shown = (lambda k: f"{k} (diffusers' name of a {PREFIXES[role]}* weight)") if role == "vae_decode" else (lambda k: PREFIXES[role] + k)
    return _load(path, role, module, weights, shown)


def load_single_file_components(source: SingleFile) -> dict[str, nn.Module]:
    """The file's encoders and VAE as float32 modules in eval mode, like pipeline_export.load_components."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    overrides = _overrides(source.path)
    modules = {}
    for role in source.roles():
        raw = _read_role(source.path, PREFIXES[role])
        try:
            if role in ("clip_l", "clip_g"):
                config, weights = clip_config(source.path, role, raw, source.tokenizers / TOKENIZERS[role], overrides.get(role, {}))
            elif role == "t5":
                config, weights = t5_config(source.path, raw, overrides.get(role, {}))
            else:
                config, weights = vae_config(source.path, raw, overrides.get(role, {}))
            modules[role] = build(source.path, role, config, weights)
        except CheckpointError:
            raise
        except Exception as e:  # a config the shapes imply that the library refuses: one line
            text = str(e).strip().splitlines()
            raise CheckpointError(f"{source.path}: cannot build the {NAMES[role]} from its weights ({type(e).__name__}: "
                                  f"{text[0] if text else ''})") from None
        del raw, weights
    return modules
