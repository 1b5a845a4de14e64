"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time


def cli(*args: str) -> subprocess.CompletedProcess:
    """Run a project command-line module (python -m ...) and fail loudly."""
    return subprocess.run([sys.executable, "-m", *args], check=True, capture_output=True, text=True)


def timings_ms(fn, iters: int, warmup: int = 3) -> list[float]:
    """Wall-clock milliseconds of `iters` calls of fn, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(fn, iters: int, warmup: int = 3) -> float:
    return statistics.median(timings_ms(fn, iters, warmup))
