"""The LEMUR memory bank side by side with LMDB (issue item 7), in one run on this machine.

Both stores hold the same thing: document id -> (float32 embedding, write time in us, model version).
Both are measured through their Python APIs as users call them: `se.MemoryBank` (ctypes calls into the
runtime's C library) and the `lmdb` package (its C extension over LMDB). In LMDB the key is the id as 8
big-endian bytes (keys sort like ids) and the value is the row, the int64 write time and the uint32
model version, packed (4 * dim + 12 bytes): what a bank record holds. Each upsert call is one LMDB write
transaction (`putmulti` on a cursor) and each lookup call one read transaction; the LMDB side includes
packing numpy arrays into keys and values and unpacking the rows into a numpy array, which a user of
the `lmdb` package has to do. The calls of the two stores are interleaved (same ids, same rows, order
alternating), so load from other jobs on this shared machine falls on both alike.

1. durable upserts, equal durability: the bank with sync_writes=1 (an fdatasync in every call) vs LMDB
   opened with sync=True, metasync=True (its commit syncs the data, then the meta page): a bulk load in
   calls of 10,000 ids, then calls of 100 ids and of 1 id on random existing ids. Goal: bank >= 1x LMDB;
2. the same without syncing, for completeness: the bank's default (writes reach the page cache, which
   survives a killed process) vs LMDB with sync=False;
3. lookups of random existing ids on those stores, in calls of 100,000, 256 (one user history), 16 and 1 ids,
   LMDB by its two read paths (`Cursor.getmulti`, and `Transaction.get` in a loop copying each value
   into the result, buffers=True), the faster of the two counting. Goal: bank >= 2x LMDB.

    python benchmarks/bench_bank_lmdb.py [--ids 1000000] [--dim 256] [--calls 300] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import slimengine as se

try:
    import lmdb
except ImportError as exc:  # an optional dependency: say how to get it
    raise SystemExit("this benchmark needs the lmdb package: pip install 'slimengine[bench]' (or pip install lmdb)") from exc

LOAD_BATCH = 10_000  # ids per call of the bulk load, as in bench_lemur.py


class LmdbStore:
    """The bank's data in LMDB, one write transaction per upsert call, one read transaction per lookup call."""

    def __init__(self, path: Path, dim: int, ids: int, sync: bool):
        self.record = np.dtype([("embedding", "<f4", (dim,)), ("write_time_us", "<i8"), ("model_version", "<u4")])
        # map_size only reserves address space; room for every id written about 4 times over.
        map_size = max(1 << 30, 4 * ids * (self.record.itemsize + 64))
        self.env = lmdb.open(str(path), map_size=map_size, sync=sync, metasync=sync)

    def _keys(self, ids: np.ndarray) -> list[bytes]:
        return ids.astype(">i8").view("V8").tolist()  # one 8-byte bytes object per id, in a C loop

    def upsert(self, ids: np.ndarray, embeddings: np.ndarray, model_version: int) -> None:
        records = np.empty(len(ids), self.record)
        records["embedding"] = embeddings
        records["write_time_us"] = time.time_ns() // 1000
        records["model_version"] = model_version
        values = records.view(f"V{self.record.itemsize}").tolist()
        with self.env.begin(write=True) as txn:
            txn.cursor().putmulti(zip(self._keys(ids), values))

    def lookup_get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Records [N] (rows of missing ids zero) and found [N], by Transaction.get per id."""
        out, found = np.zeros(len(ids), self.record), np.zeros(len(ids), bool)
        dest, size = memoryview(out.view(np.uint8)), self.record.itemsize
        with self.env.begin(buffers=True) as txn:  # values are views of the mapping, copied once into out
            get = txn.get
            for i, key in enumerate(self._keys(ids)):
                value = get(key)
                if value is not None:
                    dest[i * size : (i + 1) * size] = value
                    found[i] = True
        return out, found

    def lookup_getmulti(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The same by one Cursor.getmulti call (which leaves missing keys out of its answer)."""
        keys = self._keys(ids)
        with self.env.begin() as txn:
            pairs = txn.cursor().getmulti(keys)
        out, found = np.zeros(len(ids), self.record), np.zeros(len(ids), bool)
        dest, size = memoryview(out.view(np.uint8)), self.record.itemsize
        if len(pairs) == len(keys):  # every id found: the answer is in the order asked
            for i, (_, value) in enumerate(pairs):  # faster than joining the values (measured)
                dest[i * size : (i + 1) * size] = value
            found[:] = True
        else:
            values = dict(pairs)
            for i, key in enumerate(keys):
                if key in values:
                    dest[i * size : (i + 1) * size] = values[key]
                    found[i] = True
        return out, found

    def close(self) -> None:
        self.env.close()


def interleaved(calls: dict[str, Callable], args: list | Callable[[], object], rounds: int = 0) -> dict[str, list[float]]:
    """Seconds of each call, the calls taking turns (order rotating each round): on each argument of a
    list (the same for every call), or on a fresh argument from a function for every call of `rounds`."""
    names, times = list(calls), {name: [] for name in calls}
    for round_ in range(len(args) if isinstance(args, list) else rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            arg = args[round_] if isinstance(args, list) else args()
            start = time.perf_counter()
            calls[name](arg)
            times[name].append(time.perf_counter() - start)
    return times


def rate(n: float) -> str:
    return f"{n / 1e6:8.2f} M/s" if n >= 1e6 else f"{n / 1e3:8.1f} k/s" if n >= 1e4 else f"{n:8.0f}  /s"


def row(label: str, bank_rate: float, lmdb_rate: float, goal: float | None, note: str = "") -> str:
    ratio = bank_rate / lmdb_rate
    verdict = f"goal >= {goal:g}x {'PASS' if ratio >= goal else 'MISS'}" if goal else "(no goal)"
    return f"  {label:<26}{rate(bank_rate)}  {rate(lmdb_rate)}  {ratio:7.2f}x  {verdict}{note}"


def bench_upserts(bank: se.MemoryBank, store: LmdbStore, ids: int, dim: int, calls: int, goal: float | None) -> None:
    rng = np.random.default_rng(0)
    block = rng.standard_normal((LOAD_BATCH, dim), dtype=np.float32)
    stores = {"bank": lambda b: bank.upsert(b, block[: len(b)], model_version=1), "lmdb": lambda b: store.upsert(b, block[: len(b)], 1)}
    load = interleaved(stores, [np.arange(first, min(first + LOAD_BATCH, ids)) for first in range(0, ids, LOAD_BATCH)])
    print(row(f"load, calls of {LOAD_BATCH:,} ids", ids / sum(load["bank"]), ids / sum(load["lmdb"]), goal))
    for batch in (100, 1):
        times = interleaved(stores, [rng.integers(0, ids, batch) for _ in range(calls)])  # replacing existing ids
        print(row(f"calls of {batch} id{'s' * (batch > 1)}", batch / statistics.median(times["bank"]),
                  batch / statistics.median(times["lmdb"]), goal, f"  (median of {calls} calls)"))


def bench_lookups(bank: se.MemoryBank, store: LmdbStore, ids: int, calls: int) -> None:
    rng = np.random.default_rng(1)
    readers = {"bank": bank.lookup, "lmdb get": store.lookup_get, "lmdb getmulti": store.lookup_getmulti}
    check = rng.integers(0, ids, 1000)  # the three paths answer the same
    ours, (by_get, found_get), (by_multi, found_multi) = (read(check) for read in readers.values())
    assert ours.found.all() and found_get.all() and found_multi.all()
    assert np.array_equal(ours.embeddings, by_get["embedding"]) and np.array_equal(by_get, by_multi)
    assert np.array_equal(ours.model_versions, by_get["model_version"])
    assert np.abs(ours.write_times_us - by_get["write_time_us"]).max() < 60e6  # written in turns, microseconds apart
    for first in range(0, ids, 100_000):  # every page of both files mapped in first (not timed): no reader pays faults for another
        chunk = np.arange(first, min(first + 100_000, ids))
        bank.lookup(chunk), store.lookup_get(chunk), store.lookup_getmulti(chunk)
    for batch, n_calls in ((100_000, 10), (256, calls), (16, calls), (1, 3 * calls)):
        # Each call its own random ids: the two LMDB paths read the same tree, and asking one for the ids
        # the other has just read would find them in the CPU caches.
        times = interleaved(readers, lambda batch=batch: rng.integers(0, ids, batch), n_calls + 2)
        times = {name: t[2:] for name, t in times.items()}  # the first two of each: warm-up
        lmdb_rates = {name: batch / statistics.median(times[name]) for name in ("lmdb get", "lmdb getmulti")}
        faster = max(lmdb_rates, key=lmdb_rates.get)
        note = f"  (LMDB by {faster.split()[1]}; get {rate(lmdb_rates['lmdb get']).strip()}, getmulti {rate(lmdb_rates['lmdb getmulti']).strip()})"
        print(row(f"calls of {batch:,} id{'s' * (batch > 1)}", batch / statistics.median(times["bank"]), lmdb_rates[faster], 2, note))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=1_000_000, help="ids loaded into each store (default 1,000,000, as bench_lemur.py)")
    parser.add_argument("--dim", type=int, default=256, help="floats per embedding (default 256, as bench_lemur.py)")
    parser.add_argument("--calls", type=int, default=300, help="timed calls per small-batch row (default 300)")
    parser.add_argument("--workdir", type=Path, help="where the stores go (default: a temporary directory)")
    args = parser.parse_args()
    print(f"bank vs LMDB: {args.ids:,} ids x {args.dim} dims; both through Python: se.MemoryBank (ctypes into the C library) and "
          f"lmdb {lmdb.__version__} (C extension, LMDB {'.'.join(map(str, lmdb.version()))}); ids per second of wall clock, "
          "the two stores' calls interleaved")
    header = f"  {'':<26}{'bank':>12}  {'LMDB':>12}  {'bank/LMDB':>8}"
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        print("durable upserts, a sync in every call (bank sync_writes=1: fdatasync; LMDB sync=True, metasync=True); "
              "these wait for the disk, so other jobs writing to it slow both")
        print(header)
        bank, store = se.MemoryBank(work / "durable.bank", args.dim, sync_writes=True), LmdbStore(work / "durable.lmdb", args.dim, args.ids, True)
        bench_upserts(bank, store, args.ids, args.dim, args.calls // 3, 1)  # each call waits for the disk: fewer of them
        bank.close(), store.close()
        (work / "durable.bank").unlink(), shutil.rmtree(work / "durable.lmdb")

        print("upserts into the page cache, no sync (bank default; LMDB sync=False)")
        print(header)
        bank, store = se.MemoryBank(work / "cached.bank", args.dim), LmdbStore(work / "cached.lmdb", args.dim, args.ids, False)
        bench_upserts(bank, store, args.ids, args.dim, args.calls, None)
        print("lookups of random existing ids, into numpy arrays (bank: LookupResult; LMDB: one structured array)")
        print(header)
        bench_lookups(bank, store, args.ids, args.calls)
        bank.close(), store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
