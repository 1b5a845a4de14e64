"""slim_generate_prompt's session state (ABI 0.8), through the C ABI: the prompt-embedding cache across calls (hits
skip the tokenizers and encoders and give the same bits; LRU eviction; capacity 0; clear), the progress callback
(once per step with the right totals; cancelling returns SLIM_ERR_CANCELLED, writes nothing, and the session goes
on), ABI 0.7 callers' smaller structs, and threads (a second call on the session is refused as busy; destroying the
session waits for the call; closing the engine under it lets the call finish)."""

from __future__ import annotations

import ctypes
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from slimengine import Engine, _native
from tests.conftest import run_python
from tests.test_prompt_c import c_generate

OK, INVALID, BUSY, CANCELLED = 0, 1, 11, 12
ENCODE, STEP, DECODE, TOKENIZE = 0, 1, 2, 3  # slim_phase
STEPS = 3


@pytest.fixture(scope="module")
def engine(sd3_pipeline_bundle):
    with Engine(sd3_pipeline_bundle) as engine:
        yield engine


@pytest.fixture(scope="module")
def reference(engine):
    """The image and latents of CALL, made on a session of its own."""
    session = engine.session(prompt_cache=0)
    status, image, latents, _, error = c_generate(session, *CALL[:2], **CALL[2])
    assert status == OK, error
    session.close()
    return image, latents


CALL = (["a red circle"], ["blurry"], dict(seed=7, guidance_scale=3.0, num_steps=STEPS))


def progress_callback(on_call):
    """A slim_progress calling on_call(phase, step, total); its return value (None: 0) goes back to the runtime."""
    return _native.Progress(lambda _user, phase, step, total: on_call(phase, step, total) or 0)


def set_cache(session, capacity: int) -> int:
    return _native.lib().slim_session_set_prompt_cache(session._handle, capacity)


def cache_stats(stats) -> tuple:
    return stats.prompt_cache_hits, stats.prompt_cache_misses, stats.prompt_cache_size, stats.prompt_cache_capacity


def test_a_cache_hit_skips_the_encoders_and_gives_the_same_image(engine, reference):
    session = engine.session()  # the default capacity, SLIM_PROMPT_CACHE_DEFAULT
    lib = _native.lib()
    assert lib.slim_session_set_profiling(session._handle, 1) == OK
    status, image, latents, miss, error = c_generate(session, *CALL[:2], **CALL[2])
    assert status == OK, error
    assert cache_stats(miss) == (0, 2, 2, 16) and miss.encoder_calls == 3 * 2 and miss.tokenize_ms > 0
    status, image2, latents2, hit, error = c_generate(session, *CALL[:2], **CALL[2])
    assert status == OK, error
    assert cache_stats(hit) == (2, 0, 2, 16) and hit.encoder_calls == 0
    assert hit.tokenize_ms == hit.clip_l_ms == hit.clip_g_ms == hit.t5_ms == 0
    for got in (image, image2):
        assert np.array_equal(got, reference[0])
    for got in (latents, latents2):
        assert np.array_equal(got, reference[1])
    # The hit's events: no tokenizer and no encoder call; the sampling, the decode and the call.
    kinds = []
    for i in range(lib.slim_session_event_count(session._handle)):
        e = _native.Event(struct_size=ctypes.sizeof(_native.Event))
        assert lib.slim_session_event(session._handle, i, ctypes.byref(e)) == OK
        kinds.append((e.kind, e.step, session._engine.stage_names[e.stage] if e.stage >= 0 else None))
    assert not [k for k in kinds if k[0] == 6 or (k[0] == 3 and k[2] in ("clip_l", "clip_g", "t5"))]
    assert kinds[-3:] == [(3, -1, "vae_decode"), (7, -1, None), (8, -1, None)]  # the VAE stage, the decode, the call
    session.close()


def test_lru_eviction_capacity_zero_and_clear(engine):
    session = engine.session()
    run = dict(guidance_scale=3.0, num_steps=1)
    assert set_cache(session, 2) == OK

    def call(prompt):
        status, _, _, stats, error = c_generate(session, [prompt], [""], latents_out=False, **run)
        assert status == OK, error
        return cache_stats(stats)

    assert call("a") == (0, 2, 2, 2)  # "a" and "": "" used last
    assert call("b") == (1, 1, 2, 2)  # "b" in, so "a" (least recently used) out; "" a hit
    assert call("b") == (2, 0, 2, 2)
    assert call("a") == (1, 1, 2, 2)  # evicted: encoded again
    assert set_cache(session, 1) == OK  # lowering the capacity drops the least recently used
    assert call("") == (2, 0, 1, 1)  # "" (used last) stayed: a hit as the prompt, and as the negative
    assert call("a") == (0, 2, 1, 1)  # "a" was dropped; with room for one text, "a" and "" now evict each other
    assert set_cache(session, 0) == OK
    for _ in range(2):
        assert call("a") == (0, 2, 0, 0)  # off: every call encodes
    assert call("") == (1, 1, 0, 0)  # ... a text once per call all the same ("" is the prompt and the negative)
    assert set_cache(session, 2) == OK
    assert call("a") == (0, 2, 2, 2) and call("a") == (2, 0, 2, 2)
    assert _native.lib().slim_session_clear_prompt_cache(session._handle) == OK
    assert call("a") == (0, 2, 2, 2)
    lib = _native.lib()
    for bad in (-1, 1025):
        assert set_cache(session, bad) == INVALID and b"0 (off) to 1024" in lib.slim_last_error()
    assert lib.slim_session_set_prompt_cache(None, 1) == INVALID and lib.slim_session_clear_prompt_cache(None) == INVALID
    session.close()


def test_progress_once_per_step_and_each_phase(engine, reference):
    session = engine.session()
    seen = []
    callback = progress_callback(lambda *call: seen.append(call))
    status, image, _, _, error = c_generate(session, *CALL[:2], progress=callback, **CALL[2])
    assert status == OK, error
    # Before each tokenizer call of the two texts (prompt, negative): clip_l, clip_g, t5.
    tokenize = [(TOKENIZE, i, 3) for i in range(3)]
    assert seen == [(ENCODE, 0, 1), *tokenize, *tokenize, *((STEP, i, STEPS) for i in range(STEPS)), (DECODE, 0, 1)]
    assert np.array_equal(image, reference[0])
    # The bundle's program: its step count.
    seen.clear()
    assert c_generate(session, ["x"], latents_out=False, progress=callback)[0] == OK
    assert [s for s in seen if s[0] == STEP] == [(STEP, i, engine.info.num_steps) for i in range(engine.info.num_steps)]
    session.close()


@pytest.mark.parametrize("at", [(ENCODE, 0), (TOKENIZE, 1), (STEP, 0), (STEP, STEPS - 1), (DECODE, 0)],
                         ids=["encode", "tokenize", "step0", "last-step", "decode"])
def test_cancelling_from_the_callback(engine, reference, at):
    """SLIM_ERR_CANCELLED, nothing written to the image, latents or stats, and the next call works and matches."""
    lib = _native.lib()
    session = engine.session(prompt_cache=0)
    seen = []

    def on_call(phase, step, total):
        seen.append((phase, step))
        return 1 if (phase, step) == at else 0

    status, image, latents, stats, error = c_generate(session, *CALL[:2], progress=progress_callback(on_call), **CALL[2])
    assert status == CANCELLED and lib.slim_status_name(CANCELLED) == b"SLIM_ERR_CANCELLED"
    assert "cancelled by the progress callback" in error and seen[-1] == at
    assert not image.any() and not latents.any() and stats.batch == stats.steps == 0 and stats.total_ms == 0
    status, image, latents, _, error = c_generate(session, *CALL[:2], **CALL[2])
    assert status == OK, error
    assert np.array_equal(image, reference[0]) and np.array_equal(latents, reference[1])
    session.close()


def test_slim_generate_progress_and_cancel(engine):
    lib = _native.lib()
    session = engine.session()
    c = engine.config
    rng = np.random.default_rng(0)
    text = rng.standard_normal((1, 5, c["joint_attention_dim"]), dtype=np.float32)
    pooled = rng.standard_normal((1, c["pooled_projection_dim"]), dtype=np.float32)
    want = session.generate(text, pooled, seed=1, guidance_scale=1.0, num_steps=4).latents
    seen = []
    got = session.generate(text, pooled, seed=1, guidance_scale=1.0, num_steps=4, progress=lambda *a: seen.append(a))
    assert seen == [("step", i, 4) for i in range(4)] and np.array_equal(got.latents, want)

    class Stop(Exception):
        pass

    def stop(phase, step, total):
        if step == 2:
            raise Stop

    with pytest.raises(Stop):  # the Python binding cancels the C call and raises what the callback raised
        session.generate(text, pooled, seed=1, guidance_scale=1.0, num_steps=4, progress=stop)
    assert np.array_equal(session.generate(text, pooled, seed=1, guidance_scale=1.0, num_steps=4).latents, want)
    # Through C: CANCELLED, latents_out untouched.
    from slimengine.runtime import _TensorArg

    args = [_TensorArg(a) for a in (text, pooled)]
    out = np.zeros_like(want)
    out_arg = _TensorArg(out)
    params = _native.params(_native.GenerateParams)
    params.prompt_embeds, params.pooled_embeds = args[0].pointer(), args[1].pointer()
    params.seed, params.guidance_scale, params.num_steps = 1, 1.0, 4
    params.progress = callback = progress_callback(lambda phase, step, total: step == 1)
    assert lib.slim_generate(session._handle, ctypes.byref(params), out_arg.pointer(), None) == CANCELLED
    assert not out.any()
    del callback
    session.close()


def raw_session(engine_handle):
    """A session made through the C ABI only (the test frees it), in the shape c_generate takes."""
    handle = ctypes.c_void_p()
    assert _native.lib().slim_session_create(engine_handle, ctypes.byref(handle)) == OK
    return handle


def test_a_second_threads_call_on_the_session_is_refused_as_busy(engine, reference):
    handle = raw_session(engine._handle)
    session = types.SimpleNamespace(_handle=handle, _engine=engine)
    second = []

    def on_call(phase, step, total):
        if phase == STEP and step == 0:  # the first call is running: another thread calls on the same session
            worker = threading.Thread(target=lambda: second.append(c_generate(session, *CALL[:2], **CALL[2])))
            worker.start()
            worker.join()

    status, image, _, _, error = c_generate(session, *CALL[:2], progress=progress_callback(on_call), **CALL[2])
    assert status == OK, error
    assert np.array_equal(image, reference[0])
    status, image2, latents2, _, error = second[0]
    assert status == BUSY and "in use by another thread" in error and not image2.any() and not latents2.any()
    assert c_generate(session, *CALL[:2], **CALL[2])[0] == OK  # and the session goes on
    _native.lib().slim_session_destroy(handle)


def test_destroy_waits_for_the_running_call(engine, reference):
    lib = _native.lib()
    handle = raw_session(engine._handle)
    session = types.SimpleNamespace(_handle=handle, _engine=engine)
    destroyer = threading.Thread(target=lambda: lib.slim_session_destroy(handle))
    waited = []

    def on_call(phase, step, total):
        if phase == STEP and step == 0:
            destroyer.start()
            time.sleep(0.3)
            waited.append(destroyer.is_alive())  # still waiting for this call

    status, image, _, _, error = c_generate(session, *CALL[:2], progress=progress_callback(on_call), **CALL[2])
    destroyer.join()
    assert status == OK, error
    assert waited == [True] and np.array_equal(image, reference[0])


def test_an_engine_closed_under_a_running_call_stays_loaded_for_its_session(engine, sd3_pipeline_bundle, reference):
    lib = _native.lib()
    engine_handle = ctypes.c_void_p()
    params = _native.params(_native.EngineParams)
    ort = _native.onnxruntime_library().encode()
    params.onnxruntime_library = ort
    assert lib.slim_engine_open(str(sd3_pipeline_bundle).encode(), ctypes.byref(params), ctypes.byref(engine_handle)) == OK
    handle = raw_session(engine_handle)
    session = types.SimpleNamespace(_handle=handle, _engine=engine)

    def on_call(phase, step, total):
        if phase == STEP and step == 1:
            closer = threading.Thread(target=lambda: lib.slim_engine_close(engine_handle))
            closer.start()
            closer.join()  # returns at once: the session keeps the model

    status, image, latents, _, error = c_generate(session, *CALL[:2], progress=progress_callback(on_call), **CALL[2])
    assert status == OK, error
    assert np.array_equal(image, reference[0]) and np.array_equal(latents, reference[1])
    status, image, _, _, error = c_generate(session, *CALL[:2], **CALL[2])  # and the session still runs
    assert status == OK and np.array_equal(image, reference[0]), error
    lib.slim_session_destroy(handle)


# Found by the issue-13 attack pass.
HOSTILE = """
import ctypes, sys, numpy as np
sys.path.insert(0, {root!r})
from slimengine import Engine, _native
from tests.conftest import run_python
from tests.test_prompt_c import c_generate
lib = _native.lib()
engine = Engine({bundle!r})
"""


def test_a_struct_size_ending_inside_a_field_is_refused(sd3_pipeline_bundle):
    """A struct_size between two versions' sizes ended inside the progress pointer: the part copied was called (a crash).
    Since ABI 1.0 a struct_size below the 1.0 struct's is refused (there are no older versions); the callback is never called."""
    code = HOSTILE.format(root=str(Path(__file__).parent.parent), bundle=str(sd3_pipeline_bundle)) + """
session = engine.session()
called = []
callback = _native.Progress(lambda *a: called.append(a) or 0)
for k in range(1, 8):
    status, image, _, _, error = c_generate(session, ["a"], num_steps=1, progress=callback,
                                            struct_size=_native.PromptParams.progress.offset + k)
    assert status == 1 and "set it to sizeof(slim_prompt_params)" in error and not image.any(), (k, status, error)
params = _native.params(_native.GenerateParams)
params.progress = callback
for offset in (_native.GenerateParams.progress.offset, _native.GenerateParams.xslim_policy.offset):
    params.struct_size = offset + 4
    assert lib.slim_generate(session._handle, ctypes.byref(params), None, None) == 1
    assert b"set it to sizeof(slim_generate_params)" in lib.slim_last_error()
assert called == []
assert c_generate(session, ["a"], num_steps=1, struct_size=ctypes.sizeof(_native.PromptParams))[0] == 0
print("ok")
"""
    proc = run_python(code, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_destroying_the_session_from_its_own_progress_callback(sd3_pipeline_bundle):
    """slim_session_destroy (C) and Session.close() (Python) from the callback of a call on that session waited for that
    call, that is for themselves: a hang. Now the session is freed when the call returns, which completes as usual."""
    code = HOSTILE.format(root=str(Path(__file__).parent.parent), bundle=str(sd3_pipeline_bundle)) + """
import types
from pathlib import Path
call = dict(seed=7, guidance_scale=3.0, num_steps=3)
want = c_generate(engine.session(), ["a red circle"], ["blurry"], **call)[1]
handle = ctypes.c_void_p()
assert lib.slim_session_create(engine._handle, ctypes.byref(handle)) == 0
raw = types.SimpleNamespace(_handle=handle, _engine=engine)
seen = []
def destroy(_user, phase, step, total):
    seen.append((phase, step))
    if (phase, step) == (1, 0):
        lib.slim_session_destroy(handle)
    return 0
status, image, _, _, error = c_generate(raw, ["a red circle"], ["blurry"], progress=_native.Progress(destroy), **call)
assert status == 0 and np.array_equal(image, want), error
assert seen[-1] == (2, 0)  # the call went on to the decode
session = engine.session()
def close(phase, step, total):
    if (phase, step) == ("step", 0):
        session.close()
result = session.generate(prompt="a red circle", negative_prompt="blurry", height=64, width=64, progress=close, **call)
assert np.array_equal(result.image, want[0]) and session._handle is None
try:
    session.generate(prompt="a red circle", height=64, width=64)
except Exception as e:
    assert "closed" in str(e), e
else:
    raise AssertionError("a closed session ran")
print("ok")
"""
    proc = run_python(code, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])
