"""The Python binding's cost per call, in microseconds, on calls whose C work is tiny (a bank of 1,000 rows in the page
cache): MemoryBank.lookup of 1 and 16 ids (the compiled path, slimengine._calls) and len(bank) (one ctypes call under
the handle's guard). It uses the public API only, so an older install runs it unchanged: the before/after figures of
docs/memory-bank.md come from running it with both.

    python benchmarks/bench_binding.py [--calls 200000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import timeit

import numpy as np

import slimengine as se


def per_call_us(fn, calls: int) -> float:
    return min(timeit.repeat(fn, number=calls, repeat=5)) / calls * 1e6  # the least disturbed of 5 runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir, se.MemoryBank(os.path.join(workdir, "b.bank"), 256) as bank:
        bank.upsert(np.arange(1000), np.random.default_rng(0).random((1000, 256), np.float32))
        one, sixteen = np.array([5], np.int64), np.arange(100, 116, dtype=np.int64)
        print(f"slimengine {se.version()}, per call (best of 5 x {args.calls:,} calls):")
        print(f"  MemoryBank.lookup, 1 id    {per_call_us(lambda: bank.lookup(one), args.calls):6.2f} us")
        print(f"  MemoryBank.lookup, 16 ids  {per_call_us(lambda: bank.lookup(sixteen), args.calls):6.2f} us")
        print(f"  len(MemoryBank)            {per_call_us(lambda: len(bank), args.calls):6.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
