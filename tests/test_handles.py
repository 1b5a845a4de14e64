"""Handles under threads: a close waits for the calls in flight, a session refuses a second concurrent call.

The crash-prone cases run in a child process, so that a regression shows up as a named failure
(the signal that killed the child) rather than taking the test run down with it.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import slimengine as se
from slimengine import _native

LONG_STEPS = 200  # a generation of a few hundred ms on the tiny model: long enough for another thread to step in


def run_isolated(code: str, timeout: float = 120) -> str:
    """Run a script in a child interpreter; fail with its output (and the signal, if one killed it)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"child exited with {proc.returncode} (negative: killed by that signal)\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


INPUTS = """
import threading, time
import numpy as np
import slimengine as se
engine = se.open_engine({bundle!r})
c = engine.config
text = np.random.default_rng(0).standard_normal((1, 5, c["joint_attention_dim"]), dtype=np.float32)
pooled = np.random.default_rng(1).standard_normal((1, c["pooled_projection_dim"]), dtype=np.float32)
expected = engine.session().generate(text, pooled, seed=4, num_steps={steps}).latents
"""


def _started_generation(session_var: str) -> str:
    """Script lines: a thread running one long generate on `session_var`, started and under way."""
    return f"""
result, errors = {{}}, []
def work():
    try:
        result["latents"] = {session_var}.generate(text, pooled, seed=4, num_steps={LONG_STEPS}).latents
    except Exception as e:
        errors.append(e)
worker = threading.Thread(target=work)
worker.start()
time.sleep(0.05)
"""


@pytest.mark.parametrize("closed", ["session", "engine"])
def test_closing_while_another_thread_generates_waits_for_the_call(distilled_bundle, closed):
    out = run_isolated(INPUTS.format(bundle=str(distilled_bundle), steps=LONG_STEPS) + "session = engine.session()\n"
                       + _started_generation("session") + f"""
{closed}.close()  # returns once the generation in flight has (freeing its buffers under it would crash or corrupt it)
worker.join()
assert not errors, errors
assert np.array_equal(result["latents"], expected)
try:
    session.generate(text, pooled)
    raise AssertionError("a closed session ran a call")
except se.SlimError as e:
    assert "closed" in str(e), e
print("ok")
""")
    assert out.strip() == "ok"


def test_a_second_concurrent_call_on_one_session_is_refused_as_busy(distilled_bundle):
    out = run_isolated(INPUTS.format(bundle=str(distilled_bundle), steps=LONG_STEPS) + "session = engine.session()\n"
                       + _started_generation("session") + """
try:
    session.generate(text, pooled, seed=4, num_steps=5)
    raise AssertionError("two calls ran on one session at once")
except se.SlimError as e:
    assert e.status == "SLIM_ERR_BUSY" and "one session per thread" in str(e), e
worker.join()
assert not errors, errors
assert np.array_equal(result["latents"], expected)  # the call in flight was not disturbed
print("ok")
""")
    assert out.strip() == "ok"


class _RawGenerate:
    """slim_generate on a session handle through raw ctypes: the C library's own guard, no Python gate."""

    def __init__(self, engine, session_handle, steps: int):
        c, self.lib = engine.config, _native.lib()
        rng = np.random.default_rng(0)
        self.text = rng.standard_normal((1, 5, c["joint_attention_dim"]), dtype=np.float32)
        self.pooled = rng.standard_normal((1, c["pooled_projection_dim"]), dtype=np.float32)
        self.out = np.zeros((1, c["out_channels"], 32, 32), np.float32)
        self.keep = []
        self.params = self.lib.slim_generate_default_params()
        self.params.prompt_embeds, self.params.pooled_embeds = self._tensor(self.text), self._tensor(self.pooled)
        self.params.num_steps, self.params.seed = steps, 4
        self.out_tensor = self._tensor(self.out)
        self.handle = session_handle

    def _tensor(self, arr):
        dims = (ctypes.c_int64 * arr.ndim)(*arr.shape)
        t = _native.SlimTensor(arr.ctypes.data, 0, 1, 0, arr.ndim, dims, None)
        self.keep += [dims, t]
        return ctypes.pointer(t)

    def __call__(self) -> tuple[str, str]:
        code = self.lib.slim_generate(self.handle, ctypes.byref(self.params), self.out_tensor, None)
        return self.lib.slim_status_name(code).decode(), self.lib.slim_last_error().decode()


def test_the_c_library_refuses_a_concurrent_call_and_destroy_waits_for_the_one_in_flight(distilled_bundle):
    engine = se.open_engine(distilled_bundle)
    lib = _native.lib()
    handle = ctypes.c_void_p()
    assert lib.slim_session_create(engine._handle, ctypes.byref(handle)) == 0
    first, second = _RawGenerate(engine, handle, LONG_STEPS), _RawGenerate(engine, handle, 3)
    expected = engine.session().generate(first.text, first.pooled, seed=4, num_steps=LONG_STEPS, height=32, width=32).latents
    statuses = []
    worker = threading.Thread(target=lambda: statuses.append(first()))
    worker.start()
    time.sleep(0.05)
    assert worker.is_alive()
    status, message = second()
    assert status == "SLIM_ERR_BUSY" and "in use by another thread" in message
    assert lib.slim_session_step_count(handle) == 0  # results are not read under a running call
    lib.slim_session_destroy(handle)  # waits for the call in flight: its output is complete when destroy returns
    assert np.array_equal(first.out, expected)
    worker.join()
    assert statuses == [("SLIM_OK", "")]
    engine.close()


def test_an_engine_closed_under_a_c_session_stays_loaded_until_the_session_is_destroyed(distilled_bundle):
    engine = se.open_engine(distilled_bundle)
    lib = _native.lib()
    session, engine_handle = ctypes.c_void_p(), ctypes.c_void_p()
    params = lib.slim_engine_default_params()
    assert lib.slim_engine_open(str(distilled_bundle).encode(), ctypes.byref(params), ctypes.byref(engine_handle)) == 0
    assert lib.slim_session_create(engine_handle, ctypes.byref(session)) == 0
    run = _RawGenerate(engine, session, LONG_STEPS)
    expected = engine.session().generate(run.text, run.pooled, seed=4, num_steps=LONG_STEPS, height=32, width=32).latents
    statuses = []
    worker = threading.Thread(target=lambda: statuses.append(run()))
    worker.start()
    time.sleep(0.05)
    lib.slim_engine_close(engine_handle)  # the session keeps the model: the call in flight finishes
    worker.join()
    assert statuses == [("SLIM_OK", "")] and np.array_equal(run.out, expected)
    assert run() == ("SLIM_OK", "") and np.array_equal(run.out, expected)  # and the session still runs
    lib.slim_session_destroy(session)
    engine.close()


def test_closing_a_bank_while_other_threads_look_up_waits_for_them(tmp_path):
    out = run_isolated(f"""
import threading
import numpy as np
import slimengine as se
bank = se.MemoryBank({str(tmp_path / "bank.slimbank")!r}, dim=64)
ids = np.arange(200_000)
rows = np.random.default_rng(0).standard_normal((ids.size, 64), dtype=np.float32)
bank.upsert(ids, rows)
started, errors = threading.Barrier(5), []
def work():
    started.wait()
    try:
        while True:
            got = bank.lookup(ids)
            assert np.array_equal(got.embeddings, rows)
    except se.SlimError as e:
        if "closed" not in str(e):
            errors.append(e)
    except Exception as e:
        errors.append(e)
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
started.wait()
bank.close()
for t in threads:
    t.join()
assert not errors, errors
print("ok")
""")
    assert out.strip() == "ok"
