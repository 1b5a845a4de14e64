"""Load an SD3 / 1.x-Distill or LEMUR checkpoint without executing code and infer its configuration.

Accepted: `.pt`/`.pth` (torch.load with weights_only=True), `.safetensors`, or a diffusers
transformer folder (config.json + *.safetensors, sharded or not). Keys may be in diffusers naming or
in the original MMDiT naming (`model.diffusion_model.joint_blocks.N...`), behind wrapper prefixes.
Project metadata (attention heads, default sample size, sampling plan) travels under the key `slimengine`: a top-level
entry of a `.pt` dict, a JSON string in safetensors metadata, or `slimengine.json` in a folder.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from .bundle import sha256_files
from .errors import CheckpointError
from .lemur_model import LemurConfig, LemurModel
from .sd3_model import DistilledSD3, SD3Config

WRAPPER_PREFIXES = ("module.", "_fsdp_wrapped_module.", "transformer.")
COMPENSATION_PREFIXES = ("delta_pred_hidden.", "delta_pred_encoder.")
# Key prefixes of the text encoders and VAE in an SD3 single file (export/single_file.py reads them)
SINGLE_FILE_PREFIXES = ("text_encoders.", "first_stage_model.")
# SD3 convention when the weights cannot tell (no qk-norm): heads of 64 channels.
DEFAULT_HEAD_DIM = 64


@dataclasses.dataclass
class Checkpoint:
    path: Path
    config: SD3Config
    state_dict: dict[str, torch.Tensor]  # diffusers transformer keys + delta_pred_* keys
    metadata: dict
    sha256: str

    @property
    def has_compensation(self) -> bool:
        return any(k.startswith(COMPENSATION_PREFIXES) for k in self.state_dict)

    def build_model(self, dtype: torch.dtype = torch.float32) -> DistilledSD3:
        """The model with these weights loaded, in eval mode."""
        with torch.device("meta"):
            model = DistilledSD3(self.config, with_compensation=self.has_compensation)
        model.load_state_dict(_model_keys(self.state_dict), strict=True, assign=True)
        return model.to(dtype).eval()


def load_checkpoint(path: str | Path, num_attention_heads: int | None = None) -> Checkpoint:
    """Read, normalise and validate a checkpoint; raise CheckpointError with one clear line."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    # a single file's encoders and VAE are export/single_file.py's: not read here (no second copy of them in memory)
    raw, metadata = _read_raw(path, skip=SINGLE_FILE_PREFIXES)
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: the slimengine metadata must be a JSON object, found {type(metadata).__name__}")
    state_dict = _normalise_keys(raw, path)
    heads = num_attention_heads or metadata.get("num_attention_heads")
    if heads is not None and (not isinstance(heads, int) or heads < 1):
        raise CheckpointError(f"{path}: the number of attention heads must be a positive integer, got {heads!r}")
    try:
        config = infer_config(state_dict, path, heads)
        sample_size = metadata.get("sample_size")  # the default resolution (latent pixels): not in the weights
        if sample_size is not None:
            if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1 or sample_size % config.patch_size:
                raise CheckpointError(f"{path}: the metadata's sample_size must be a positive multiple of the patch size "
                                      f"({config.patch_size}), got {sample_size!r}")
            config = dataclasses.replace(config, sample_size=sample_size)
        _check_against_model(state_dict, config, path)
    except CheckpointError:
        raise
    except Exception as e:  # weights of impossible shapes make diffusers or the inference fail: one line
        raise CheckpointError(f"{path}: not a usable SD3 checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    return Checkpoint(path=path, config=config, state_dict=state_dict, metadata=metadata, sha256=_hash_source(path))


def _read_raw(path: Path, skip: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """The tensors (each checked to own the data it claims; those whose names start with `skip` left out) and the
    slimengine metadata."""
    try:
        if path.is_dir():
            raw = _read_diffusers_folder(path)
        else:
            suffix = path.suffix.lower()
            if suffix in (".pt", ".pth", ".ckpt", ".bin"):
                raw = _read_torch(path)
                raw = ({k: v for k, v in raw[0].items() if not k.startswith(skip)}, raw[1]) if skip else raw
            elif suffix == ".safetensors":
                raw = _read_safetensors([path], skip)
            else:
                raw = None
        if raw is not None:
            _check_storage(path, raw[0])
            return raw
    except CheckpointError:
        raise
    except Exception as e:  # every reader error becomes one line naming the file
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    raise CheckpointError(f"{path}: unknown checkpoint type '{path.suffix}' (expected .pt, .pth, .safetensors or a diffusers folder)")


def _check_storage(path: Path, tensors: dict) -> None:
    """Each tensor must be backed by as many bytes as it claims. torch.save keeps an expanded (stride-0) or
    self-overlapping view as its small storage, so a few KB could otherwise stand for gigabytes of weights;
    checked here, before key conversion or any model is built, for every family."""
    for key, tensor in tensors.items():
        span = _span(tensor)
        needed = None if span is None else (tensor.storage_offset() + span) * tensor.element_size()
        if needed is None or needed > tensor.untyped_storage().nbytes():
            raise CheckpointError(f"{path}: tensor '{key}' of shape {list(tensor.shape)} is an expanded, stride-0 or overlapping view "
                                  f"(strides {list(tensor.stride())}, {tensor.untyped_storage().nbytes()} bytes stored), not "
                                  f"{tensor.numel()} values of its own; save it with .contiguous()")


def _span(tensor: torch.Tensor) -> int | None:
    """How many elements of its storage `tensor` addresses, or None when some are addressed twice (overlap)."""
    if tensor.numel() == 0:
        return 0
    span = 1
    for size, stride in sorted((d for d in zip(tensor.shape, tensor.stride()) if d[0] > 1), key=lambda d: d[1]):
        if stride < span:  # this dimension steps back into elements the smaller ones already cover
            return None
        span += (size - 1) * stride
    return span


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else "no detail"


def _read_torch(path: Path) -> tuple[dict, dict]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    metadata = obj.get("slimengine", {}) if isinstance(obj.get("slimengine"), dict) else {}
    for key in ("state_dict", "model", "module", "transformer"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, metadata


def _read_safetensors(files: list[Path], skip: tuple[str, ...] = ()) -> tuple[dict, dict]:
    from safetensors import safe_open

    tensors, metadata = {}, {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            meta = handle.metadata() or {}
            if "slimengine" in meta:
                metadata = json.loads(meta["slimengine"])
            for key in handle.keys():
                if not (skip and key.startswith(skip)):
                    tensors[key] = handle.get_tensor(key)
    return tensors, metadata


def _read_diffusers_folder(path: Path) -> tuple[dict, dict]:
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: folder has no config.json (expected a diffusers transformer folder)")
    config = json.loads((path / "config.json").read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: folder has no .safetensors weights")
    tensors, metadata = _read_safetensors(files)
    if (path / "slimengine.json").exists():
        metadata = json.loads((path / "slimengine.json").read_text())
    metadata.setdefault("num_attention_heads", config.get("num_attention_heads"))
    metadata.setdefault("sample_size", config.get("sample_size"))
    return tensors, metadata


def _normalise_keys(raw: dict, path: Path) -> dict[str, torch.Tensor]:
    state_dict = {}
    for key, value in raw.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        state_dict[key] = value
    if any(k.startswith(("model.diffusion_model.", "joint_blocks.")) for k in state_dict):
        state_dict = _original_to_diffusers(state_dict, path)
    if "pos_embed.proj.weight" not in state_dict:
        raise CheckpointError(f"{path}: not an SD3 transformer checkpoint (no patch embedding 'pos_embed.proj.weight' "
                              f"among {len(state_dict)} tensors)")
    return state_dict


def _original_to_diffusers(state_dict: dict, path: Path) -> dict:
    """Original MMDiT names -> diffusers names, using diffusers' own single-file conversion."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    compensation = {k: v for k, v in state_dict.items() if k.startswith(COMPENSATION_PREFIXES)}
    original = {k: v for k, v in state_dict.items() if k not in compensation}
    try:
        converted = convert_sd3_transformer_checkpoint_to_diffusers(original)
    except KeyError as e:
        raise CheckpointError(f"{path}: original-format SD3 checkpoint is missing key {e}") from None
    leftover = list(original)  # the conversion pops every key it understood
    if leftover:
        raise CheckpointError(f"{path}: unexpected keys in original-format checkpoint: {', '.join(sorted(leftover)[:5])}")
    converted.update(compensation)
    return converted


def infer_config(state_dict: dict, path: Path, num_attention_heads: int | None = None) -> SD3Config:
    def shape(key):
        if key not in state_dict:
            raise CheckpointError(f"{path}: missing key '{key}'")
        return tuple(state_dict[key].shape)

    inner, in_channels, patch, _ = shape("pos_embed.proj.weight")
    pos_tokens = shape("pos_embed.pos_embed")[1]
    pos_max = int(round(pos_tokens**0.5))
    if pos_max * pos_max != pos_tokens:
        raise CheckpointError(f"{path}: positional embedding has {pos_tokens} entries, not a square grid")
    block_ids = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    if not block_ids or block_ids != list(range(len(block_ids))):
        raise CheckpointError(f"{path}: joint blocks are missing or not numbered 0..N-1 (found {block_ids[:8]})")
    norm_q = state_dict.get("transformer_blocks.0.attn.norm_q.weight")
    if norm_q is not None:
        head_dim = norm_q.shape[0]
        qk_norm = "layer_norm" if "transformer_blocks.0.attn.norm_q.bias" in state_dict else "rms_norm"
    else:
        qk_norm = None
        head_dim = inner // num_attention_heads if num_attention_heads else DEFAULT_HEAD_DIM
    if not head_dim or inner % head_dim:
        if norm_q is None and not num_attention_heads:
            raise CheckpointError(f"{path}: cannot tell the attention heads of width {inner} (no qk-norm weights, no metadata); pass --heads N")
        raise CheckpointError(f"{path}: width {inner} cannot be split into {num_attention_heads or inner // head_dim} attention heads")
    caption_dim, joint_dim = shape("context_embedder.weight")
    return SD3Config(
        num_layers=len(block_ids),
        num_attention_heads=inner // head_dim,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=shape("proj_out.weight")[0] // (patch * patch),
        patch_size=patch,
        joint_attention_dim=joint_dim,
        caption_projection_dim=caption_dim,
        pooled_projection_dim=shape("time_text_embed.text_embedder.linear_1.weight")[1],
        pos_embed_max_size=pos_max,
        dual_attention_layers=tuple(i for i in block_ids if f"transformer_blocks.{i}.attn2.to_q.weight" in state_dict),
        qk_norm=qk_norm,
    )


def _model_keys(state_dict: dict) -> dict:
    return {(k if k.startswith(COMPENSATION_PREFIXES) else "transformer." + k): v for k, v in state_dict.items()}


def _check_against_model(state_dict: dict, config: SD3Config, path: Path) -> None:
    has_comp = any(k.startswith(COMPENSATION_PREFIXES) for k in state_dict)
    with torch.device("meta"):
        expected = DistilledSD3(config, with_compensation=has_comp).state_dict()
    _check_tensors(path, _model_keys(state_dict), expected, shown=lambda key: key.removeprefix("transformer."), finite=True)


def _check_tensors(path: Path, given: dict, expected: dict, shown=lambda key: key, finite: bool = False, context: str = "") -> None:
    """The checkpoint's tensors against the model's: the same keys (`shown` as the user wrote them), shapes
    and floating-point dtypes; with `finite`, no NaN or Inf."""
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} keys, e.g. {', '.join(map(shown, missing[:3]))}")
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected keys, e.g. {', '.join(map(shown, unexpected[:3]))}")
    for key, value in given.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{path}: '{shown(key)}' has shape {list(value.shape)}, expected {list(expected[key].shape)}{context}")
        if not value.dtype.is_floating_point:
            raise CheckpointError(f"{path}: '{shown(key)}' has dtype {value.dtype}, expected a floating-point type")
        if finite and not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: '{shown(key)}' contains NaN or Inf")


def _hash_source(path: Path) -> str:
    """sha256 of the checkpoint file, or of every file of a folder in path order."""
    return sha256_files(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])


# ---- family detection and LEMUR checkpoints ----
# A LEMUR checkpoint carries its whole configuration in the metadata: {"family": "lemur", "lemur_config": {...}}.


def checkpoint_family(path: str | Path) -> str:
    """"sd3" or "lemur", from the metadata alone where the format allows (no tensor is read)."""
    path = Path(path)
    if path.is_dir() or not path.exists():
        return "sd3"
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                metadata = json.loads((handle.metadata() or {}).get("slimengine", "{}"))
        else:
            metadata = _read_raw(path)[1]
    except Exception:  # unreadable here: the family's own loader gives the precise error
        return "sd3"
    return "lemur" if isinstance(metadata, dict) and metadata.get("family") == "lemur" else "sd3"


@dataclasses.dataclass
class LemurCheckpoint:
    path: Path
    config: LemurConfig
    state_dict: dict[str, torch.Tensor]
    metadata: dict
    sha256: str

    def build_model(self) -> LemurModel:
        model = LemurModel(self.config)
        model.load_state_dict(self.state_dict, strict=True)
        return model.float().eval()


def load_lemur_checkpoint(path: str | Path) -> LemurCheckpoint:
    """Read and validate a LEMUR checkpoint (config in its metadata); raise CheckpointError with one clear line."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    raw, metadata = _read_raw(path)
    if not isinstance(metadata, dict) or metadata.get("family") != "lemur" or not isinstance(metadata.get("lemur_config"), dict):
        raise CheckpointError(f"{path}: not a LEMUR checkpoint (no slimengine metadata with family 'lemur' and a lemur_config)")
    try:
        config = LemurConfig.from_json(metadata["lemur_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid lemur_config ({e})") from None
    state_dict = dict(raw)
    for prefix in WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    _check_tensors(path, state_dict, _lemur_expected(path, config, len(state_dict)), finite=True, context=" for its lemur_config")
    return LemurCheckpoint(path=path, config=config, state_dict=state_dict, metadata=metadata, sha256=_hash_source(path))


def _lemur_expected(path: Path, config: LemurConfig, tensors: int) -> dict:
    """The state dict `config` implies, built on the meta device: shapes only, no memory, so a lemur_config that
    claims a huge model costs nothing before it is refused. Its layer counts are bounded by the tensors present
    first (every layer has weights), since even a meta model of a million layers takes long to build."""
    for field in dataclasses.fields(config):
        if field.name.endswith("_layers") and getattr(config, field.name) > tensors:
            raise CheckpointError(f"{path}: lemur_config claims {field.name}={getattr(config, field.name)}, more layers than "
                                  f"the checkpoint's {tensors} tensors could hold: the config does not match the weights")
    try:
        with torch.device("meta"):
            return LemurModel(config).state_dict()
    except Exception as e:  # sizes torch cannot represent
        raise CheckpointError(f"{path}: invalid lemur_config ({type(e).__name__}: {_first_line(e)})") from None
