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
        self.params = _native.params(_native.GenerateParams)
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
    lib.slim_session_destroy(handle)  # waits for the call in flight
    # Its output is complete already (the worker thread itself may still be waiting for the GIL to return).
    assert np.array_equal(first.out, expected)
    worker.join()
    assert statuses == [("SLIM_OK", "")]
    engine.close()


def test_an_engine_closed_under_a_c_session_stays_loaded_until_the_session_is_destroyed(distilled_bundle):
    engine = se.open_engine(distilled_bundle)
    lib = _native.lib()
    session, engine_handle = ctypes.c_void_p(), ctypes.c_void_p()
    params = _native.params(_native.EngineParams)
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


def test_a_forked_child_refuses_handles_a_parent_thread_was_using_and_closes_them_without_hanging(distilled_bundle, tmp_path):
    """fork() while other threads are in calls: the child has none of those threads, and the handles they
    were using hold their calls' state. Closing such a handle in the child used to wait forever for a
    call that will never return (in Python and in C). Now every call on it is refused clearly, closing it
    frees nothing and returns, and handles no thread was using keep working. (The child leaves with
    os._exit: ONNX Runtime's own exit handlers hang in a forked child, see docs/c-abi.md.)"""
    out = run_isolated(INPUTS.format(bundle=str(distilled_bundle), steps=2) + f"""
import ctypes, os
from slimengine import _native
lib = _native.lib()
busy_session, idle_session = engine.session(), engine.session()
busy_bank = se.MemoryBank({str(tmp_path / "busy.bank")!r}, dim=64)
idle_bank = se.MemoryBank({str(tmp_path / "idle.bank")!r}, dim=64)
ids = np.arange(100_000)
busy_bank.upsert(ids, np.ones((ids.size, 64), np.float32))
idle_bank.upsert(ids[:10], np.ones((10, 64), np.float32))
raw = ctypes.c_void_p()  # a C session used through raw ctypes: only the C library's gate
assert lib.slim_session_create(engine._handle, ctypes.byref(raw)) == 0
params = _native.params(_native.GenerateParams)
def tensor(arr):
    dims = (ctypes.c_int64 * arr.ndim)(*arr.shape)
    t = _native.SlimTensor(arr.ctypes.data, 0, 1, 0, arr.ndim, dims, None)
    keep.extend([dims, t])
    return ctypes.pointer(t)
keep, raw_out = [], np.zeros((1, c["out_channels"], 32, 32), np.float32)
params.prompt_embeds, params.pooled_embeds, params.num_steps = tensor(text), tensor(pooled), {LONG_STEPS}
stop = False
def look():
    while not stop:
        busy_bank.lookup(ids)
threads = [threading.Thread(target=lambda: busy_session.generate(text, pooled, num_steps={LONG_STEPS})), threading.Thread(target=look),
           threading.Thread(target=lambda: lib.slim_generate(raw, ctypes.byref(params), tensor(raw_out), None))]
for t in threads:
    t.start()
def raw_busy():
    return lib.slim_status_name(lib.slim_session_set_profiling(raw, 0)).decode() == "SLIM_ERR_BUSY"
while not (busy_session._gate._calls and raw_busy()):
    time.sleep(0.001)
for attempt in range(50):  # until the fork lands inside a lookup too (they follow each other with gaps)
    while not busy_bank._handle.calls:
        pass
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0 and not busy_bank._handle.forked_busy:
        os._exit(3)
    if pid == 0 or os.waitpid(pid, 0)[1] != 3 << 8:
        break
    os.close(read_end), os.close(write_end)
if pid == 0:
    report = []
    try:
        for name, call in (("session", lambda: busy_session.generate(text, pooled, num_steps=2)), ("bank", lambda: busy_bank.lookup(ids[:5]))):
            try:
                call()
                report.append(name + ": ran")
            except se.SlimError as e:
                report.append(name + ": " + ("refused" if "in use by another thread when this process was forked" in str(e) else str(e)))
        code = lib.slim_generate(raw, ctypes.byref(params), tensor(raw_out), None)
        report.append("c session: " + lib.slim_status_name(code).decode() + " " + str("was in use by another thread" in lib.slim_last_error().decode()))
        report.append("idle bank: " + str(int(idle_bank.lookup(ids[:10]).found.sum())))
        lib.slim_session_destroy(raw)
        busy_session.close(); busy_bank.close(); idle_bank.close(); idle_session.close(); engine.close()
        report.append("closed")
    except BaseException as e:
        report.append("child failed: " + repr(e))
    os.write(write_end, "\\n".join(report).encode())
    os._exit(0)
os.close(write_end)
with os.fdopen(read_end) as f:
    print(f.read())
stop = True
for t in threads:
    t.join()
lib.slim_session_destroy(raw)
""", timeout=90)
    assert out.split("\n")[:5] == ["session: refused", "bank: refused", "c session: SLIM_ERR_INVALID_ARGUMENT True", "idle bank: 10",
                                   "closed"], out
