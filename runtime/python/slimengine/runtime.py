"""Python binding of the C runtime: Engine, Session (generate, embed, score, run_stage), MemoryBank."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import threading
import warnings
import weakref
from pathlib import Path

import numpy as np

from . import _native
from ._calls import Bank as _BankGuard
from ._calls import bind as _bind_compiled
from ._native import Event, GenerateStats, LemurStats, NamedTensor, SlimTensor, StageStats, StepStats, c_path, c_string
from .bundle import VERIFY_LEVELS, loads_strict
from .xslim_policy import XSlimPolicy, parse_xslim_spec

STEP_LEVELS = ("full", "skipped_range", "reused", "block_refresh", "token_refresh")  # slim_step_level
EVENT_KINDS = ("generation", "prepare", "step", "stage", "bank", "block", "tokenize", "decode", "image")  # slim_event_kind
BLOCK_ACTIONS = ("run", "run_keep_kv", "run_tokens", "reuse", "skip", "add_delta")  # slim_block_action
PROFILE_ON, PROFILE_BLOCKS = 1, 2  # slim_session_set_profiling flags


class SlimError(RuntimeError):
    """A runtime call failed; `status` is the C status name, the message is slim_last_error()."""

    def __init__(self, status: str, message: str):
        super().__init__(f"{message} [{status}]")
        self.status = status


def _check(code: int) -> None:
    if code != 0:
        lib = _native.lib()
        # errors="replace": a message may quote bytes of a damaged file (ONNX Runtime's parse errors do).
        raise SlimError(lib.slim_status_name(code).decode(), lib.slim_last_error().decode(errors="replace"))


def version() -> str:
    return _native.lib().slim_version().decode()


def abi_version() -> tuple[int, int]:
    """(major, minor) C ABI version of the loaded library (slim_abi_version); the binding refuses a library whose
    major differs or whose minor is below the one it is written against (_native.ABI_MAJOR, ABI_MINOR)."""
    major, minor = ctypes.c_int32(), ctypes.c_int32()
    _native.lib().slim_abi_version(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


@dataclasses.dataclass(frozen=True)
class ProgramStep:
    """One step of an SD3 bundle's sampling program (slim_engine_program_step)."""

    sigma: float
    sigma_next: float
    timestep: float
    record_delta: bool  # records the delta over the skipped block range (1.x)
    skip_range: bool  # skips the 1.x block range and adds the compensated delta


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """What the engine's manifest says, typed (slim_engine_get_info; fields of another family are 0, the skipped range -1)."""

    family: str  # "sd3", "lemur" or "onnx"
    precision: str  # "fp32", "fp16", "bf16" or "int8"
    stage_count: int
    # SD3
    num_blocks: int
    hidden_size: int
    num_attention_heads: int
    latent_channels: int
    patch_size: int
    joint_attention_dim: int
    pooled_projection_dim: int
    default_latent_size: int
    max_latent_size: int
    num_steps: int
    skip_first_block: int  # 1.x: the block range the skipping steps skip, inclusive; -1: none
    skip_last_block: int
    compensation: str  # "none", "mlp" or "identity"
    xslim: str  # the bundle's default X-Slim policy: "none", "online" or "schedule"
    has_token_stages: bool
    guidance_scale: float
    steps: tuple[ProgramStep, ...]  # the program's steps (empty for other families)
    # LEMUR
    embed_dim: int
    vocab_size: int
    num_segments: int
    max_text_len: int
    max_query_len: int
    image_size: int
    max_frames: int
    max_batch: int
    max_history: int
    model_version: int


def _engine_info(handle) -> EngineInfo:
    lib = _native.lib()
    raw = _native.EngineInfo(struct_size=ctypes.sizeof(_native.EngineInfo))
    _check(lib.slim_engine_get_info(handle, ctypes.byref(raw)))
    steps = []
    for i in range(raw.num_steps):
        step = _native.ProgramStep(struct_size=ctypes.sizeof(_native.ProgramStep))
        _check(lib.slim_engine_program_step(handle, i, ctypes.byref(step)))
        steps.append(ProgramStep(step.sigma, step.sigma_next, step.timestep, bool(step.record_delta), bool(step.skip_range)))
    values = {name: getattr(raw, name) for name, _ in raw._fields_ if name != "struct_size"}
    values.update(family=_native.FAMILIES[raw.family], precision=_native.PRECISIONS[raw.precision],
                  compensation=_native.COMPENSATIONS[raw.compensation], xslim=_native.XSLIM_MODES[raw.xslim],
                  has_token_stages=bool(raw.has_token_stages), steps=tuple(steps))
    return EngineInfo(**values)


def _as_float32(x, name: str) -> np.ndarray:
    """numpy array, DLPack producer (torch, cupy on host) or array-like -> C-contiguous float32 numpy."""
    if x is None:
        return None
    if not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__"):
        x = np.from_dlpack(x)
    arr = np.asarray(x)
    if arr.dtype != np.float32:
        raise TypeError(f"{name}: dtype must be float32, got {arr.dtype}")
    return np.ascontiguousarray(arr)


def _as_int64(x, name: str) -> np.ndarray:
    """Integer ids -> C-contiguous int64 numpy (other integer types are widened; floats are refused, and
    unsigned values past int64's range are refused rather than wrapped to negative ids)."""
    if not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__"):
        x = np.from_dlpack(x)
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}: dtype must be an integer type (ids) within int64's range, got {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize >= 8 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: {int(arr.max())} is outside int64's range")
    return np.ascontiguousarray(arr, dtype=np.int64)


INT32_MAX, UINT32_MAX, INT64_MAX, UINT64_MAX = 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1


def _integer(value, name: str, low: int, high: int) -> int:
    """A Python or numpy integer in [low, high], checked before ctypes would silently truncate it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _seeds(seed, batch: int):
    """(seed, seeds) for a params struct: an int is `seed` (row b draws from seed + b); a sequence of one int per row
    is `seeds` (a ctypes uint64 array, kept alive by the caller until the call returns)."""
    if isinstance(seed, np.ndarray) and seed.ndim == 0:
        seed = seed[()]
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)):
        return _integer(seed, "seed", 0, UINT64_MAX), None
    if not (isinstance(seed, (list, tuple)) or (isinstance(seed, np.ndarray) and seed.ndim == 1)):
        raise TypeError(f"seed must be an int or a list, tuple or 1-d array of one int per row, got {type(seed).__name__}")
    values = list(seed)
    if len(values) != batch:
        raise ValueError(f"seed: {len(values)} seeds for a batch of {batch} (one per row)")
    return 0, (ctypes.c_uint64 * batch)(*(_integer(v, f"seed[{i}]", 0, UINT64_MAX) for i, v in enumerate(values)))


def _flag(value, name: str) -> int:
    """A bool (or 0/1) as the C int flag."""
    if not isinstance(value, (bool, np.bool_)) and not (isinstance(value, (int, np.integer)) and value in (0, 1)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return int(bool(value))


def _real(value, name: str, low: float, *, above: bool = False) -> float:
    """A finite Python or numpy real number >= low (> low with `above`), checked before ctypes would turn it into
    a float (silently: True is 1.0, 1e300 is inf; a huge int raises OverflowError)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got {value}") from None
    if not math.isfinite(value) or not (value > low if above else value >= low):
        raise ValueError(f"{name} must be a finite number {'>' if above else '>='} {low:g}, got {value}")
    return value


MAX_BATCH, MAX_BANK_IDS = 4096, 2**24  # the C runtime's limits (c_api.cpp): checked here before outputs are allocated
MAX_STEPS = 10000  # the C runtime's num_steps limit (sd3_request.cpp kMaxSteps), checked here so callers can check it first
_DTYPES = {np.dtype(np.float32): 0, np.dtype(np.int64): 3, np.dtype(np.int32): 4}  # slim_dtype


class _TensorArg:
    """Keeps a numpy array and its shape buffer alive while the C struct points at them."""

    def __init__(self, arr: np.ndarray):
        if arr.dtype not in _DTYPES:
            raise TypeError(f"dtype {arr.dtype} is not a slim_dtype (float32, int64, int32)")
        self.arr = arr
        self.shape = (ctypes.c_int64 * arr.ndim)(*arr.shape)
        self.struct = SlimTensor(arr.ctypes.data, _DTYPES[arr.dtype], 1, 0, arr.ndim, self.shape, None)

    def pointer(self):
        return ctypes.pointer(self.struct)


@dataclasses.dataclass
class GenerateResult:
    latents: np.ndarray
    # steps, blocks_run, stage_calls, effective_nfe, flop_fraction, total_ms, backend_ms, transfer_bytes (caller memory <->
    # the session's buffers: the request and the result), per_step, per_stage
    stats: dict
    # With Session.profiling on: the runtime's timed events, in the order they ended (slim_event), each
    # {kind: generation|prepare|step|stage|bank|block (tokenize|decode|image: generate(prompt=...)'s, see ImageResult.spans), step, block, stage (name or None), level (step level name or None),
    #  action (block events: BLOCK_ACTIONS name, else None), start_ns, end_ns (host steady clock), device_ns (None: not
    #  measured)}. Block events only with Session.profiling = "blocks". Empty when profiling is off.
    # EmbedResult and ScoreResult carry the same list: the call ("generation"), its stage call and its "bank" work.
    events: list[dict] = dataclasses.field(default_factory=list)


_ENCODER_ROLES = ("clip_l", "clip_g", "t5")


def _progress_callback(progress, raised: list):
    """slim_progress for a Python `progress(phase, step, total)`: an exception it raises (Ctrl-C too) must not unwind
    through C, so it is kept in `raised` and the call is cancelled; the caller raises it after the call returns."""
    if progress is None:
        return _native.Progress()

    def report(_user, phase, step, total):
        try:
            progress(_native.PHASES[phase] if 0 <= phase < len(_native.PHASES) else str(phase), step, total)
            return 0
        except BaseException as e:
            raised.append(e)
            return 1

    return _native.Progress(report)


def _check_progress(status: int, raised: list) -> None:
    """A call's status, or the exception its progress callback raised (which cancelled it)."""
    if raised:
        raise raised[0]
    _check(status)


@dataclasses.dataclass
class ImageResult:
    """generate(prompt=...)'s result."""

    image: np.ndarray  # uint8 RGB, [H, W, 3] for a prompt given as a str, [B, H, W, 3] for a list of prompts
    latents: np.ndarray  # the sampled latents [B, C, h, w], before the VAE's scaling
    # generate's stats (GenerateResult.stats: total_ms is the sampling call's), plus: stage_ms {tokenize, clip_l, clip_g, t5
    # (encoders run by this call; 0 on a cache hit), steps (the sampling call's total_ms), vae_decode (with the uint8
    # conversion)}; encoder_calls {role: calls}; prompt_cache {hits, misses (per prompt text of the call, the negative ones
    # included; a text found earlier in the same call is a hit), size, capacity} (slim_prompt_stats)
    stats: dict
    events: list[dict] = dataclasses.field(default_factory=list)  # the sampling call's events, as GenerateResult.events
    # The prompt path's own phases, from the runtime's events (with Session.profiling on; slim_generate_prompt records them on the
    # steady clock of every event): {stage: tokenize|clip_l|clip_g|t5|vae_decode, start_ns, end_ns}, in the order they ended;
    # tokenize: one tokenizer call, clip_l/clip_g/t5: one encoder call (none for a text found in the prompt cache), vae_decode:
    # the decode (scaling, the stage, the uint8 conversion). stage_ms sums them (steps: see events).
    spans: list[dict] = dataclasses.field(default_factory=list)

    def pil(self):
        """The image as a PIL.Image (the first one of a batch: use pil_images() for all); needs Pillow."""
        return self.pil_images()[0]

    def pil_images(self) -> list:
        try:
            from PIL import Image
        except ImportError:
            raise ImportError("ImageResult.pil() needs Pillow: pip install pillow") from None
        images = self.image if self.image.ndim == 4 else self.image[None]
        return [Image.fromarray(image, mode="RGB") for image in images]


def parse_device(device: str) -> tuple[int, int]:
    """"cpu", "cuda" or "cuda:N" -> (slim_device_type, device_id)."""
    if not isinstance(device, str):
        raise TypeError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    kind, sep, index = device.partition(":")
    if kind == "cpu" and not sep:
        return _native.DEVICE_CPU, 0
    if kind == "cuda" and (not sep or index.isdigit()):
        return _native.DEVICE_CUDA, _integer(int(index or 0), "the CUDA device index", 0, INT32_MAX)
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


class _CallGate:
    """The calls running on a handle: close() refuses new ones and waits for these before the C handle is
    freed. An exclusive gate (a session) refuses a second concurrent call with SLIM_ERR_BUSY.

    After os.fork(), the child has only the thread that forked: a call another thread was running is
    not running there, and the handle's state (its locks, its buffers) is that call's, mid-way. Such a
    handle refuses every call in the child, and closing it there frees nothing (waiting would never
    end); a handle no thread was using works as before."""

    _live: weakref.WeakSet = weakref.WeakSet()

    def __init__(self, what: str, exclusive: bool):
        self._what, self._exclusive = what, exclusive
        self._cond = threading.Condition()
        self._calls, self._closed, self._forked_busy = 0, False, False
        self._owner, self._free_later = None, None  # the thread in the exclusive call; close(free) from inside it
        _CallGate._live.add(self)

    def _after_fork_in_child(self) -> None:
        self._cond = threading.Condition()  # another thread may have held the old one's lock at the fork
        self._forked_busy = self._forked_busy or self._calls > 0
        self._calls = 0

    @contextlib.contextmanager
    def call(self):
        with self._cond:
            if self._closed:
                raise SlimError("SLIM_ERR_INVALID_ARGUMENT", f"the {self._what} is closed")
            if self._forked_busy:
                raise SlimError("SLIM_ERR_INVALID_ARGUMENT", f"the {self._what} was in use by another thread when this process was "
                                "forked: its state belongs to that call, which this process does not have; open it again in this "
                                "process (closing this one here frees nothing)")
            if self._exclusive and self._calls:
                raise SlimError("SLIM_ERR_BUSY", f"the {self._what} is in use by another thread (a session runs one call at a "
                                                 "time: create one session per thread)")
            self._calls += 1
            self._owner = threading.get_ident()
        free = None
        try:
            yield
        finally:
            with self._cond:
                self._calls -= 1
                self._owner = None
                if not self._calls:
                    free, self._free_later = self._free_later, None
                self._cond.notify_all()
            if free is not None:
                free()

    def close(self, free=None) -> bool:
        """True for the one caller that must now free the handle (no call runs, none can start). Called by the thread
        whose call runs (a progress callback closing its own session), it would wait for itself: then `free` (when
        given) runs as that call ends, and close() returns False."""
        with self._cond:
            if self._closed:
                return False
            self._closed = True
            if self._forked_busy:
                return False
            if self._calls and self._owner == threading.get_ident() and free is not None:
                self._free_later = free
                return False
            while self._calls:
                self._cond.wait()
            return True


def _gates_after_fork_in_child() -> None:
    for gate in list(_CallGate._live):
        gate._after_fork_in_child()


os.register_at_fork(after_in_child=_gates_after_fork_in_child)


class _Closable:
    """A C handle freed by close(), which waits for calls running on it in other threads; also a context
    manager, and closed when collected."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_gate", None) is not None:  # a constructor that failed has nothing to free
            self.close()


class Engine(_Closable):
    """A loaded bundle; read-only and shareable between threads. Close it or use it as a context manager.

    device: "cpu" (default) or "cuda[:N]": every stage on ONNX Runtime's CUDA execution provider, which needs
    onnxruntime-gpu (slimengine[gpu]); the buffers between stages are on the device where the build has CUDA kernels,
    else (or with host_buffers=True) in host memory.

    verify: "fast" (default: the manifest against its digest, every file listed, regular and of its size, the stage
    graphs' sha256; seconds) or "full" (also the sha256 of every weight file: reads the whole bundle). See
    docs/bundle-format.md, "Integrity"."""

    _handle = None

    def __init__(self, path: str | Path, onnxruntime_library: str | None = None, intra_op_threads: int = 0, device: str = "cpu", *,
                 verify: str = "fast", host_buffers: bool = False):
        level = _verify_level(verify)
        lib = _native.lib()
        path_bytes = c_path(path, "path")
        params = _native.params(_native.EngineParams)
        params.host_buffers = _flag(host_buffers, "host_buffers")
        params.device_type, params.device_id = parse_device(device)
        params.intra_op_threads = _integer(intra_op_threads, "intra_op_threads", 0, INT32_MAX)
        if params.device_type == _native.DEVICE_CUDA:
            import onnxruntime

            if hasattr(onnxruntime, "preload_dlls"):  # onnxruntime-gpu >= 1.21: CUDA, cuDNN from pip packages or torch
                onnxruntime.preload_dlls()
        self._ort_path = c_path(onnxruntime_library if onnxruntime_library is not None else _native.onnxruntime_library(),
                               "onnxruntime_library")
        params.onnxruntime_library = self._ort_path
        params.verify = level
        self.device = device
        handle = ctypes.c_void_p()
        _check(lib.slim_engine_open(path_bytes, ctypes.byref(params), ctypes.byref(handle)))
        self._handle = handle
        self._sessions = weakref.WeakSet()
        self._gate = _CallGate("engine", exclusive=False)  # from here on, close() frees the handle
        self.path = Path(os.fsdecode(path_bytes))
        try:
            self.manifest = loads_strict(lib.slim_engine_manifest(handle))
            self.stage_names = [lib.slim_engine_stage_name(handle, i).decode() for i in range(lib.slim_engine_stage_count(handle))]
            self.info = _engine_info(handle)  # the manifest's family, config and program, typed (EngineInfo)
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            self.close()
            raise SlimError("SLIM_ERR_BUNDLE", f"{path}: manifest is not valid UTF-8 JSON ({e})") from None
        self.config = self.manifest.get("config", {})  # a plain ONNX engine has none
        # config.default_latent_size is checked by the runtime at open (optional; info.default_latent_size is 0 without it)

    def policy_json(self, xslim, num_steps: int | None = None) -> str:
        """An X-Slim policy for slim_generate's xslim_policy: "none", a spec string, an XSlimPolicy or its dict;
        a schedule is checked against the program's steps (or `num_steps`, a plan override's)."""
        if isinstance(xslim, str):
            xslim = parse_xslim_spec(xslim, steps=num_steps or len(self.manifest["program"]["steps"]))
        if isinstance(xslim, XSlimPolicy):
            xslim = xslim.to_manifest()
        return json.dumps(xslim)

    def tokenize(self, role: str, prompt: str) -> np.ndarray:
        """The int64 ids of `prompt` by the bundle's tokenizer `role` (see tokenizer_roles): exactly the ids transformers'
        tokenizer gives with diffusers' SD3 call (max_length 77 for clip_l/clip_g, max_sequence_length for t5), computed in
        the C runtime (slim_tokenize; docs/tokenizers.md)."""
        if not isinstance(role, str) or not isinstance(prompt, str):
            raise TypeError(f"role and prompt must be str, got {type(role).__name__} and {type(prompt).__name__}")
        lib = _native.lib()
        role_b, prompt_b = c_string(role, "role"), c_string(prompt, "prompt")
        count = ctypes.c_size_t()
        with self._gate.call():
            # Capacity 0 only sizes the buffer (its own failure, e.g. an unknown role, is reported by the second call).
            lib.slim_tokenize(self._handle, role_b, prompt_b, None, 0, ctypes.byref(count))
            ids = np.zeros(max(count.value, 1), dtype=np.int64)
            _check(lib.slim_tokenize(self._handle, role_b, prompt_b, ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), ids.size,
                                     ctypes.byref(count)))
        return ids[: count.value]

    @property
    def tokenizer_roles(self) -> list[str]:
        """The roles of the bundle's tokenizers (clip_l, clip_g, t5), in manifest order."""
        lib = _native.lib()
        with self._gate.call():
            return [lib.slim_engine_tokenizer_role(self._handle, i).decode() for i in range(lib.slim_engine_tokenizer_count(self._handle))]

    def session(self, *, prompt_cache: int = 16) -> Session:
        """A new session. `prompt_cache`: how many encoded prompt texts the session keeps for generate(prompt=...) (the
        runtime's LRU, slim_session_set_prompt_cache; 0: none, at most 1024)."""
        with self._gate.call():
            session = Session(self, prompt_cache=prompt_cache)
            self._sessions.add(session)
            return session

    def close(self) -> None:
        """Free the engine; its sessions are closed first, each after the call it is running returns."""
        if self._gate.close():
            for session in list(self._sessions):
                session.close()
            _native.lib().slim_engine_close(self._handle)
            self._handle = None


class Session(_Closable):
    """Buffers and caches of one generation at a time; use one session per thread."""

    _handle = None

    def __init__(self, engine: Engine, *, prompt_cache: int = 16):
        capacity = _integer(prompt_cache, "prompt_cache", 0, _native.PROMPT_CACHE_MAX)
        lib = _native.lib()
        handle = ctypes.c_void_p()
        _check(lib.slim_session_create(engine._handle, ctypes.byref(handle)))
        status = lib.slim_session_set_prompt_cache(handle, capacity)
        if status:
            lib.slim_session_destroy(handle)
            _check(status)
        self._engine = engine
        self._handle = handle
        self._profiling = False
        self._gate = _CallGate("session", exclusive=True)

    @property
    def profiling(self) -> bool | str:
        """Record timed events in the runtime (generate: per stage call, step and generation; embed and score: per
        call, its stage call and its bank work), returned as the results' `events`; off by default. "blocks" also
        records, in generate, one "block" event per joint block per step with the planner's `action` for it
        (BLOCK_ACTIONS; docs/runtime-loop.md)."""
        return self._profiling

    @profiling.setter
    def profiling(self, enabled: bool | str) -> None:
        if isinstance(enabled, str) and enabled != "blocks":
            raise ValueError(f'profiling must be True, False or "blocks", got {enabled!r}')
        flags = 0 if not enabled else PROFILE_ON | (PROFILE_BLOCKS if enabled == "blocks" else 0)
        with self._gate.call():
            _check(_native.lib().slim_session_set_profiling(self._handle, flags))
            self._profiling = enabled if enabled == "blocks" else bool(enabled)

    def generate(self, prompt_embeds=None, pooled_embeds=None, *, prompt=None, negative_prompt=None, seed=0, latents=None,
                 negative_prompt_embeds=None, negative_pooled_embeds=None, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, xslim_threshold: float | None = None, xslim=None,
                 num_steps: int | None = None, shift: float | None = None, progress=None) -> GenerateResult | ImageResult:
        """Run the bundle's sampling program. `latents` (float32 [B,C,H,W]) replaces seeded noise; otherwise
        height/width (latent pixels) default to the bundle's default size (required when its manifest states none).
        `seed`: an int (row b draws its noise from seed + b) or one int per row (a list, tuple or 1-d array); a row's
        noise depends on its seed alone, so each row is the image that row gives generated alone with that seed (unless
        an online X-Slim policy reuses work: its decisions look at the whole batch).
        `xslim` overrides the bundle's X-Slim policy: "none", a spec ("xslim:step=0.1,critical=0.3", see export-engine --help) or an
        XSlimPolicy; `xslim_threshold` alone asks for step-level reuse with that line (0: off).
        `num_steps` replaces the program by a plain plan on the same stages: that many steps with
        diffusers' scheduler sigmas for `shift` (default: the bundle's pipeline scheduler shift, else 3.0), every
        block every step.

        With `prompt` (a str, or a list of str for a batch) instead of embeddings: prompt to image on a bundle
        with pipeline stages (docs/pipeline.md, "Runtime"): the bundle's tokenizers and text encoders make the
        conditioning (`negative_prompt`, default "", for CFG), the program samples, the VAE decodes. height/width
        are then image pixels.
        Returns an ImageResult (uint8 RGB image). One runtime call does it all (slim_generate_prompt); the session's
        prompt cache (Engine.session(prompt_cache=N), clear_prompt_cache) spares the encoders a text seen before.

        `progress(phase, step, total)` is called from this thread: "step" after each sampling step (step 0 to total - 1),
        and with a prompt "encode" before the encoders, "tokenize" before each tokenizer call of a text it encodes (step 0
        clip_l, 1 clip_g, 2 t5 of total 2 or 3) and "decode" before the VAE (step 0, total 1). An exception it
        raises cancels the call (nothing is returned; the session stays usable) and is raised here."""
        if prompt is not None:
            if prompt_embeds is not None or pooled_embeds is not None or negative_prompt_embeds is not None \
                    or negative_pooled_embeds is not None:
                raise TypeError("generate: give prompt (text) or prompt_embeds/pooled_embeds (embeddings), not both")
            with self._gate.call():
                return self._generate_prompt(prompt, negative_prompt, seed=seed, latents=latents, guidance_scale=guidance_scale,
                                             height=height, width=width, xslim_threshold=xslim_threshold, xslim=xslim,
                                             num_steps=num_steps, shift=shift, progress=progress)
        if negative_prompt is not None:
            raise TypeError("generate: negative_prompt goes with prompt (text); with embeddings give negative_prompt_embeds")
        with self._gate.call():
            return self._generate(prompt_embeds, pooled_embeds, seed=seed, latents=latents,
                                  negative_prompt_embeds=negative_prompt_embeds, negative_pooled_embeds=negative_pooled_embeds,
                                  guidance_scale=guidance_scale, height=height, width=width,
                                  xslim_threshold=xslim_threshold, xslim=xslim, num_steps=num_steps, shift=shift,
                                  progress=progress)

    def _generate(self, prompt_embeds, pooled_embeds, *, seed, latents, negative_prompt_embeds, negative_pooled_embeds, guidance_scale,
                  height, width, xslim_threshold, xslim, num_steps, shift, progress) -> GenerateResult:
        """generate() with embeddings; the caller holds the session's gate."""
        lib = _native.lib()
        if self._engine.manifest.get("family") != "sd3":
            raise SlimError("SLIM_ERR_INVALID_ARGUMENT", f"generate: the engine's family is '{self._engine.manifest.get('family')}'; "
                            "slim_generate runs sd3 bundles (use embed, score or run_stage)")
        cfg = self._engine.config
        args = {name: _as_float32(x, name) for name, x in [("prompt_embeds", prompt_embeds), ("pooled_embeds", pooled_embeds),
                ("negative_prompt_embeds", negative_prompt_embeds), ("negative_pooled_embeds", negative_pooled_embeds),
                ("latents", latents)]}
        if args["prompt_embeds"] is None or args["prompt_embeds"].ndim < 1:
            raise ValueError("prompt_embeds must be a float32 array [B, L, joint_attention_dim]")
        batch = args["prompt_embeds"].shape[0]
        if args["latents"] is not None and args["latents"].ndim == 4:
            shape = args["latents"].shape
        else:
            shape = (batch, cfg["out_channels"], self._latent_side(height, "height"), self._latent_side(width, "width"))
        if batch > MAX_BATCH:  # checked before the output is allocated
            raise ValueError(f"prompt_embeds: batch {batch} is over the runtime's limit of {MAX_BATCH}")
        params = _native.params(_native.GenerateParams)
        params.seed, seeds = _seeds(seed, batch)
        params.seeds = seeds
        if guidance_scale is not None:  # None: the bundle's (C's sentinel is any negative value)
            params.guidance_scale = _real(guidance_scale, "guidance_scale", 0)
        if xslim_threshold is not None:  # None: the bundle's policy
            params.xslim_threshold = _real(xslim_threshold, "xslim_threshold", 0)
        if num_steps is not None:
            params.num_steps = _integer(num_steps, "num_steps", 1, MAX_STEPS)
        if shift is not None:
            params.shift = _real(shift, "shift", 0, above=True)
        if xslim is not None:
            params.xslim_policy = c_string(self._engine.policy_json(xslim, num_steps), "xslim")
        out = np.empty(shape, dtype=np.float32)
        tensors = {k: _TensorArg(v) for k, v in args.items() if v is not None}
        for name, t in tensors.items():
            setattr(params, name, t.pointer())
        out_arg = _TensorArg(out)
        stats = GenerateStats(struct_size=ctypes.sizeof(GenerateStats))
        raised = []
        params.progress = callback = _progress_callback(progress, raised)  # kept alive (callback) until the call returns
        status = lib.slim_generate(self._handle, ctypes.byref(params), out_arg.pointer(), ctypes.byref(stats))
        del callback
        _check_progress(status, raised)
        return GenerateResult(latents=out, stats=self._stats(stats), events=self._events())

    def _generate_prompt(self, prompt, negative_prompt, *, seed, latents, guidance_scale, height, width, xslim_threshold, xslim,
                         num_steps, shift, progress) -> ImageResult:
        """Prompt to image through slim_generate_prompt (docs/pipeline.md); the caller holds the session's gate."""
        lib, engine = _native.lib(), self._engine
        pipeline = engine.manifest.get("pipeline")
        if pipeline is None:
            raise SlimError("SLIM_ERR_INVALID_ARGUMENT", f"generate(prompt=...): {engine.path} has no pipeline stages (no manifest "
                            "pipeline block); export it with export-engine PIPELINE_FOLDER, or a transformer checkpoint with "
                            "--pipeline PIPELINE_FOLDER")
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a str or a non-empty list of str, got {prompt!r}")
        negatives = [""] * len(prompts) if negative_prompt is None else [negative_prompt] * len(prompts) \
            if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts) or not all(isinstance(p, str) for p in negatives):
            raise TypeError(f"negative_prompt must be a str or a list of str as long as prompt ({len(prompts)}), got {negative_prompt!r}")
        if len(prompts) > MAX_BATCH:  # checked before the outputs are allocated
            raise ValueError(f"prompt: batch {len(prompts)} is over the runtime's limit of {MAX_BATCH}")
        texts = [c_string(t, "prompt") for t in prompts] + [c_string(t, "negative_prompt") for t in negatives]
        factor, channels = pipeline["vae"]["scale_factor"], self._engine.config["out_channels"]
        latents = _as_float32(latents, "latents")
        if latents is not None and latents.ndim == 4:  # their size is the image's (checked by the runtime)
            height, width = latents.shape[2] * factor, latents.shape[3] * factor
        else:
            height, width = (factor * (self._latent_side(None, name) if v is None else self._image_side(v, name, factor))
                             for v, name in ((height, "height"), (width, "width")))
        params = _native.params(_native.PromptParams)
        batch = len(prompts)
        params.prompts = (ctypes.c_char_p * batch)(*texts[:batch])
        params.negative_prompts = (ctypes.c_char_p * batch)(*texts[batch:])
        params.prompt_count, params.height, params.width = batch, height, width
        params.seed, seeds = _seeds(seed, batch)
        params.seeds = seeds
        if guidance_scale is not None:  # None: the bundle's
            params.guidance_scale = _real(guidance_scale, "guidance_scale", 0)
        if xslim_threshold is not None:
            params.xslim_threshold = _real(xslim_threshold, "xslim_threshold", 0)
        if num_steps is not None:
            params.num_steps = _integer(num_steps, "num_steps", 1, MAX_STEPS)
        if shift is not None:  # None: the pipeline's scheduler shift (the runtime's 0)
            params.shift = _real(shift, "shift", 0, above=True)
        if xslim is not None:
            params.xslim_policy = c_string(engine.policy_json(xslim, num_steps), "xslim")
        latents_arg = _TensorArg(latents) if latents is not None else None
        if latents_arg is not None:
            params.latents = latents_arg.pointer()
        image = np.empty((batch, height, width, 3), np.uint8)
        out = np.empty((batch, channels, height // factor, width // factor), np.float32)
        stats = _native.PromptStats(struct_size=ctypes.sizeof(_native.PromptStats))
        raised = []
        params.progress = callback = _progress_callback(progress, raised)
        status = lib.slim_generate_prompt(self._handle, ctypes.byref(params), image.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                          image.size, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size, ctypes.byref(stats))
        del callback
        _check_progress(status, raised)

        roles = [r for r in _ENCODER_ROLES if r in engine.stage_names]
        result = self._stats(stats)  # the sampling's totals (PromptStats has slim_generate_stats' fields), steps and stages
        result["total_ms"] = stats.steps_ms  # as generate's stats: the sampling call's
        result["stage_ms"] = {"tokenize": stats.tokenize_ms, **{r: getattr(stats, f"{r}_ms") for r in roles}, "steps": stats.steps_ms,
                              "vae_decode": stats.vae_decode_ms}
        result["encoder_calls"] = {r: stats.prompt_cache_misses for r in roles}  # each text encoded runs every encoder once
        result["prompt_cache"] = {"hits": stats.prompt_cache_hits, "misses": stats.prompt_cache_misses, "size": stats.prompt_cache_size,
                                  "capacity": stats.prompt_cache_capacity}
        # The runtime's events: the prompt path's phases become spans; the rest are the sampling call's (as generate's).
        events, spans = [], []
        for e in self._events():
            phase = {"tokenize": "tokenize", "decode": "vae_decode"}.get(e["kind"])
            if e["kind"] == "stage" and e["step"] == -1:  # an encoder's call, or the VAE's inside the decode span
                phase = e["stage"] if e["stage"] in roles else None
            elif phase is None and e["kind"] != "image":
                events.append(e)
                continue
            if phase is not None:
                spans.append({"stage": phase, "start_ns": e["start_ns"], "end_ns": e["end_ns"]})
        return ImageResult(image=image[0] if single else image, latents=out, stats=result, events=events, spans=spans)

    def _image_side(self, size, name: str, factor: int) -> int:
        """An image height or width in pixels -> latent pixels, checked in image pixels."""
        size, cfg = _integer(size, name, 1, INT32_MAX), self._engine.config
        step, limit = factor * cfg["patch_size"], factor * cfg["max_latent_size"]
        if size % step or size > limit:
            raise ValueError(f"{name} must be a multiple of {step} (the VAE's scale factor {factor} x the patch size "
                             f"{cfg['patch_size']}) up to {limit} (image pixels), got {size}")
        return size // factor

    def clear_prompt_cache(self) -> None:
        """Forget the encoded prompt texts the session keeps for generate(prompt=...) (slim_session_clear_prompt_cache)."""
        with self._gate.call():
            _check(_native.lib().slim_session_clear_prompt_cache(self._handle))

    def _latent_side(self, size, name: str) -> int:
        """A requested latent height or width, checked against the model before anything is allocated."""
        cfg = self._engine.config
        if size is None:
            default = self._engine.info.default_latent_size  # checked by the runtime at open; 0: the manifest states none
            if default == 0:
                raise ValueError(f"{name}: the bundle's manifest states no default latent size (config.default_latent_size); "
                                 "pass height and width (latent pixels), or latents")
            return default
        size, patch, limit = _integer(size, name, 1, INT32_MAX), cfg["patch_size"], cfg["max_latent_size"]
        if size % patch or size > limit:
            raise ValueError(f"{name} must be a multiple of {patch} up to {limit} (latent pixels), got {size}")
        return size

    def _stats(self, s: GenerateStats | _native.PromptStats) -> dict:
        """generate's stats dict from the call's totals (slim_generate_stats' fields) and the session's step and stage stats."""
        lib = _native.lib()
        per_step = []
        for i in range(lib.slim_session_step_count(self._handle)):
            st = StepStats(struct_size=ctypes.sizeof(StepStats))
            _check(lib.slim_session_step_stats(self._handle, i, ctypes.byref(st)))
            per_step.append({"sigma": st.sigma, "sigma_next": st.sigma_next, "blocks_run": st.blocks_run,
                             "blocks_reused": st.blocks_reused, "tokens_computed": st.tokens_computed,
                             "flop_fraction": st.flop_fraction, "level": STEP_LEVELS[st.level], "ms": st.ms})
        per_stage = {}
        for i, name in enumerate(self._engine.stage_names):
            st = StageStats(struct_size=ctypes.sizeof(StageStats))
            _check(lib.slim_session_stage_stats(self._handle, i, ctypes.byref(st)))
            per_stage[name] = {"calls": st.calls, "ms": st.total_ms}
        return {"steps": s.steps, "blocks_run": s.blocks_run, "stage_calls": s.stage_calls, "effective_nfe": s.effective_nfe,
                "flop_fraction": s.flop_fraction, "total_ms": s.total_ms, "backend_ms": s.backend_ms, "transfer_bytes": s.transfer_bytes,
                "per_step": per_step, "per_stage": per_stage}

    def _events(self) -> list[dict]:
        lib = _native.lib()
        events = []
        for i in range(lib.slim_session_event_count(self._handle)):
            e = Event(struct_size=ctypes.sizeof(Event))
            _check(lib.slim_session_event(self._handle, i, ctypes.byref(e)))
            if e.kind >= len(EVENT_KINDS):
                continue  # a kind newer than this binding
            kind = EVENT_KINDS[e.kind]
            level = STEP_LEVELS[e.level] if e.level >= 0 and kind != "block" else None
            events.append({"kind": kind, "step": e.step, "block": e.block,
                           "stage": self._engine.stage_names[e.stage] if e.stage >= 0 else None, "level": level,
                           "action": BLOCK_ACTIONS[e.level] if kind == "block" else None, "start_ns": e.start_ns,
                           "end_ns": e.end_ns, "device_ns": e.device_ns if e.device_ns >= 0 else None})
        return events

    def embed(self, text_ids, frames, *, segment_ids=None, bank: MemoryBank | None = None, document_ids=None,
              model_version: int | None = None) -> EmbedResult:
        """LEMUR document embeddings [B, embed_dim] of token ids [B, L] (0 pads) and frames [B, F, 3, S, S];
        with `bank` and `document_ids`, also upserted into the bank (tagged with the bundle's model version)."""
        lib = _native.lib()
        if frames is None:
            raise TypeError("frames is required: float32 [B, F, 3, S, S]")
        if bank is not None and not isinstance(bank, MemoryBank):
            raise TypeError(f"bank must be a MemoryBank or None, got {type(bank).__name__}")
        args = {"text_ids": _TensorArg(_as_int64(text_ids, "text_ids")), "frames": _TensorArg(_as_float32(frames, "frames"))}
        if segment_ids is not None:
            args["segment_ids"] = _TensorArg(_as_int64(segment_ids, "segment_ids"))
        if document_ids is not None:
            args["document_ids"] = _TensorArg(_as_int64(document_ids, "document_ids"))
        params = _native.params(_native.EmbedParams)
        for name, t in args.items():
            setattr(params, name, t.pointer())
        if model_version is not None:
            params.model_version = _integer(model_version, "model_version", 0, UINT32_MAX)
        batch = args["text_ids"].arr.shape[0] if args["text_ids"].arr.ndim else 0
        out = np.empty((batch, self._engine.config.get("embed_dim", 0)), dtype=np.float32)
        stats = LemurStats(struct_size=ctypes.sizeof(LemurStats))
        with self._gate.call(), bank._handle if bank is not None else contextlib.nullcontext() as bank_handle:
            params.bank = bank_handle
            _check(lib.slim_embed(self._handle, ctypes.byref(params), _TensorArg(out).pointer(), ctypes.byref(stats)))
            return EmbedResult(embeddings=out, stats=_lemur_stats(stats), events=self._events())

    def score(self, bank: MemoryBank, history_ids, query_ids, *, skip_missing: bool = False, min_model_version: int = 0) -> ScoreResult:
        """LEMUR click probabilities [B]: each row's history (document ids [B, H], -1 pads) is assembled from
        `bank`; an id that is missing (or older than min_model_version) is an error unless skip_missing."""
        lib = _native.lib()
        if not isinstance(bank, MemoryBank):
            raise TypeError(f"bank must be a MemoryBank (history embeddings come from it), got {type(bank).__name__}")
        history = _TensorArg(_as_int64(history_ids, "history_ids"))
        query = _TensorArg(_as_int64(query_ids, "query_ids"))
        params = _native.params(_native.ScoreParams)
        params.history_ids, params.query_ids = history.pointer(), query.pointer()
        params.missing_policy = 1 if skip_missing else 0
        params.min_model_version = _integer(min_model_version, "min_model_version", -INT64_MAX - 1, INT64_MAX)
        out = np.empty((history.arr.shape[0] if history.arr.ndim else 0,), dtype=np.float32)
        stats = LemurStats(struct_size=ctypes.sizeof(LemurStats))
        with self._gate.call(), bank._handle as bank_handle:
            params.bank = bank_handle
            _check(lib.slim_score(self._handle, ctypes.byref(params), _TensorArg(out).pointer(), ctypes.byref(stats)))
            return ScoreResult(scores=out, stats=_lemur_stats(stats), events=self._events())

    def run_stage(self, stage: str, inputs: dict, outputs: dict) -> dict:
        """Run one stage (any family; "model" for a plain .onnx engine) with numpy inputs by name; `outputs`
        maps output names to preallocated arrays of the expected shape, which are filled and returned."""
        with self._gate.call():
            return self._run_stage(stage, inputs, outputs)

    def _run_stage(self, stage: str, inputs: dict, outputs: dict) -> dict:
        """run_stage(); the caller holds the session's gate."""
        lib = _native.lib()
        if not isinstance(stage, str):
            raise TypeError(f"stage must be a stage name (str), got {stage!r}")
        for what, items in (("inputs", inputs), ("outputs", outputs)):
            if not isinstance(items, dict) or not all(isinstance(name, str) for name in items):
                raise TypeError(f"{what} must be a dict of tensor name (str) -> array, got {type(items).__name__}")
        keep = []

        def named(items):
            array = (NamedTensor * max(len(items), 1))()
            for i, (name, arr) in enumerate(items.items()):
                t = _TensorArg(np.ascontiguousarray(arr) if isinstance(arr, np.ndarray) else np.asarray(arr))
                keep.append(t)
                array[i] = NamedTensor(c_string(name, "tensor name"), t.struct)
            return array

        out_arrays = {}
        for name, arr in outputs.items():
            if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous:
                raise TypeError(f"output {name}: pass a C-contiguous numpy array to fill")
            out_arrays[name] = arr
        _check(lib.slim_stage_run(self._handle, c_string(stage, "stage"), named(inputs), len(inputs), named(out_arrays), len(out_arrays)))
        return out_arrays

    def close(self) -> None:
        """Free the session, after the call another thread may be running on it returns (called from that call's
        progress callback: when the call returns)."""
        if self._gate.close(free=self._free):
            self._free()

    def _free(self) -> None:
        _native.lib().slim_session_destroy(self._handle)
        self._handle = None


@dataclasses.dataclass
class EmbedResult:
    embeddings: np.ndarray
    stats: dict  # batch, total_ms, backend_ms, bank_ms
    events: list[dict] = dataclasses.field(default_factory=list)  # with Session.profiling: as GenerateResult.events


@dataclasses.dataclass
class ScoreResult:
    scores: np.ndarray
    stats: dict  # batch, history_found, history_missing, total_ms, backend_ms, bank_ms
    events: list[dict] = dataclasses.field(default_factory=list)  # with Session.profiling: as GenerateResult.events


def _lemur_stats(s: LemurStats) -> dict:
    return {"batch": s.batch, "history_found": s.history_found, "history_missing": s.history_missing, "total_ms": s.total_ms,
            "backend_ms": s.backend_ms, "bank_ms": s.bank_ms}


@dataclasses.dataclass
class LookupResult:
    embeddings: np.ndarray  # [N, dim], zeros where missing
    found: np.ndarray  # [N] bool
    write_times_us: np.ndarray  # [N] int64, microseconds since the epoch; -1 where missing
    model_versions: np.ndarray  # [N] int64; -1 where missing


@dataclasses.dataclass(frozen=True)
class BankRecovery:
    """What opening a bank (and a reader's refreshes) found (docs/memory-bank.md, "Damage")."""

    damaged_records: int  # records with one flipped bit, corrected in memory: a delete applied, an upserted id hidden
    first_damaged_offset: int  # byte offset of the first damaged record; -1: none
    tail_bytes: int  # at open: bytes after the last whole write call (a call a crash cut short); a writer truncated them
    header_corrected: int  # 1: the header had one flipped bit, corrected in memory


@dataclasses.dataclass(frozen=True)
class BankRepair:
    """What MemoryBank.repair found and kept (docs/memory-bank.md, "Repair")."""

    header: int  # 0 intact; 1 one flipped bit, corrected; 2 damaged beyond that, rebuilt from the records
    records: int  # records in the old file, up to the end of its last whole write call
    corrected_records: int  # records with one flipped bit: restored
    unreadable_records: int  # records damaged beyond correction: which id each wrote or deleted is unknown
    dropped_records: int  # intact records of the write calls that held an unreadable record
    hidden_ids: int  # ids live before an unreadable record, left out: any may be the one it deleted
    ids: int  # ids in the repaired bank
    tail_bytes: int  # bytes after the last whole write call (a torn tail), left out


_compiled_bound = False


def _bank_guard(handle: ctypes.c_void_p, dim: int) -> _BankGuard:
    """A bank handle's compiled guard and lookup (slimengine._calls, runtime/python/ext/calls.cpp), which calls the functions of
    the library this binding loaded: their addresses are bound once, here."""
    global _compiled_bound
    if not _compiled_bound:
        lib = _native.lib()
        names = ("slim_bank_lookup", "slim_bank_close", "slim_last_error", "slim_status_name")
        _bind_compiled({name: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in names}, SlimError, _as_int64)
        _compiled_bound = True
    return _BankGuard(handle.value, dim)


class MemoryBank(_Closable):
    """The durable document-id -> embedding store (docs/memory-bank.md). One writer per file; readers
    open with read_only=True and call refresh() to see the writer's appends. Thread-safe. Only the
    process that opened a bank may write through it: after os.fork(), open it again in the child.
    Records (or a header) with one flipped bit are corrected in memory and reported by a RuntimeWarning and by
    `recovery`; damage beyond that makes opening raise SlimError until `MemoryBank.repair(path)`."""

    _handle = None

    def __init__(self, path: str | Path, dim: int = 0, *, read_only: bool = False, create: bool = True, sync_writes: bool = False):
        lib = _native.lib()
        path_bytes = c_path(path, "path")  # checked first: MemoryBank(None) created a file named "None", and kept it open
        params = _native.params(_native.BankParams)
        params.dim = _integer(dim, "dim", 0, INT32_MAX)
        params.read_only, params.create, params.sync_writes = int(read_only), int(create), int(sync_writes)
        handle = ctypes.c_void_p()
        _check(lib.slim_bank_open(path_bytes, ctypes.byref(params), ctypes.byref(handle)))
        self.dim = lib.slim_bank_dim(handle)
        # The handle's lifetime guard and its lookup, compiled (_calls.Bank): `with self._handle as h:` is a call in
        # flight on h, which close() waits for. From here on, close() (and collection) frees the handle.
        self._handle = _bank_guard(handle, self.dim)
        self.path = Path(os.fsdecode(path_bytes))
        self._warned_damage = 0
        self._warn_about_damage()

    @property
    def recovery(self) -> BankRecovery:
        """What opening (and later refreshes) found damaged inside the log and skipped (docs/memory-bank.md, Damage)."""
        out = _native.BankRecovery(struct_size=ctypes.sizeof(_native.BankRecovery))
        with self._handle as handle:
            _check(_native.lib().slim_bank_recovery_info(handle, ctypes.byref(out)))
        return BankRecovery(out.damaged_records, out.first_damaged_offset, out.tail_bytes, out.header_corrected)

    @staticmethod
    def repair(path: str | Path) -> BankRepair:
        """Rewrite the bank at `path` with every id it can prove live (docs/memory-bank.md, "Repair"): corrected records
        restored, no deleted id, none written before a record damaged beyond correction; a header damaged beyond
        correction rebuilt from the records. No writer may have it open; readers must open it again."""
        path_bytes = c_path(path, "path")
        out = _native.BankRepairReport(struct_size=ctypes.sizeof(_native.BankRepairReport))
        _check(_native.lib().slim_bank_repair(path_bytes, ctypes.byref(out)))
        return BankRepair(out.header, out.records, out.corrected_records, out.unreadable_records, out.dropped_records,
                          out.hidden_ids, out.ids, out.tail_bytes)

    def _warn_about_damage(self) -> None:
        r = self.recovery
        damage = r.damaged_records + r.header_corrected
        if damage > self._warned_damage:
            self._warned_damage = damage
            what = [f"{r.damaged_records} record(s) inside the log (the first at byte {r.first_damaged_offset})"] if r.damaged_records else []
            what += ["the header"] if r.header_corrected else []
            warnings.warn(f"memory bank {self.path}: {' and '.join(what)} had one flipped bit, corrected in memory: deletes applied, "
                          "upserted ids among them missing until written again; `slimengine bank repair` rewrites the file "
                          "(docs/memory-bank.md, Damage)", RuntimeWarning, stacklevel=3)

    def __len__(self) -> int:
        with self._handle as handle:
            return _native.lib().slim_bank_count(handle)

    def upsert(self, ids, embeddings, model_version: int = 0) -> None:
        """Insert or replace embeddings [N, dim] (float32, finite) under ids [N] (>= 0); a rejected call writes nothing."""
        ids_arg, emb_arg = _TensorArg(_as_int64(ids, "ids")), _TensorArg(_as_float32(embeddings, "embeddings"))
        model_version = _integer(model_version, "model_version", 0, UINT32_MAX)
        with self._handle as handle:
            _check(_native.lib().slim_bank_upsert(handle, ids_arg.pointer(), emb_arg.pointer(), model_version))

    def delete(self, ids) -> int:
        ids_arg, deleted = _TensorArg(_as_int64(ids, "ids")), ctypes.c_int64()
        with self._handle as handle:
            _check(_native.lib().slim_bank_delete(handle, ids_arg.pointer(), ctypes.byref(deleted)))
        return deleted.value

    def lookup(self, ids) -> LookupResult:
        """The rows of ids [N]: one compiled call (no ctypes), a few microseconds beside the lookup itself."""
        return LookupResult(*self._handle.lookup(ids))

    def flush(self) -> None:
        with self._handle as handle:
            _check(_native.lib().slim_bank_flush(handle))

    def refresh(self) -> int:
        added = ctypes.c_int64()
        with self._handle as handle:
            _check(_native.lib().slim_bank_refresh(handle, ctypes.byref(added)))
        self._warn_about_damage()
        return added.value

    def close(self) -> None:
        """Close the bank, after the calls other threads are running on it return."""
        if self._handle is not None:
            self._handle.close()

    def __del__(self):
        self.close()  # a constructor that failed has no handle


def open_engine(path: str | Path, **options) -> Engine:
    """Load an engine bundle (see Engine for options, e.g. verify="full")."""
    return Engine(path, **options)


def _verify_level(verify: str) -> int:
    if verify not in VERIFY_LEVELS:
        raise ValueError(f'verify must be "fast" or "full", got {verify!r}')
    return VERIFY_LEVELS[verify]


def verify_bundle(path: str | Path, verify: str = "full", progress=None) -> None:
    """Check the bundle at `path` without loading it (what open_engine checks first): raises SlimError (SLIM_ERR_BUNDLE
    naming the file or field at fault, SLIM_ERR_IO) unless it is intact. progress(file, bytes_done, bytes_total) is
    called as files are hashed."""
    level = _verify_level(verify)
    raised = []

    def report(_user, file, done, total):
        try:
            progress(file.decode(errors="replace"), done, total)
            return 0
        except BaseException as e:  # (Ctrl-C too) must not unwind through C: stop the check, raise it after the call
            raised.append(e)
            return 1

    callback = _native.VerifyProgress(report) if progress is not None else _native.VerifyProgress()
    status = _native.lib().slim_bundle_verify(c_path(path, "path"), level, callback, None)
    if raised:
        raise raised[0]
    _check(status)
