"""ctypes mirror of runtime/include/slimengine.h, and where the shared libraries are found.

Each Structure names the C struct it mirrors in `_c_name_`; tests/test_c_structs.py checks every one's size and
field offsets against the compiled header, and that every struct of the header has a mirror here."""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from pathlib import Path


class SlimTensor(ctypes.Structure):
    _c_name_ = "slim_tensor"
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int32), ("device_type", ctypes.c_int32),
                ("device_id", ctypes.c_int32), ("ndim", ctypes.c_int32), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64))]


class EngineParams(ctypes.Structure):
    _c_name_ = "slim_engine_params"
    _fields_ = [("struct_size", ctypes.c_uint32), ("verify", ctypes.c_int32), ("onnxruntime_library", ctypes.c_char_p),
                ("intra_op_threads", ctypes.c_int32), ("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32),
                ("host_buffers", ctypes.c_int32)]

DEVICE_CPU, DEVICE_CUDA = 1, 2  # slim_device_type

# The ABI this binding is written against (slimengine.h's SLIM_ABI_VERSION_*): the library must have this major
# version and at least this minor one.
ABI_MAJOR, ABI_MINOR = 1, 0


class EngineInfo(ctypes.Structure):
    _c_name_ = "slim_engine_info"
    _fields_ = [("struct_size", ctypes.c_uint32), ("family", ctypes.c_int32), ("precision", ctypes.c_int32),
                ("stage_count", ctypes.c_int32), ("num_blocks", ctypes.c_int32), ("hidden_size", ctypes.c_int32),
                ("num_attention_heads", ctypes.c_int32), ("latent_channels", ctypes.c_int32), ("patch_size", ctypes.c_int32),
                ("joint_attention_dim", ctypes.c_int32), ("pooled_projection_dim", ctypes.c_int32),
                ("default_latent_size", ctypes.c_int32), ("max_latent_size", ctypes.c_int32), ("num_steps", ctypes.c_int32),
                ("skip_first_block", ctypes.c_int32), ("skip_last_block", ctypes.c_int32), ("compensation", ctypes.c_int32),
                ("xslim", ctypes.c_int32), ("has_token_stages", ctypes.c_int32), ("guidance_scale", ctypes.c_float),
                ("embed_dim", ctypes.c_int32), ("vocab_size", ctypes.c_int32), ("num_segments", ctypes.c_int32),
                ("max_text_len", ctypes.c_int32), ("max_query_len", ctypes.c_int32), ("image_size", ctypes.c_int32),
                ("max_frames", ctypes.c_int32), ("max_batch", ctypes.c_int32), ("max_history", ctypes.c_int32),
                ("model_version", ctypes.c_int64)]


FAMILIES = {0: "sd3", 1: "lemur", 2: "onnx"}  # slim_family
PRECISIONS = {0: "fp32", 1: "fp16", 2: "bf16", 5: "int8"}  # slim_dtype of the weights
COMPENSATIONS = {0: "none", 1: "mlp", 2: "identity"}  # slim_compensation
XSLIM_MODES = {0: "none", 1: "online", 2: "schedule"}  # slim_xslim_mode


class ProgramStep(ctypes.Structure):
    _c_name_ = "slim_program_step"
    _fields_ = [("struct_size", ctypes.c_uint32), ("record_delta", ctypes.c_int32), ("skip_range", ctypes.c_int32),
                ("sigma", ctypes.c_double), ("sigma_next", ctypes.c_double), ("timestep", ctypes.c_double)]


# slim_progress: (user, phase, step, total) -> 0 to go on, non-zero to cancel
Progress = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32)
PHASES = ("encode", "step", "decode", "tokenize")  # slim_phase
PROMPT_CACHE_MAX = 1024  # SLIM_PROMPT_CACHE_MAX


class GenerateParams(ctypes.Structure):
    _c_name_ = "slim_generate_params"
    _fields_ = [("struct_size", ctypes.c_uint32), ("prompt_embeds", ctypes.POINTER(SlimTensor)),
                ("pooled_embeds", ctypes.POINTER(SlimTensor)), ("negative_prompt_embeds", ctypes.POINTER(SlimTensor)),
                ("negative_pooled_embeds", ctypes.POINTER(SlimTensor)), ("latents", ctypes.POINTER(SlimTensor)),
                ("seeds", ctypes.POINTER(ctypes.c_uint64)), ("seed", ctypes.c_uint64), ("guidance_scale", ctypes.c_float),
                ("xslim_policy", ctypes.c_char_p), ("xslim_threshold", ctypes.c_float), ("num_steps", ctypes.c_int32),
                ("shift", ctypes.c_float), ("progress", Progress), ("progress_user", ctypes.c_void_p)]


class GenerateStats(ctypes.Structure):
    _c_name_ = "slim_generate_stats"
    _fields_ = [("struct_size", ctypes.c_uint32), ("steps", ctypes.c_int32), ("blocks_run", ctypes.c_int32),
                ("stage_calls", ctypes.c_int32), ("effective_nfe", ctypes.c_double), ("total_ms", ctypes.c_double),
                ("backend_ms", ctypes.c_double), ("flop_fraction", ctypes.c_double), ("transfer_bytes", ctypes.c_uint64)]


class PromptParams(ctypes.Structure):
    _c_name_ = "slim_prompt_params"
    _fields_ = [("struct_size", ctypes.c_uint32), ("prompts", ctypes.POINTER(ctypes.c_char_p)), ("prompt_count", ctypes.c_int32),
                ("negative_prompts", ctypes.POINTER(ctypes.c_char_p)), ("height", ctypes.c_int32), ("width", ctypes.c_int32),
                ("latents", ctypes.POINTER(SlimTensor)), ("seeds", ctypes.POINTER(ctypes.c_uint64)), ("seed", ctypes.c_uint64),
                ("guidance_scale", ctypes.c_float), ("xslim_policy", ctypes.c_char_p), ("xslim_threshold", ctypes.c_float),
                ("num_steps", ctypes.c_int32), ("shift", ctypes.c_float), ("progress", Progress), ("progress_user", ctypes.c_void_p)]


class PromptStats(ctypes.Structure):
    _c_name_ = "slim_prompt_stats"
    _fields_ = [("struct_size", ctypes.c_uint32), ("batch", ctypes.c_int32), ("height", ctypes.c_int32), ("width", ctypes.c_int32),
                ("steps", ctypes.c_int32), ("encoder_calls", ctypes.c_int32), ("total_ms", ctypes.c_double),
                ("tokenize_ms", ctypes.c_double), ("clip_l_ms", ctypes.c_double), ("clip_g_ms", ctypes.c_double),
                ("t5_ms", ctypes.c_double), ("steps_ms", ctypes.c_double), ("vae_decode_ms", ctypes.c_double),
                ("effective_nfe", ctypes.c_double), ("prompt_cache_hits", ctypes.c_int32), ("prompt_cache_misses", ctypes.c_int32),
                ("prompt_cache_size", ctypes.c_int32), ("prompt_cache_capacity", ctypes.c_int32), ("blocks_run", ctypes.c_int32),
                ("stage_calls", ctypes.c_int32), ("flop_fraction", ctypes.c_double), ("backend_ms", ctypes.c_double),
                ("transfer_bytes", ctypes.c_uint64)]


class StepStats(ctypes.Structure):
    _c_name_ = "slim_step_stats"
    _fields_ = [("struct_size", ctypes.c_uint32), ("sigma", ctypes.c_double), ("sigma_next", ctypes.c_double),
                ("blocks_run", ctypes.c_int32), ("level", ctypes.c_int32), ("ms", ctypes.c_double),
                ("blocks_reused", ctypes.c_int32), ("tokens_computed", ctypes.c_int32), ("flop_fraction", ctypes.c_double)]


class StageStats(ctypes.Structure):
    _c_name_ = "slim_stage_stats"
    _fields_ = [("struct_size", ctypes.c_uint32), ("calls", ctypes.c_int32), ("total_ms", ctypes.c_double)]


class Event(ctypes.Structure):
    _c_name_ = "slim_event"
    _fields_ = [("struct_size", ctypes.c_uint32), ("kind", ctypes.c_int32), ("step", ctypes.c_int32), ("block", ctypes.c_int32),
                ("stage", ctypes.c_int32), ("level", ctypes.c_int32), ("start_ns", ctypes.c_int64), ("end_ns", ctypes.c_int64),
                ("device_ns", ctypes.c_int64)]


class NamedTensor(ctypes.Structure):
    _c_name_ = "slim_named_tensor"
    _fields_ = [("name", ctypes.c_char_p), ("tensor", SlimTensor)]


class BankParams(ctypes.Structure):
    _c_name_ = "slim_bank_params"
    _fields_ = [("struct_size", ctypes.c_uint32), ("dim", ctypes.c_int32), ("read_only", ctypes.c_int32), ("create", ctypes.c_int32),
                ("sync_writes", ctypes.c_int32)]


class BankRecovery(ctypes.Structure):
    _c_name_ = "slim_bank_recovery"
    _fields_ = [("struct_size", ctypes.c_uint32), ("damaged_records", ctypes.c_int64), ("first_damaged_offset", ctypes.c_int64), ("tail_bytes", ctypes.c_int64), ("header_corrected", ctypes.c_int64)]


class BankRepairReport(ctypes.Structure):
    _c_name_ = "slim_bank_repair_report"
    _fields_ = [("struct_size", ctypes.c_uint32), ("header", ctypes.c_int32), ("records", ctypes.c_int64),
                ("corrected_records", ctypes.c_int64), ("unreadable_records", ctypes.c_int64), ("dropped_records", ctypes.c_int64),
                ("hidden_ids", ctypes.c_int64), ("ids", ctypes.c_int64), ("tail_bytes", ctypes.c_int64)]


class LemurStats(ctypes.Structure):
    _c_name_ = "slim_lemur_stats"
    _fields_ = [("struct_size", ctypes.c_uint32), ("batch", ctypes.c_int32), ("history_found", ctypes.c_int64),
                ("history_missing", ctypes.c_int64), ("total_ms", ctypes.c_double), ("backend_ms", ctypes.c_double),
                ("bank_ms", ctypes.c_double)]


class EmbedParams(ctypes.Structure):
    _c_name_ = "slim_embed_params"
    _fields_ = [("struct_size", ctypes.c_uint32), ("text_ids", ctypes.POINTER(SlimTensor)), ("segment_ids", ctypes.POINTER(SlimTensor)),
                ("frames", ctypes.POINTER(SlimTensor)), ("bank", ctypes.c_void_p), ("document_ids", ctypes.POINTER(SlimTensor)),
                ("model_version", ctypes.c_int64)]


class ScoreParams(ctypes.Structure):
    _c_name_ = "slim_score_params"
    _fields_ = [("struct_size", ctypes.c_uint32), ("bank", ctypes.c_void_p), ("history_ids", ctypes.POINTER(SlimTensor)),
                ("query_ids", ctypes.POINTER(SlimTensor)), ("missing_policy", ctypes.c_int32), ("min_model_version", ctypes.c_int64)]


def onnxruntime_library() -> str:
    """Path of the C-API library shipped inside the `onnxruntime` wheel (capi/libonnxruntime.so.X.Y.Z)."""
    explicit = os.environ.get("SLIMENGINE_ORT_LIBRARY")
    if explicit:
        return explicit
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the onnxruntime package is not installed (pip install onnxruntime)")
    capi = Path(next(iter(spec.submodule_search_locations))) / "capi"
    found = sorted(glob.glob(str(capi / "libonnxruntime.so*")))
    if not found:
        raise RuntimeError(f"no libonnxruntime.so in {capi}")
    return found[-1]


def _installed(relative: str) -> Path:
    """A file the CMake build installed into the package (an editable install spreads the package
    over several folders, so every folder of its __path__ is searched)."""
    folders = [Path(p) for p in sys.modules[__package__].__path__]
    for folder in folders:
        if (folder / relative).exists():
            return folder / relative
    return folders[0] / relative


def library_path() -> Path:
    """libslimengine.so: inside the installed package, or $SLIMENGINE_LIBRARY."""
    return Path(os.environ.get("SLIMENGINE_LIBRARY", _installed("libslimengine.so")))


def ops_library_path() -> Path:
    """libslimengine_ops.so: the "ai.slimengine" custom ops for ONNX Runtime."""
    return _installed("libslimengine_ops.so")


def ops_cuda_library_path() -> Path:
    """libslimengine_ops_cuda.so: the same ops plus CUDA kernels for the CUDA execution provider (built where nvcc exists)."""
    return _installed("libslimengine_ops_cuda.so")


def example_program() -> Path:
    return _installed("bin/slimengine-example")


def header_path() -> Path:
    return _installed("include/slimengine.h")


def c_string(value: str | bytes, what: str) -> bytes:
    """`value` as the bytes of a C string: a str as UTF-8 (surrogatepass keeps a lone surrogate as bytes that are not
    UTF-8, for the runtime to refuse like any other caller's), bytes as they are. A NUL is refused: C would end the
    string there and silently use what comes before (tokenize("t5\\0x") tokenized with "t5")."""
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else bytes(value)
    if b"\0" in data:
        raise ValueError(f"{what} contains a NUL character (at byte {data.index(0)}), where C would end the string")
    return data


def c_path(path, what: str) -> bytes:
    """A str, bytes or os.PathLike path encoded for C as the os module encodes it (os.fsencode), NUL refused
    (c_string); anything else (None, a number) is a TypeError rather than a file named after it."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"{what} must be a path (str, bytes or os.PathLike), got {path!r}")
    return c_string(os.fsencode(path), what)


# slim_verify_progress: (user, file, bytes_done, bytes_total) -> 0 to go on
VerifyProgress = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint64)

_lib = None


def _check_abi(handle: ctypes.CDLL, path: Path) -> None:
    """Refuse a library of another ABI major version, or older than this binding's minor version."""
    if not hasattr(handle, "slim_abi_version"):  # a library before ABI 0.5
        major, minor = handle.slim_abi_version_major(), "4 or older"
    else:
        got = (ctypes.c_int32(), ctypes.c_int32())
        handle.slim_abi_version.argtypes = [ctypes.POINTER(ctypes.c_int32)] * 2
        handle.slim_abi_version(ctypes.byref(got[0]), ctypes.byref(got[1]))
        major, minor = got[0].value, got[1].value
        if major == ABI_MAJOR and minor >= ABI_MINOR:
            return
    raise RuntimeError(f"{path} has C ABI {major}.{minor}; this Python binding needs ABI {ABI_MAJOR}.{ABI_MINOR} or a newer "
                       f"{ABI_MAJOR}.x: reinstall slimengine so the library and the binding match (or unset SLIMENGINE_LIBRARY)")


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        path = library_path()
        if not path.exists():
            raise RuntimeError(f"{path} not found: install slimengine with pip so the C runtime is built")
        handle = ctypes.CDLL(str(path))
        _check_abi(handle, path)
        p = ctypes.POINTER
        sigs = {
            "slim_version": ([], ctypes.c_char_p),
            "slim_abi_version_major": ([], ctypes.c_int32),
            "slim_abi_version": ([p(ctypes.c_int32), p(ctypes.c_int32)], None),
            "slim_last_error": ([], ctypes.c_char_p),
            "slim_status_name": ([ctypes.c_int], ctypes.c_char_p),
            "slim_engine_params_init": ([p(EngineParams), ctypes.c_size_t], ctypes.c_int),
            "slim_engine_open": ([ctypes.c_char_p, p(EngineParams), p(ctypes.c_void_p)], ctypes.c_int),
            "slim_engine_close": ([ctypes.c_void_p], None),
            "slim_bundle_verify": ([ctypes.c_char_p, ctypes.c_int32, VerifyProgress, ctypes.c_void_p], ctypes.c_int),
            "slim_engine_manifest": ([ctypes.c_void_p], ctypes.c_char_p),
            "slim_engine_stage_count": ([ctypes.c_void_p], ctypes.c_int32),
            "slim_engine_stage_name": ([ctypes.c_void_p, ctypes.c_int32], ctypes.c_char_p),
            "slim_engine_get_info": ([ctypes.c_void_p, p(EngineInfo)], ctypes.c_int),
            "slim_engine_program_step": ([ctypes.c_void_p, ctypes.c_int32, p(ProgramStep)], ctypes.c_int),
            "slim_tokenize": ([ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, p(ctypes.c_int64), ctypes.c_size_t, p(ctypes.c_size_t)],
                              ctypes.c_int),
            "slim_engine_tokenizer_count": ([ctypes.c_void_p], ctypes.c_int32),
            "slim_engine_tokenizer_role": ([ctypes.c_void_p, ctypes.c_int32], ctypes.c_char_p),
            "slim_session_create": ([ctypes.c_void_p, p(ctypes.c_void_p)], ctypes.c_int),
            "slim_session_destroy": ([ctypes.c_void_p], None),
            "slim_session_set_prompt_cache": ([ctypes.c_void_p, ctypes.c_int32], ctypes.c_int),
            "slim_session_clear_prompt_cache": ([ctypes.c_void_p], ctypes.c_int),
            "slim_generate_params_init": ([p(GenerateParams), ctypes.c_size_t], ctypes.c_int),
            "slim_generate": ([ctypes.c_void_p, p(GenerateParams), p(SlimTensor), p(GenerateStats)], ctypes.c_int),
            "slim_prompt_params_init": ([p(PromptParams), ctypes.c_size_t], ctypes.c_int),
            "slim_generate_prompt": ([ctypes.c_void_p, p(PromptParams), p(ctypes.c_uint8), ctypes.c_size_t, p(ctypes.c_float),
                                      ctypes.c_size_t, p(PromptStats)], ctypes.c_int),
            "slim_session_step_count": ([ctypes.c_void_p], ctypes.c_int32),
            "slim_session_step_stats": ([ctypes.c_void_p, ctypes.c_int32, p(StepStats)], ctypes.c_int),
            "slim_session_stage_stats": ([ctypes.c_void_p, ctypes.c_int32, p(StageStats)], ctypes.c_int),
            "slim_session_set_profiling": ([ctypes.c_void_p, ctypes.c_int32], ctypes.c_int),
            "slim_session_event_count": ([ctypes.c_void_p], ctypes.c_int32),
            "slim_session_event": ([ctypes.c_void_p, ctypes.c_int32, p(Event)], ctypes.c_int),
            "slim_stage_run": ([ctypes.c_void_p, ctypes.c_char_p, p(NamedTensor), ctypes.c_int32, p(NamedTensor), ctypes.c_int32],
                               ctypes.c_int),
            "slim_bank_params_init": ([p(BankParams), ctypes.c_size_t], ctypes.c_int),
            "slim_bank_open": ([ctypes.c_char_p, p(BankParams), p(ctypes.c_void_p)], ctypes.c_int),
            "slim_bank_close": ([ctypes.c_void_p], None),
            "slim_bank_dim": ([ctypes.c_void_p], ctypes.c_int32),
            "slim_bank_count": ([ctypes.c_void_p], ctypes.c_int64),
            "slim_bank_upsert": ([ctypes.c_void_p, p(SlimTensor), p(SlimTensor), ctypes.c_uint32], ctypes.c_int),
            "slim_bank_delete": ([ctypes.c_void_p, p(SlimTensor), p(ctypes.c_int64)], ctypes.c_int),
            "slim_bank_lookup": ([ctypes.c_void_p, p(SlimTensor), p(SlimTensor), p(SlimTensor), p(SlimTensor), p(ctypes.c_int64)],
                                 ctypes.c_int),
            "slim_bank_flush": ([ctypes.c_void_p], ctypes.c_int),
            "slim_bank_refresh": ([ctypes.c_void_p, p(ctypes.c_int64)], ctypes.c_int),
            "slim_bank_recovery_info": ([ctypes.c_void_p, p(BankRecovery)], ctypes.c_int),
            "slim_bank_repair": ([ctypes.c_char_p, p(BankRepairReport)], ctypes.c_int),
            "slim_embed_params_init": ([p(EmbedParams), ctypes.c_size_t], ctypes.c_int),
            "slim_embed": ([ctypes.c_void_p, p(EmbedParams), p(SlimTensor), p(LemurStats)], ctypes.c_int),
            "slim_score_params_init": ([p(ScoreParams), ctypes.c_size_t], ctypes.c_int),
            "slim_score": ([ctypes.c_void_p, p(ScoreParams), p(SlimTensor), p(LemurStats)], ctypes.c_int),
        }
        for name, (args, res) in sigs.items():
            fn = getattr(handle, name)
            fn.argtypes, fn.restype = args, res
        _lib = handle
    return _lib


def params(cls: type):
    """A params struct of `cls` (EngineParams, GenerateParams, ...) holding the library's defaults: its
    slim_*_params_init fills exactly this binding's sizeof (a newer library keeps its later fields at their defaults)."""
    value = cls()
    name = cls._c_name_.removeprefix("slim_").removesuffix("_params")
    code = getattr(lib(), f"slim_{name}_params_init")(ctypes.byref(value), ctypes.sizeof(cls))
    if code != 0:
        raise RuntimeError(f"slim_{name}_params_init: {lib().slim_last_error().decode()}")
    return value
