"""Benchmark of LEMUR serving (issue #4), on this CPU machine, in one run:

1. documents/s of `embed` through the runtime vs PyTorch eager on the same checkpoint (the "small"
   preset: 256-d embeddings, 2-layer 128-wide text tower over 128 tokens, 4 frames of 32x32):
   ratio, goal >= 1.5x;
2. the memory bank with 1 M ids x 256 dims, measured in the C library through its bulk calls
   (one slim_bank_upsert / slim_bank_lookup call per batch, so ctypes overhead is amortised):
   upserts/s (goal >= 1 M/s) and single-thread lookups/s (goal >= 5 M/s). Beside the upserts, in the
   same run: plain writes of the same bytes into a new file (the ceiling of any appending log on this
   machine), and upserts into a second bank on the pages that file just freed. A lookup is one id
   resolved through the index with its 1 KiB embedding row, write time and model version copied
   into the caller's arrays; lookups/s = ids looked up / wall time of the calls;
3. `score` latency p50/p99 at batch 1 and 64 with history length 256 (histories assembled from
   that bank inside the call).

    python benchmarks/bench_lemur.py [--ids 1000000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import cli, median_ms

import slimengine as se
from slimengine.export.checkpoint import load_lemur_checkpoint


def documents(config: dict, batch: int, text_len: int, frames: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    text_ids = rng.integers(1, config["vocab_size"], (batch, text_len))
    segment_ids = np.repeat(np.array([0] * (text_len // 4) + [1] * (text_len // 4) + [2] * (text_len - text_len // 2))[None], batch, 0)
    pixels = rng.standard_normal((batch, frames, 3, config["image_size"], config["image_size"]), dtype=np.float32)
    return text_ids, segment_ids, pixels


def bench_embed(engine, model, iters: int) -> None:
    batch, text_len, frames = 64, 128, 4
    text_ids, segment_ids, pixels = documents(engine.config, batch, text_len, frames)
    session = engine.session()
    runtime_ms = median_ms(lambda: session.embed(text_ids, pixels, segment_ids=segment_ids), iters)
    t_args = (torch.from_numpy(text_ids), torch.from_numpy(segment_ids), torch.from_numpy(pixels))

    def eager():
        with torch.no_grad():
            model.embed(*t_args)

    torch_ms = median_ms(eager, iters)
    runtime_docs, torch_docs = batch / runtime_ms * 1e3, batch / torch_ms * 1e3
    print(f"embed: batch {batch}, {text_len} tokens, {frames} frames of {engine.config['image_size']}^2, torch threads "
          f"{torch.get_num_threads()}")
    print(f"  runtime                   {runtime_docs:10.0f} documents/s  ({runtime_ms:.2f} ms per batch, median of {iters})")
    print(f"  PyTorch eager             {torch_docs:10.0f} documents/s  ({torch_ms:.2f} ms per batch)")
    print(f"  ratio runtime / eager     {runtime_docs / torch_docs:10.2f}x  (goal >= 1.5x)")


def plain_write_rate(path: Path, nbytes: int) -> float:
    """Bytes/s of plain pwrite calls into a new file from one thread: what this machine's page cache
    takes, the ceiling for any log appended with write calls. The file is deleted after."""
    chunk = memoryview(np.random.default_rng(1).bytes(8 << 20))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = time.perf_counter()
        for offset in range(0, nbytes, len(chunk)):
            os.pwrite(fd, chunk[: nbytes - offset], offset)
        return nbytes / (time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()


def bench_bank(path: Path, ids: int, dim: int) -> se.MemoryBank:
    bank = se.MemoryBank(path, dim)
    rng = np.random.default_rng(0)
    batch = 10_000
    block = rng.standard_normal((batch, dim), dtype=np.float32)  # made once: only the upsert is timed
    id_batches = [np.arange(first, min(first + batch, ids)) for first in range(0, ids, batch)]
    start, cpu_start = time.perf_counter(), time.thread_time()
    for id_batch in id_batches:
        bank.upsert(id_batch, block[: len(id_batch)], model_version=1)
    upsert_s, upsert_cpu = time.perf_counter() - start, time.thread_time() - cpu_start
    log_mb = (64 + ids * ((40 + 4 * dim + 4 + 7) // 8 * 8)) / 2**20
    print(f"bank: {ids:,} ids x {dim} dims, log {log_mb:.0f} MiB, batches of {batch:,} ids per call (rates: wall clock, and in "
          "brackets per second of this thread's CPU time, user + kernel, which the other jobs on this machine do not inflate)")
    print(f"  upserts                   {ids / upsert_s / 1e6:10.2f} M/s  [{ids / upsert_cpu / 1e6:.2f} M/s on-CPU]  (goal >= 1 M/s; "
          f"{upsert_s:.2f} s for all)")

    log_bytes = int(log_mb * 2**20)
    plain = plain_write_rate(path.with_name("plain-write.tmp"), log_bytes)
    record_rate = plain * ids / log_bytes
    print(f"  plain file writes         {record_rate / 1e6:10.2f} M records/s  ({plain / 1e9:.2f} GB/s: pwrite of the same bytes, 8 MiB a "
          f"call, into a new file); the bank's upserts reach {ids / upsert_s / record_rate:.0%} of it")
    again = path.with_name("again.bank")  # made now, it gets the pages the plain file has just freed
    with se.MemoryBank(again, dim) as second:
        start = time.perf_counter()
        for id_batch in id_batches:
            second.upsert(id_batch, block[: len(id_batch)], model_version=1)
        again_s = time.perf_counter() - start
    again.unlink()
    print(f"  upserts, freed pages      {ids / again_s / 1e6:10.2f} M/s  (a second bank written right after that file was deleted: "
          "pages this machine has touched before)")

    lookup_batch, calls = 100_000, 30
    queries = [rng.integers(0, ids, lookup_batch) for _ in range(calls)]
    out = np.empty((lookup_batch, dim), np.float32)
    times, versions = np.empty(lookup_batch, np.int64), np.empty(lookup_batch, np.int64)
    lib, handle = se.runtime._native.lib(), bank._handle
    args = [se.runtime._TensorArg(a) for a in (out, times, versions)]
    found = se.runtime.ctypes.c_int64()

    def lookup(q):  # the C bulk call directly: no per-call numpy allocation in the timing
        ids_arg = se.runtime._TensorArg(q)
        se.runtime._check(lib.slim_bank_lookup(handle, ids_arg.pointer(), *(a.pointer() for a in args), se.runtime.ctypes.byref(found)))
        assert found.value == lookup_batch

    for q in queries[:3]:  # warm-up: page the file's mapping in
        lookup(q)
    rates, cpu_rates = [], []
    for q in queries:
        start, cpu_start = time.perf_counter(), time.thread_time()
        lookup(q)
        rates.append(lookup_batch / (time.perf_counter() - start))
        cpu_rates.append(lookup_batch / max(time.thread_time() - cpu_start, 1e-9))
    print(f"  lookups, one thread       {statistics.median(rates) / 1e6:10.2f} M/s  [{statistics.median(cpu_rates) / 1e6:.2f} M/s on-CPU]  "
          f"(goal >= 5 M/s; median of {calls} calls of {lookup_batch:,} random ids)")
    bank.close()
    start = time.perf_counter()
    bank = se.MemoryBank(path)  # reopening scans and checks every record and rebuilds the index
    print(f"  reopen (scan + index)     {time.perf_counter() - start:10.2f} s for {len(bank):,} ids")
    return bank


def bench_score(engine, bank: se.MemoryBank, ids: int) -> None:
    session = engine.session()
    rng = np.random.default_rng(1)
    history_len, query_len = 256, 16
    for batch, iters in [(1, 300), (64, 40)]:
        history = rng.integers(0, ids, (batch, history_len))
        query = rng.integers(1, engine.config["vocab_size"], (batch, query_len))
        for _ in range(5):
            session.score(bank, history, query)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            session.score(bank, history, query)
            times.append((time.perf_counter() - start) * 1e3)
        stats = session.score(bank, history, query).stats
        p50, p99 = np.percentile(times, [50, 99])
        print(f"score batch {batch:>2}, history {history_len}: p50 {p50:7.3f} ms, p99 {p99:7.3f} ms ({iters} calls; in the last one "
              f"bank {stats['bank_ms']:.3f} ms, backend {stats['backend_ms']:.3f} ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=1_000_000, help="ids in the bank (default 1,000,000)")
    parser.add_argument("--iters", type=int, default=20, help="timed embed batches (default 20)")
    parser.add_argument("--workdir", type=Path, help="where the checkpoint, bundle and bank go (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        ckpt, bundle, bank_path = workdir / "lemur-small.safetensors", workdir / "lemur-small.engine", workdir / "bench.bank"
        cli("slimengine.tools.make_lemur_checkpoint", "--preset", "small", "-o", str(ckpt))
        cli("slimengine.export.cli", str(ckpt), "-o", str(bundle), "-q", "--force")
        bank_path.unlink(missing_ok=True)
        model = load_lemur_checkpoint(ckpt).build_model()
        with se.open_engine(bundle) as engine:
            bench_embed(engine, model, args.iters)
            bank = bench_bank(bank_path, args.ids, engine.config["embed_dim"])
            bench_score(engine, bank, args.ids)
            bank.close()
        bank_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
