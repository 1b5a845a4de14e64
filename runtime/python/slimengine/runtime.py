"""Python binding of the C runtime: Engine, Session, generate."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import weakref
from pathlib import Path

import numpy as np

from . import _native
from ._native import Event, GenerateStats, SlimTensor, StageStats, StepStats

STEP_LEVELS = ("full", "cached_range", "reused", "block_refresh", "token_refresh")  # slim_step_level
EVENT_KINDS = ("generation", "prepare", "step", "stage")  # slim_event_kind


class SlimError(RuntimeError):
    """A runtime call failed; `status` is the C status name, the message is slim_last_error()."""

    def __init__(self, status: str, message: str):
        super().__init__(f"{message} [{status}]")
        self.status = status


def _check(code: int) -> None:
    if code != 0:
        lib = _native.lib()
        raise SlimError(lib.slim_status_name(code).decode(), lib.slim_last_error().decode())


def version() -> str:
    return _native.lib().slim_version().decode()


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


class _TensorArg:
    """Keeps a numpy array and its shape buffer alive while the C struct points at them."""

    def __init__(self, arr: np.ndarray):
        self.arr = arr
        self.shape = (ctypes.c_int64 * arr.ndim)(*arr.shape)
        self.struct = SlimTensor(arr.ctypes.data, 0, 1, 0, arr.ndim, self.shape, None)

    def pointer(self):
        return ctypes.pointer(self.struct)


@dataclasses.dataclass
class GenerateResult:
    latents: np.ndarray
    stats: dict  # steps, blocks_run, stage_calls, effective_nfe, flop_fraction, total_ms, backend_ms, per_step, per_stage
    # With Session.profiling on: the runtime's timed events, in the order they ended (slim_event), each
    # {kind: generation|prepare|step|stage, step, block, stage (name or None), level (step level name or None),
    #  start_ns, end_ns (host steady clock), device_ns (None: not measured)}. Empty when profiling is off.
    events: list[dict] = dataclasses.field(default_factory=list)


def parse_device(device: str) -> tuple[int, int]:
    """"cpu", "cuda" or "cuda:N" -> (slim_device_type, device_id)."""
    kind, sep, index = device.partition(":")
    if kind == "cpu" and not sep:
        return _native.DEVICE_CPU, 0
    if kind == "cuda" and (not sep or index.isdigit()):
        return _native.DEVICE_CUDA, int(index or 0)
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


class Engine:
    """A loaded bundle; read-only and shareable between threads. Close it or use it as a context manager.

    device: "cpu" (default) or "cuda[:N]": every stage on ONNX Runtime's CUDA execution provider, which needs
    onnxruntime-gpu (slimengine[gpu]); the runtime's buffers between stages stay in host memory for now."""

    _handle = None

    def __init__(self, path: str | Path, onnxruntime_library: str | None = None, verify_checksums: bool = True,
                 intra_op_threads: int = 0, device: str = "cpu"):
        lib = _native.lib()
        params = lib.slim_engine_default_params()
        params.device_type, params.device_id = parse_device(device)
        if params.device_type == _native.DEVICE_CUDA:
            import onnxruntime

            if hasattr(onnxruntime, "preload_dlls"):  # onnxruntime-gpu >= 1.21: CUDA, cuDNN from pip packages or torch
                onnxruntime.preload_dlls()
        self._ort_path = (onnxruntime_library or _native.onnxruntime_library()).encode()
        params.onnxruntime_library = self._ort_path
        params.verify_checksums = int(verify_checksums)
        params.intra_op_threads = intra_op_threads
        self.device = device
        handle = ctypes.c_void_p()
        _check(lib.slim_engine_open(str(path).encode(), ctypes.byref(params), ctypes.byref(handle)))
        self._handle = handle
        self.path = Path(path)
        self.manifest = json.loads(lib.slim_engine_manifest(handle).decode())
        self.config = self.manifest["config"]
        self.stage_names = [lib.slim_engine_stage_name(handle, i).decode() for i in range(lib.slim_engine_stage_count(handle))]
        self._sessions = weakref.WeakSet()

    def policy_json(self, cache, num_steps: int | None = None) -> str:
        """An X-Slim policy for slim_generate's cache_policy: "none", a spec string, an XSlimPolicy or its dict;
        a schedule is checked against the program's steps (or `num_steps`, a plan override's)."""
        from .export.xslim import XSlimPolicy, parse_cache_spec

        if isinstance(cache, str):
            cache = parse_cache_spec(cache, steps=num_steps or len(self.manifest["program"]["steps"]))
        if isinstance(cache, XSlimPolicy):
            cache = cache.to_manifest()
        return json.dumps(cache)

    def session(self) -> Session:
        if not self._handle:
            raise SlimError("SLIM_ERR_INVALID_ARGUMENT", "the engine is closed")
        session = Session(self)
        self._sessions.add(session)
        return session

    def close(self) -> None:
        """Free the engine; its sessions are closed first (the C engine must outlive them)."""
        if self._handle:
            for session in list(self._sessions):
                session.close()
            _native.lib().slim_engine_close(self._handle)
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


class Session:
    """Buffers and caches of one generation at a time; use one session per thread."""

    _handle = None

    def __init__(self, engine: Engine):
        handle = ctypes.c_void_p()
        _check(_native.lib().slim_session_create(engine._handle, ctypes.byref(handle)))
        self._engine = engine  # the engine must outlive the session
        self._handle = handle
        self._profiling = False

    @property
    def profiling(self) -> bool:
        """Record timed events (per stage call, step and generation) in the runtime; off by default."""
        return self._profiling

    @profiling.setter
    def profiling(self, enabled: bool) -> None:
        if not self._handle:
            raise SlimError("SLIM_ERR_INVALID_ARGUMENT", "the session is closed (or its engine was closed)")
        _check(_native.lib().slim_session_set_profiling(self._handle, int(bool(enabled))))
        self._profiling = bool(enabled)

    def generate(self, prompt_embeds, pooled_embeds, *, seed: int = 0, latents=None, negative_prompt_embeds=None,
                 negative_pooled_embeds=None, guidance_scale: float | None = None, height: int | None = None,
                 width: int | None = None, step_cache_threshold: float | None = None, cache=None, num_steps: int | None = None,
                 shift: float | None = None) -> GenerateResult:
        """Run the bundle's sampling program. `latents` (float32 [B,C,H,W]) replaces seeded noise; otherwise
        height/width (latent pixels) default to the bundle's default size. `cache` overrides the bundle's
        X-Slim policy: "none", a spec ("xslim:step=0.1,critical=0.3", see export-engine --help) or an
        XSlimPolicy; `step_cache_threshold` alone asks for step-level reuse with that line (0: off).
        `num_steps` replaces the program by a plain plan on the same stages: that many steps with
        diffusers' scheduler sigmas for `shift` (default 3.0), every block every step."""
        lib = _native.lib()
        if not self._handle:
            raise SlimError("SLIM_ERR_INVALID_ARGUMENT", "the session is closed (or its engine was closed)")
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
            size = cfg["default_latent_size"]
            shape = (batch, cfg["out_channels"], height or size, width or size)
        out = np.empty(shape, dtype=np.float32)
        tensors = {k: _TensorArg(v) for k, v in args.items() if v is not None}
        params = lib.slim_generate_default_params()
        for name, t in tensors.items():
            setattr(params, name, t.pointer())
        params.seed = seed
        if guidance_scale is not None:
            params.guidance_scale = guidance_scale
        if step_cache_threshold is not None:
            params.step_cache_threshold = step_cache_threshold
        if num_steps is not None:
            params.num_steps = num_steps
        if shift is not None:
            params.shift = shift
        if cache is not None:
            params.cache_policy = self._engine.policy_json(cache, num_steps).encode()
        out_arg = _TensorArg(out)
        stats = GenerateStats(struct_size=ctypes.sizeof(GenerateStats))
        _check(lib.slim_generate(self._handle, ctypes.byref(params), out_arg.pointer(), ctypes.byref(stats)))
        return GenerateResult(latents=out, stats=self._stats(stats), events=self._events())

    def _stats(self, s: GenerateStats) -> dict:
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
                "flop_fraction": s.flop_fraction, "total_ms": s.total_ms, "backend_ms": s.backend_ms, "per_step": per_step, "per_stage": per_stage}

    def _events(self) -> list[dict]:
        lib = _native.lib()
        events = []
        for i in range(lib.slim_session_event_count(self._handle)):
            e = Event(struct_size=ctypes.sizeof(Event))
            _check(lib.slim_session_event(self._handle, i, ctypes.byref(e)))
            if e.kind >= len(EVENT_KINDS):
                continue  # a kind newer than this binding
            events.append({"kind": EVENT_KINDS[e.kind], "step": e.step, "block": e.block,
                           "stage": self._engine.stage_names[e.stage] if e.stage >= 0 else None,
                           "level": STEP_LEVELS[e.level] if e.level >= 0 else None, "start_ns": e.start_ns, "end_ns": e.end_ns,
                           "device_ns": e.device_ns if e.device_ns >= 0 else None})
        return events

    def close(self) -> None:
        if self._handle:
            _native.lib().slim_session_destroy(self._handle)
            self._handle = None

    def __del__(self):
        self.close()


def open_engine(path: str | Path, **options) -> Engine:
    """Load an engine bundle (see Engine for options)."""
    return Engine(path, **options)
