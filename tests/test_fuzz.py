"""Standing fuzz guard: mutated bundles, random C-ABI arguments and damaged memory-bank files must end in success
or a clean error status, never in a crash (a signal) or a hang.

The cases run in a child process (tests/fuzz_worker.py) that this test watches: a worker that dies by a signal
or does not finish a case in time is a failure naming the case's seed and mutation, and the next worker
continues after it. Seeds run in order from 0, so a given seed is always the same case. The time budget is
SLIM_FUZZ_SECONDS in total (default 60; e.g. SLIM_FUZZ_SECONDS=600 for a longer local run), shared by the
three parts; SLIM_FUZZ_CASE_TIMEOUT (default 30 s) is the most one case may take.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fuzz_worker.py")
BUDGET_S = float(os.environ.get("SLIM_FUZZ_SECONDS", "60"))
CASE_TIMEOUT_S = float(os.environ.get("SLIM_FUZZ_CASE_TIMEOUT", "30"))
SHARES = {"bundle": 0.45, "abi": 0.3, "bank": 0.25}  # bundle cases are the slowest (an engine load each)


@dataclass
class FuzzRun:
    part: str
    command: list[str]
    cases: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def reproduce(self, seed: int, first: int) -> str:
        base = " ".join(self.command)
        return f"    reproduce: {base} --seed {seed}\n    replay the worker's sequence: {base} --first {first} --last {seed}"


def signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def run_part(part: str, sd3: Path, lemur: Path, token: Path, work: Path, budget_s: float, extra: tuple[str, ...] = ()) -> FuzzRun:
    """Run seeds 0, 1, 2, ... of `part` in worker processes until the budget is spent; a crash or a hang ends
    that worker, is recorded, and the next worker starts at the following seed."""
    command = [sys.executable, str(WORKER), part, "--sd3", str(sd3), "--lemur", str(lemur), "--token", str(token), "--work", str(work),
               *extra]
    run = FuzzRun(part, command)
    deadline = time.monotonic() + budget_s
    seed = 0
    while time.monotonic() < deadline:
        first = seed
        stderr_path = work / f"{part}-{first}.stderr"
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen([*command, "--first", str(first), "--seconds", str(max(deadline - time.monotonic(), 0.1))],
                                    stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        current = None  # (seed, description, started) of the case in progress
        buffer = b""
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        hung = False
        while True:
            # Waiting for the worker's first line covers its start-up (engines loaded once per worker) as a case would.
            wait = CASE_TIMEOUT_S - (time.monotonic() - current[2]) if current else CASE_TIMEOUT_S + max(deadline - time.monotonic(), 0)
            if wait <= 0 or not selector.select(timeout=wait):
                hung = True
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                kind, _, rest = line.decode(errors="replace").partition(" ")
                number, _, text = rest.partition(" ")
                if kind == "CASE":
                    current = (int(number), text, time.monotonic())
                    seed = int(number) + 1
                elif kind == "DONE":
                    run.cases += 1
                    outcome = text.split(":")[0]
                    run.outcomes[outcome] = run.outcomes.get(outcome, 0) + 1
                    if text.startswith("bad"):
                        run.failures.append(f"{part} seed {number}: {text}\n    case: {current[1]}\n{run.reproduce(int(number), first)}")
                    current = None
                elif kind == "END":
                    seed = int(number)
        selector.close()
        if hung:
            os.killpg(proc.pid, signal.SIGKILL)
        returncode = proc.wait()
        proc.stdout.close()
        tail = stderr_path.read_text(errors="replace").strip().splitlines()[-5:]
        if current is not None:
            what = f"hang (no result after {CASE_TIMEOUT_S:.0f} s)" if hung else (
                f"crash ({signal_name(returncode)})" if returncode < 0 else f"worker exited with {returncode}")
            run.failures.append(f"{part} seed {current[0]}: {what}\n    case: {current[1]}\n{run.reproduce(current[0], first)}\n"
                                "    stderr: " + " / ".join(tail))
        elif hung or returncode != 0:  # outside any case: the worker itself is broken; stop rather than loop
            run.failures.append(f"{part}: the worker failed outside a case (exit {returncode}, hung={hung}): " + " / ".join(tail))
            break
    return run


def check(run: FuzzRun) -> None:
    summary = ", ".join(f"{k} {v}" for k, v in sorted(run.outcomes.items()))
    print(f"fuzz {run.part}: {run.cases} cases ({summary})")
    assert run.cases > 0, f"fuzz {run.part}: no case ran"
    assert not run.failures, f"fuzz {run.part}: {len(run.failures)} failing case(s) of {run.cases}:\n" + "\n".join(run.failures)


@pytest.mark.parametrize("part", list(SHARES))
def test_fuzz(part, distilled_bundle, lemur_bundle, toy_bundles, tmp_path):
    check(run_part(part, distilled_bundle, lemur_bundle, toy_bundles["28-step CFG"], tmp_path, BUDGET_S * SHARES[part]))
