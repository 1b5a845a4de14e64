"""The memory bank (docs/memory-bank.md) through the real C library: durability against a real
kill -9 of a writer process, torn tails, readers (threads and another process) during upserts, and
bad input that must change nothing."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import slimengine as se
from slimengine import _native

from .conftest import run_python

HEADER_BYTES = 64


def record_bytes(dim: int) -> int:
    return (40 + 4 * dim + 4 + 7) // 8 * 8


def values(ids: np.ndarray, dim: int, version: int = 0) -> np.ndarray:
    """The embedding every test writes for an id (and version): exact in float32, so any torn or mixed row shows."""
    ids = np.asarray(ids, dtype=np.int64)
    base = ((ids[:, None] * 31 + np.arange(dim)[None, :]) % 1009).astype(np.float32) / np.float32(1009)
    return base + np.float32(version)


def test_upsert_lookup_delete_survive_reopening(tmp_path):
    path = tmp_path / "docs.bank"
    dim = 24
    with se.MemoryBank(path, dim) as bank:
        before = time.time_ns() // 1000
        bank.upsert([3, 1, 2], values([3, 1, 2], dim), model_version=4)
        bank.upsert([2, 9], values([2, 9], dim, version=1), model_version=5)  # 2 replaced
        assert bank.delete([1, 77]) == 1  # absent ids are ignored
        assert len(bank) == 3
        got = bank.lookup([2, 3, 1, 9, 123])
        assert got.found.tolist() == [True, True, False, True, False]
        assert np.array_equal(got.embeddings[[0, 1, 3]], np.concatenate([values([2], dim, 1), values([3], dim), values([9], dim, 1)]))
        assert not got.embeddings[[2, 4]].any() and got.model_versions.tolist() == [5, 4, -1, 5, -1]
        assert (got.write_times_us[got.found] >= before).all() and (got.write_times_us[~got.found] == -1).all()
    with se.MemoryBank(path) as bank:  # dim from the file
        again = bank.lookup([2, 3, 1, 9, 123])
        assert bank.dim == dim and len(bank) == 3
        for field in ("embeddings", "found", "model_versions", "write_times_us"):
            assert np.array_equal(getattr(again, field), getattr(got, field)), field


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    import slimengine as se
    from tests.test_lemur_bank import values
    path, dim, batch, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rounds = range(first, first + 16)
    data = {r: (np.arange(r * batch, (r + 1) * batch), values(np.arange(r * batch, (r + 1) * batch), dim, r % 7)) for r in rounds}
    bank = se.MemoryBank(path, dim)
    for r in rounds:  # the loop is nearly all upsert, so the kill lands inside one
        bank.upsert(*data[r], model_version=r)
        print(r, flush=True)  # acknowledged: the upsert call returned
    raise SystemExit("not killed in time")
""")


def _run_writer_and_kill(path, dim, batch, first, rounds_before_kill, delay_s):
    """Start a writer process, let it acknowledge some rounds, SIGKILL it `delay_s` later (mid-stream); return
    the acknowledged rounds."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(dim), str(batch), str(first)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=root)
    acknowledged = []
    try:
        for line in proc.stdout:
            acknowledged.append(int(line))
            if len(acknowledged) >= rounds_before_kill:
                time.sleep(delay_s)  # into the next upsert
                break
    finally:
        proc.send_signal(signal.SIGKILL)  # while it is in the middle of its next upsert
        rest, err = proc.communicate(timeout=30)
    acknowledged += [int(x) for x in rest.split()]
    assert proc.returncode == -signal.SIGKILL, err
    assert len(acknowledged) >= rounds_before_kill, err
    return acknowledged


def _check_after_crash(path, dim, batch, acknowledged, last_round):
    with se.MemoryBank(path) as bank:  # reopening as the writer always succeeds (and cuts any torn tail)
        for r in acknowledged:  # every acknowledged write is there, exactly
            ids = np.arange(r * batch, (r + 1) * batch)
            got = bank.lookup(ids)
            assert got.found.all() and (got.model_versions == r).all(), f"round {r} lost"
            assert np.array_equal(got.embeddings, values(ids, dim, r % 7)), f"round {r} corrupted"
        present, partial = 0, 0
        for r in range(last_round + 3):  # anything else that survived is whole, never garbage
            ids = np.arange(r * batch, (r + 1) * batch)
            got = bank.lookup(ids)
            present += int(got.found.sum())
            partial += int(0 < got.found.sum() < batch)  # a round the kill interrupted: a prefix of it was kept
            assert (got.model_versions[got.found] == r).all()
            assert np.array_equal(got.embeddings[got.found], values(ids, dim, r % 7)[got.found])
        assert len(bank) == present
        size = path.stat().st_size
        assert size == HEADER_BYTES + (bank_records := size - HEADER_BYTES) // record_bytes(dim) * record_bytes(dim)
        assert bank_records // record_bytes(dim) >= present  # the writer cut the file at the end of the log
    return present, partial


def test_kill9_of_a_writer_mid_stream_loses_no_acknowledged_write(tmp_path):
    path, dim, batch = tmp_path / "crash.bank", 32, 16384  # 2.9 MB per upsert, a few ms: the kill lands inside one
    acknowledged, next_round, partial = [], 0, []
    for delay_s in (0.0, 0.001, 0.002, 0.003):  # four writers in turn on the same file, each killed with SIGKILL
        acknowledged += _run_writer_and_kill(path, dim, batch, first=next_round, rounds_before_kill=3, delay_s=delay_s)
        next_round = max(acknowledged) + 2
        present, cut = _check_after_crash(path, dim, batch, acknowledged, next_round)
        partial.append(cut)
    print(f"acknowledged rounds {len(acknowledged)}, ids present after four kill -9: {present}; "
          f"upserts cut in the middle by a kill (a prefix kept): {partial}")
    assert present >= len(acknowledged) * batch


def test_a_torn_or_corrupt_tail_is_dropped_and_reopening_succeeds(tmp_path):
    path, dim = tmp_path / "torn.bank", 8
    with se.MemoryBank(path, dim) as bank:
        for i in range(10):
            bank.upsert([i], values([i], dim), model_version=1)
    whole = path.stat().st_size
    with open(path, "ab") as f:  # a crash in the middle of an append: half a record
        f.write(os.urandom(record_bytes(dim) // 2))
    with se.MemoryBank(path, read_only=True) as reader:  # a reader ignores the torn tail and leaves the file alone
        assert len(reader) == 10
    assert path.stat().st_size == whole + record_bytes(dim) // 2
    with se.MemoryBank(path) as bank:  # the writer cuts it off and appends after the last whole record
        assert len(bank) == 10 and path.stat().st_size == whole
        bank.upsert([10], values([10], dim), model_version=1)
    # a record whose checksum no longer matches ends the log there: the records from it on are dropped
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 7 * record_bytes(dim) + 45] ^= 0x40
    path.write_bytes(bytes(data))
    with se.MemoryBank(path) as bank:
        assert len(bank) == 7 and bank.lookup([6, 7, 10]).found.tolist() == [True, False, False]
        assert np.array_equal(bank.lookup(np.arange(7)).embeddings, values(np.arange(7), dim))


def test_a_write_call_cut_short_is_indexed_not_at_all_never_in_part(tmp_path):
    """The last record of every write call is marked (format 2). A call of several staging chunks cut
    anywhere (a crash, or a reader scanning while the writer is still writing it) is left out whole;
    a reader's refresh takes all of it once its last record is there."""
    path, dim = tmp_path / "calls.bank", 256
    ids = np.arange(10_000, dtype=np.int64)  # past the writer's 8 MiB staging chunk of 1072-byte records
    with se.MemoryBank(path, dim) as bank:
        bank.upsert(ids[:10], values(ids[:10], dim), model_version=1)
        before = path.stat().st_size
        bank.upsert(ids, values(ids, dim, 2), model_version=2)
    data, rb = path.read_bytes(), record_bytes(dim)
    assert len(data) == before + len(ids) * rb
    cut = tmp_path / "cut.bank"
    for records in (1, (8 << 20) // rb + 3, len(ids) - 1):  # in the first chunk, past it, all but the last record
        cut.write_bytes(data[: before + records * rb])
        with se.MemoryBank(cut, read_only=True) as reader:
            got = reader.lookup(ids[:20])
            assert len(reader) == 10 and got.found.tolist() == [True] * 10 + [False] * 10
            assert (got.model_versions[:10] == 1).all()
        with se.MemoryBank(cut) as writer:  # a writer cuts the unfinished call off and appends after the first
            assert len(writer) == 10 and cut.stat().st_size == before
    cut.write_bytes(data[: before + (len(ids) - 1) * rb])
    with se.MemoryBank(cut, read_only=True) as reader:
        assert len(reader) == 10
        with open(cut, "ab") as f:  # the writer's last record lands
            f.write(data[before + (len(ids) - 1) * rb :])
        assert reader.refresh() == len(ids) and len(reader) == len(ids)
        got = reader.lookup(ids)
        assert (got.model_versions == 2).all() and np.array_equal(got.embeddings, values(ids, dim, 2))


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bitwise: the checksum of the bank format, independent of the C library's."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_format_1_banks_without_call_marks_are_still_read_and_written(tmp_path):
    """A bank written before call marks existed (format 1: every record stands alone) is rebuilt here
    from a format-2 file by rewriting its version and kinds with the checksums recomputed; the runtime
    reads it, and appends to it without marks, so that an older runtime could still read it."""
    path, dim = tmp_path / "v1.bank", 4
    ids = np.arange(6, dtype=np.int64)
    with se.MemoryBank(path, dim) as bank:
        bank.upsert(ids[:4], values(ids[:4], dim))
        bank.upsert(ids[4:], values(ids[4:], dim))
        assert bank.delete([1]) == 1
    data, rb, payload = bytearray(path.read_bytes()), record_bytes(dim), 40 + 4 * dim
    assert int.from_bytes(data[8:12], "little") == 2
    data[8:12] = (1).to_bytes(4, "little")
    data[60:64] = crc32c(bytes(data[:60])).to_bytes(4, "little")
    kinds = []
    for at in range(HEADER_BYTES, len(data), rb):
        kinds.append(int.from_bytes(data[at + 4 : at + 8], "little"))
        data[at + 4 : at + 8] = (kinds[-1] & 0xFF).to_bytes(4, "little")
        data[at + payload : at + payload + 4] = crc32c(bytes(data[at : at + payload])).to_bytes(4, "little")
    assert kinds == [1, 1, 1, 0x101, 1, 0x101, 0x102]  # what format 2 wrote: the last record of each call marked
    path.write_bytes(bytes(data))
    with se.MemoryBank(path) as bank:
        assert len(bank) == 5 and bank.lookup(ids).found.tolist() == [True, False, True, True, True, True]
        bank.upsert([9, 10], values([9, 10], dim))
    data = path.read_bytes()
    assert [int.from_bytes(data[at + 4 : at + 8], "little") for at in range(HEADER_BYTES + 7 * rb, len(data), rb)] == [1, 1]
    with se.MemoryBank(path, read_only=True) as bank:
        assert len(bank) == 7 and np.array_equal(bank.lookup([9, 10]).embeddings, values([9, 10], dim))


READER = textwrap.dedent("""
    import sys, time
    import numpy as np
    import slimengine as se
    from tests.test_lemur_bank import values
    path, dim, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    bank = se.MemoryBank(path, read_only=True)
    rng = np.random.default_rng(1)
    checks, bad, end = 0, 0, time.time() + seconds
    while time.time() < end:
        bank.refresh()
        ids = rng.integers(0, 2000, 256)
        got = bank.lookup(ids)
        f = got.found
        for v in np.unique(got.model_versions[f]):
            rows = f & (got.model_versions == v)
            bad += int((got.embeddings[rows] != values(ids[rows], dim, int(v))).any(axis=1).sum())
        checks += int(f.sum())
    print(checks, bad, len(bank))
""")


def test_readers_see_whole_consistent_rows_while_one_writer_upserts(tmp_path):
    path, dim = tmp_path / "busy.bank", 32
    bank = se.MemoryBank(path, dim)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    other_process = subprocess.Popen([sys.executable, "-c", READER, str(path), str(dim), "2.5"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=root)
    stop = threading.Event()
    results, failures = [], []

    def reader(seed):
        rng = np.random.default_rng(seed)
        checks = 0
        while not stop.is_set():
            ids = rng.integers(0, 2000, 512)
            got = bank.lookup(ids)  # the GIL is released inside the C call: real concurrency
            for v in np.unique(got.model_versions[got.found]):
                rows = got.found & (got.model_versions == v)
                if (got.embeddings[rows] != values(ids[rows], dim, int(v))).any():
                    failures.append((seed, int(v)))
            checks += int(got.found.sum())
        results.append(checks)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(0)
    start, upserts = time.time(), 0
    while time.time() - start < 2.0:  # the writer: rewrites random ids with a new version each time
        version = upserts % 50
        ids = np.unique(rng.integers(0, 2000, 200))
        bank.upsert(ids, values(ids, dim, version), model_version=version)
        upserts += 1
    stop.set()
    for t in threads:
        t.join()
    out, err = other_process.communicate(timeout=60)
    assert other_process.returncode == 0, err
    checks, bad, seen = (int(x) for x in out.split())
    print(f"{upserts} upserts; rows checked: threads {results}, other process {checks} (it saw {seen} ids)")
    assert not failures and bad == 0
    assert min(results) > 0 and checks > 0 and seen > 0
    bank.close()


def _raw(lib, arr, dtype):
    dims = (ctypes.c_int64 * arr.ndim)(*arr.shape)
    return ctypes.pointer(_native.SlimTensor(arr.ctypes.data, dtype, 1, 0, arr.ndim, dims, None)), dims


def test_bad_input_gets_clear_errors_and_changes_nothing(tmp_path):
    path, dim = tmp_path / "strict.bank", 16
    bank = se.MemoryBank(path, dim)
    bank.upsert([1, 2], values([1, 2], dim), model_version=3)
    snapshot = path.read_bytes()

    def rejected(call, status, message):
        with pytest.raises(se.SlimError) as err:
            call()
        assert err.value.status == status and message in str(err.value), str(err.value)
        assert path.read_bytes() == snapshot and len(bank) == 2  # nothing written, nothing indexed

    rejected(lambda: bank.upsert([5], np.zeros((1, dim + 1), np.float32)), "SLIM_ERR_SHAPE", "embeddings: shape [1,17], expected [1,16]")
    rejected(lambda: bank.upsert([5, 6], values([5], dim)), "SLIM_ERR_SHAPE", "expected [2,16]")
    nan = values([5, 6], dim)
    nan[1, 3] = np.nan
    rejected(lambda: bank.upsert([5, 6], nan), "SLIM_ERR_NUMERICS", "embeddings contains NaN or Inf (element 19)")
    rejected(lambda: bank.upsert([5, -6], values([5, 6], dim)), "SLIM_ERR_INVALID_ARGUMENT", "ids: element 1 is -6")
    rejected(lambda: bank.lookup(np.zeros((1, 2), np.int64)), "SLIM_ERR_SHAPE", "ids: rank 2, expected [N]")
    with pytest.raises(TypeError, match="ids: dtype must be an integer type"):
        bank.upsert([5.5], values([5], dim))

    # wrong dtypes reach the C boundary untouched through raw ctypes
    lib = _native.lib()
    ids_f, keep1 = _raw(lib, np.array([5.0], np.float32), 0)
    emb, keep2 = _raw(lib, values([5], dim), 0)
    assert lib.slim_status_name(lib.slim_bank_upsert(bank._handle, ids_f, emb, 0)) == b"SLIM_ERR_DTYPE"
    assert b"ids: dtype must be int64" in lib.slim_last_error()
    ids_ok, keep3 = _raw(lib, np.array([5], np.int64), 3)
    emb_i, keep4 = _raw(lib, np.zeros((1, dim), np.int64), 3)
    assert lib.slim_status_name(lib.slim_bank_upsert(bank._handle, ids_ok, emb_i, 0)) == b"SLIM_ERR_DTYPE"
    assert b"embeddings: dtype must be float32" in lib.slim_last_error()
    assert path.read_bytes() == snapshot and len(bank) == 2
    del keep1, keep2, keep3, keep4

    unknown = bank.lookup([999, 1])  # an unknown id is not an error for lookup: found=False, zeros, -1
    assert unknown.found.tolist() == [False, True] and not unknown.embeddings[0].any() and unknown.model_versions[0] == -1

    with pytest.raises(se.SlimError, match="is already open for writing") as err:  # one writer per file
        se.MemoryBank(path)
    assert err.value.status == "SLIM_ERR_IO"
    with se.MemoryBank(path, read_only=True) as reader:
        with pytest.raises(se.SlimError, match="is open read-only"):
            reader.upsert([7], values([7], dim))
        assert len(reader) == 2
    with pytest.raises(se.SlimError, match="holds 16-d embeddings, not 8-d"):
        se.MemoryBank(path, 8, read_only=True)
    assert path.read_bytes() == snapshot
    bank.close()

    not_a_bank = tmp_path / "notes.txt"
    not_a_bank.write_text("hello" * 100)
    with pytest.raises(se.SlimError, match="is not a slimengine memory bank"):
        se.MemoryBank(not_a_bank, dim)
    assert not_a_bank.read_text() == "hello" * 100
    with pytest.raises(se.SlimError, match="does not exist"):
        se.MemoryBank(tmp_path / "missing.bank", dim, read_only=True)
    with pytest.raises(se.SlimError, match="dim is required to create a new bank"):
        se.MemoryBank(tmp_path / "new.bank")
    assert not (tmp_path / "new.bank").exists()


def test_a_reader_indexes_again_when_the_log_was_cut_back(tmp_path):
    """A writer takes back the records of a failed write (ftruncate); a reader that had indexed them
    must not keep serving them after its next refresh."""
    path, dim = tmp_path / "cut.bank", 8
    ids = np.arange(10, dtype=np.int64)
    with se.MemoryBank(path, dim) as writer:
        writer.upsert(ids[:6], values(ids[:6], dim))
        writer.upsert(ids[6:], values(ids[6:], dim))
    reader = se.MemoryBank(path, read_only=True)
    assert reader.lookup(ids).found.all()
    os.truncate(path, 64 + 6 * record_bytes(dim))  # what the writer's undo of the second call leaves
    assert reader.refresh() == 6 and len(reader) == 6
    found = reader.lookup(ids).found
    assert found[:6].all() and not found[6:].any()
    np.testing.assert_array_equal(reader.lookup(ids[:6]).embeddings, values(ids[:6], dim))


def test_a_reader_notices_records_taken_back_and_written_over(tmp_path):
    """After a failed write the writer takes its records back and may write other calls in their
    place, before a reader refreshes: the reader must drop what it had (an indexed call, or an
    unfinished one) and index what is there, never a mix."""
    dim = 8
    rb = record_bytes(dim)

    def bank_file(name, *calls):  # the bytes a writer leaves after these upsert calls
        path = tmp_path / name
        with se.MemoryBank(path, dim) as writer:
            for ids in calls:
                writer.upsert(ids, values(ids, dim, int(ids[0]) // 100))
        return path.read_bytes()

    a, b = np.arange(6, dtype=np.int64), np.arange(6, 10, dtype=np.int64)
    for q in (np.arange(100, 106), np.arange(100, 104)):  # the new call's last record past, or exactly on, b's last
        written = bank_file(f"ab{len(q)}.bank", a, b)
        over = bank_file(f"aq{len(q)}.bank", a, q)
        path = tmp_path / f"live{len(q)}.bank"
        path.write_bytes(written)
        reader = se.MemoryBank(path, read_only=True)
        assert len(reader) == 10
        with open(path, "r+b") as f:  # the same file (inode) the reader maps: b taken back, q written in its place
            f.truncate(HEADER_BYTES + 6 * rb)
            f.seek(0, os.SEEK_END)
            f.write(over[HEADER_BYTES + 6 * rb :])
        reader.refresh()
        got = reader.lookup(np.concatenate([a, b, q]))
        assert got.found.tolist() == [True] * 6 + [False] * 4 + [True] * len(q)
        assert np.array_equal(got.embeddings[10:], values(q, dim, 1)) and len(reader) == 6 + len(q)
        reader.close()

    # an unfinished call seen by a reader, then taken back and replaced by another call
    unfinished = bank_file("ap.bank", a, np.arange(200, 205))
    done = bank_file("aq2.bank", a, np.arange(100, 104))
    path = tmp_path / "live2.bank"
    path.write_bytes(unfinished[: HEADER_BYTES + 9 * rb])  # a, then 3 of the 5 records of the next call
    with se.MemoryBank(path, read_only=True) as reader:
        assert len(reader) == 6 and reader.refresh() == 0
        with open(path, "r+b") as f:
            f.truncate(HEADER_BYTES + 6 * rb)
            f.seek(0, os.SEEK_END)
            f.write(done[HEADER_BYTES + 6 * rb :])
        assert reader.refresh() == 4 and len(reader) == 10
        assert not reader.lookup(np.arange(200, 205)).found.any()
        assert np.array_equal(reader.lookup(np.arange(100, 104)).embeddings, values(np.arange(100, 104), dim, 1))


def test_a_second_writer_is_refused_and_creation_leaves_no_temporary_file(tmp_path):
    """A new bank is published with link() from a uniquely named temporary file (so two creators
    racing cannot replace each other's file; the race itself is not staged here)."""
    path, dim = tmp_path / "race.bank", 4
    first = se.MemoryBank(path, dim)
    first.upsert(np.array([1], np.int64), values(np.array([1]), dim))
    with pytest.raises(se.SlimError, match="already open for writing"):
        se.MemoryBank(path, dim)
    first.close()
    with se.MemoryBank(path, read_only=True) as reader:
        assert reader.lookup(np.array([1], np.int64)).found.all()
    assert not list(tmp_path.glob("race.bank.tmp-*"))


def test_a_fifo_or_directory_in_place_of_a_bank_fails_instead_of_hanging(tmp_path):
    """Found by tests/test_fuzz.py: a reader's open of a FIFO waited for a writer forever (run in a child
    process, so that the old behaviour fails the test instead of hanging it)."""
    fifo = tmp_path / "fifo.bank"
    os.mkfifo(fifo)
    proc = run_python(f"import slimengine as se\ntry:\n    se.MemoryBank({str(fifo)!r}, read_only=True)\n"
                      "except se.SlimError as e:\n    print(e.status, e)")
    assert proc.returncode == 0 and proc.stdout.startswith("SLIM_ERR_IO") and "is not a regular file" in proc.stdout, proc
    folder = tmp_path / "folder.bank"
    folder.mkdir()
    for path, read_only in ((fifo, False), (folder, True), (folder, False)):
        with pytest.raises(se.SlimError) as err:
            se.MemoryBank(path, 4, read_only=read_only)
        assert err.value.status == "SLIM_ERR_IO" and ("is not a regular file" in str(err.value) or "Is a directory" in str(err.value))
