"""The memory bank (docs/memory-bank.md) through the real C library: durability against a real
kill -9 of a writer process, torn tails, readers (threads and another process) during upserts, and
bad input that must change nothing."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest

import slimengine as se
from slimengine import _native
from tests.conftest import bank_address

from .bank_format import HEADER_BYTES, crc32c, record_bytes
from .conftest import run_python


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
    # records damaged beyond correction (two bits each), with no valid record after them: whole, non-zero records
    # at the tail are damage, not a torn tail (test_a_damaged_last_call_is_damage_not_a_torn_tail): opening refuses
    data = bytearray(path.read_bytes())
    for record in range(7, 11):
        data[HEADER_BYTES + record * record_bytes(dim) + 45] ^= 0x40
        data[HEADER_BYTES + record * record_bytes(dim) + 46] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(se.SlimError, match=rf"byte {HEADER_BYTES + 7 * record_bytes(dim)} is damaged beyond correction"):
        se.MemoryBank(path)
    assert path.read_bytes() == data


def test_a_damaged_last_call_is_damage_not_a_torn_tail(tmp_path):
    """Two bits flipped in the record of the last write call (a delete, an upsert): no valid call end follows it, but
    a whole, non-zero record is damage, not a torn tail (a crash mid-append leaves a short record or zeros). Reader
    (open and refresh) and writer refuse, the file untouched: dropping it would bring the deleted id back, and the
    writer would cut the delete off for good. Repair hides every id live before it. A real torn tail still opens."""
    dim, rb = 4, record_bytes(4)
    at = HEADER_BYTES + 2 * rb  # the third record: the last call's
    for last in ("delete", "upsert"):
        path = tmp_path / f"{last}.bank"
        with se.MemoryBank(path, dim) as bank:
            bank.upsert([1, 2], values([1, 2], dim))
        with se.MemoryBank(path, read_only=True) as reader, se.MemoryBank(path) as bank:
            if last == "delete":
                bank.delete([1])
            else:
                bank.upsert([3], values([3], dim))
            bank.close()
            data = bytearray(path.read_bytes())
            data[at + 16] ^= 0x03  # two bits of the id
            path.write_bytes(bytes(data))
            with pytest.raises(se.SlimError, match=rf"byte {at} is damaged beyond correction"):
                reader.refresh()
            assert reader.lookup([1, 2]).found.tolist() == [True, True]  # what it had indexed before
        for read_only in (True, False):
            with pytest.raises(se.SlimError, match=rf"byte {at} is damaged beyond correction.*slimengine bank repair"):
                se.MemoryBank(path, read_only=read_only)
        assert path.read_bytes() == data  # the writer cut nothing
        report = se.MemoryBank.repair(path)
        assert (report.unreadable_records, report.hidden_ids, report.ids, report.tail_bytes) == (1, 2, 0, 0)
        with se.MemoryBank(path) as bank:
            assert bank.lookup([1, 2, 3]).found.tolist() == [False, False, False]
    path = tmp_path / "torn.bank"
    with se.MemoryBank(path, dim) as bank:
        bank.upsert([1, 2], values([1, 2], dim))
    whole = path.stat().st_size
    with open(path, "ab") as f:  # what a crash mid-append leaves: zeros, then part of a record
        f.write(bytes(2 * rb) + os.urandom(rb // 2))
    with se.MemoryBank(path, read_only=True) as reader:
        assert len(reader) == 2 and reader.recovery.tail_bytes == 2 * rb + rb // 2
    with se.MemoryBank(path) as bank:
        assert len(bank) == 2 and path.stat().st_size == whole


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


def _to_format_1(path, dim: int) -> list[int]:
    """Rewrites a format-2 bank as format 1 (version 1, no call marks, checksums recomputed); returns the kinds it had."""
    data, rb, payload = bytearray(path.read_bytes()), record_bytes(dim), 40 + 4 * dim
    assert int.from_bytes(data[8:12], "little") == 2
    data[8:12] = (1).to_bytes(4, "little")
    data[60:64] = crc32c(bytes(data[:60])).to_bytes(4, "little")
    kinds = []
    for at in range(HEADER_BYTES, len(data), rb):
        kinds.append(int.from_bytes(data[at + 4 : at + 8], "little"))
        data[at + 4 : at + 8] = (kinds[-1] & 0xFF).to_bytes(4, "little")
        data[at + payload : at + payload + 4] = crc32c(bytes(data[at : at + payload])).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return kinds


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
    kinds, rb = _to_format_1(path, dim), record_bytes(dim)
    assert kinds == [1, 1, 1, 0x101, 1, 0x101, 0x102]  # what format 2 wrote: the last record of each call marked
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
    assert lib.slim_status_name(lib.slim_bank_upsert(bank_address(bank), ids_f, emb, 0)) == b"SLIM_ERR_DTYPE"
    assert b"ids: dtype must be int64" in lib.slim_last_error()
    ids_ok, keep3 = _raw(lib, np.array([5], np.int64), 3)
    emb_i, keep4 = _raw(lib, np.zeros((1, dim), np.int64), 3)
    assert lib.slim_status_name(lib.slim_bank_upsert(bank_address(bank), ids_ok, emb_i, 0)) == b"SLIM_ERR_DTYPE"
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


def _flip_bit(path, record: int, dim: int, byte: int = 45) -> None:
    """One bit flipped inside a record's embedding: what bit rot does to a record in the middle of the file."""
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + record * record_bytes(dim) + byte] ^= 0x40
    path.write_bytes(bytes(data))


def _recovery(bank) -> tuple:
    r = bank.recovery
    return r.damaged_records, r.first_damaged_offset, r.tail_bytes


def test_a_record_with_one_flipped_bit_is_corrected_and_worse_damage_refuses_until_repair(tmp_path):
    """One flipped bit in a record (5,000 ids in calls of 10): its checksum locates the bit, so opening keeps the
    whole call and every later one; the damaged upsert's id is missing until written again (its bytes in the file are
    damaged), and what was found is reported (C: slim_bank_recovery_info; Python: bank.recovery and a RuntimeWarning).
    Two flipped bits: the record's id is unknown, so reader and writer refuse to open, naming the repair."""
    path, dim, per_call = tmp_path / "rot.bank", 256, 10
    ids, rb = np.arange(5000, dtype=np.int64), record_bytes(dim)
    with se.MemoryBank(path, dim) as bank:
        for first in range(0, len(ids), per_call):
            bank.upsert(ids[first : first + per_call], values(ids[first : first + per_call], dim), model_version=1)
    clean, size = path.read_bytes(), path.stat().st_size

    for record in (3, 19):  # inside the first call; the last record of the second (where its call ends)
        path.write_bytes(clean)
        _flip_bit(path, record, dim)
        for read_only in (False, True):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                bank = se.MemoryBank(path, read_only=read_only)
            with bank:
                got = bank.lookup(ids)
                assert len(bank) == len(ids) - 1 and got.found.tolist() == [i != record for i in ids]
                assert np.array_equal(got.embeddings[got.found], values(ids[got.found], dim))
                assert _recovery(bank) == (1, HEADER_BYTES + record * rb, 0)
            assert [w.category for w in caught] == [RuntimeWarning]
            assert re.search(rf"1 record.* at byte {HEADER_BYTES + record * rb}\) had one flipped bit", str(caught[0].message))
    assert path.stat().st_size == size  # the writer cut nothing: the damage is not a tail
    with pytest.warns(RuntimeWarning), se.MemoryBank(path) as bank:  # a writer appends after the log, damage and all
        bank.upsert([19], values([19], dim, 2), model_version=2)
    with pytest.warns(RuntimeWarning), se.MemoryBank(path, read_only=True) as reader:
        assert len(reader) == len(ids) and _recovery(reader) == (1, HEADER_BYTES + 19 * rb, 0)
        assert np.array_equal(reader.lookup([19]).embeddings, values([19], dim, 2))

    # a reader's refresh: damage in records a writer appended after the reader opened
    path.write_bytes(clean[: HEADER_BYTES + 100 * rb])
    with se.MemoryBank(path, read_only=True) as reader:
        assert len(reader) == 100
        with open(path, "ab") as f:
            rest = bytearray(clean[HEADER_BYTES + 100 * rb :])
            rest[50 * rb + 45] ^= 0x40  # record 150
            f.write(bytes(rest))
        with pytest.warns(RuntimeWarning, match="1 record"):
            reader.refresh()
        assert len(reader) == len(ids) - 1 and reader.lookup(ids).found.tolist() == [i != 150 for i in ids]
        assert _recovery(reader) == (1, HEADER_BYTES + 150 * rb, 0)

    # two flipped bits: beyond correction; the file is left as it was, and repair loses only the first call
    path.write_bytes(clean)
    _flip_bit(path, 3, dim)
    _flip_bit(path, 3, dim, byte=200)
    for read_only in (False, True):
        with pytest.raises(se.SlimError, match=rf"byte {HEADER_BYTES + 3 * rb} is damaged beyond correction"):
            se.MemoryBank(path, read_only=read_only)
    assert path.stat().st_size == size
    damaged = path.read_bytes()
    path.write_bytes(clean[: HEADER_BYTES + 100 * rb])  # a reader's refresh onto such damage refuses too, and keeps what it had
    with se.MemoryBank(path, read_only=True) as reader, se.MemoryBank(path) as writer:
        with pytest.raises(se.SlimError, match="already open for writing"):
            se.MemoryBank.repair(path)
        writer.close()
        later = bytearray(clean)
        later[HEADER_BYTES + 150 * rb + 45] ^= 0x41  # two bits of record 150
        path.write_bytes(bytes(later))
        with pytest.raises(se.SlimError, match=rf"byte {HEADER_BYTES + 150 * rb} is damaged beyond correction"):
            reader.refresh()
        assert len(reader) == 150 and reader.lookup(ids[:150]).found.all()  # the whole calls before the damage
    path.write_bytes(damaged)
    report = se.MemoryBank.repair(path)
    assert (report.unreadable_records, report.dropped_records, report.hidden_ids, report.ids) == (1, 9, 0, len(ids) - per_call)
    with se.MemoryBank(path, read_only=True) as reader:
        assert reader.lookup(ids).found.tolist() == [i >= per_call for i in ids] and _recovery(reader) == (0, -1, 0)

    path.write_bytes(clean)
    with se.MemoryBank(path) as bank:  # nothing to report on an intact file
        assert _recovery(bank) == (0, -1, 0)
        lib, info = _native.lib(), _native.BankRecovery(struct_size=8)  # a caller's struct too small: refused, not overrun
        assert lib.slim_status_name(lib.slim_bank_recovery_info(bank_address(bank), ctypes.byref(info))) == b"SLIM_ERR_INVALID_ARGUMENT"
        assert b"slim_bank_recovery.struct_size is 8; set it to sizeof(slim_bank_recovery)" in lib.slim_last_error()


def test_a_damaged_record_in_a_format_1_bank_costs_only_itself(tmp_path):
    path, dim = tmp_path / "v1rot.bank", 4
    ids = np.arange(8, dtype=np.int64)
    with se.MemoryBank(path, dim) as bank:
        bank.upsert(ids, values(ids, dim))
    _to_format_1(path, dim)
    _flip_bit(path, 2, dim, byte=41)
    with pytest.warns(RuntimeWarning), se.MemoryBank(path) as bank:  # format 1: every record stands alone
        assert bank.lookup(ids).found.tolist() == [True, True, False, True, True, True, True, True]
        assert _recovery(bank) == (1, HEADER_BYTES + 2 * record_bytes(dim), 0)


# ------------------------------------------------ damage that must never bring a deleted document back, and repair

# Write calls of the small bank below: (kind, ids, version). What it holds when intact: LIVE; what it deleted: DELETED.
CALLS = [("upsert", [0, 1, 2], 1), ("delete", [1], 0), ("upsert", [3, 4, 0], 2), ("delete", [0, 3], 0), ("upsert", [5], 3)]
LIVE, DELETED = {2: 1, 4: 2, 5: 3}, [0, 1, 3]  # id -> model version


def _small_bank(path, dim: int = 2) -> bytes:
    with se.MemoryBank(path, dim) as bank:
        for kind, ids, version in CALLS:
            if kind == "upsert":
                bank.upsert(ids, values(ids, dim, version), model_version=version)
            else:
                assert bank.delete(ids) == len(ids)
    return path.read_bytes()


def _quiet_open(path, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return se.MemoryBank(path, **options)


def _assert_no_deleted_id_and_no_wrong_row(bank, dim: int, complete: bool) -> None:
    """No deleted id is found; every id found holds its newest row; with `complete`, every live id is found."""
    ids = np.arange(8)
    got = bank.lookup(ids)
    assert not got.found[DELETED].any(), f"deleted ids came back: {ids[DELETED][got.found[DELETED]]}"
    for i in np.flatnonzero(got.found):
        assert int(i) in LIVE and got.model_versions[i] == LIVE[int(i)]
        assert np.array_equal(got.embeddings[i], values([i], dim, LIVE[int(i)])[0])
    if complete:
        assert got.found.tolist() == [i in LIVE for i in ids]


def _each_bit_flipped(path, bits):
    """Flips each bit of `bits` (numbered from the file's start) in place, yields, and flips it back: no file rewritten."""
    with open(path, "r+b", buffering=0) as f:
        for bit in bits:
            at = bit // 8
            byte = os.pread(f.fileno(), 1, at)[0]
            os.pwrite(f.fileno(), bytes([byte ^ (1 << bit % 8)]), at)
            yield bit
            os.pwrite(f.fileno(), bytes([byte]), at)


def _repair_samples(first_byte: int, size: int) -> list[int]:
    """One bit of every 8 bytes of a span: repair() syncs a new file, too slow to run for every bit."""
    return [8 * at + (at // 8) % 8 for at in range(first_byte, first_byte + size, 8)]


def test_no_single_bit_flip_in_the_log_brings_a_deleted_document_back(tmp_path):
    """Every bit of every delete record and of the record ending the call before a delete, flipped one at a
    time (before the fix, 1,664 of this bank's 4,480 one-bit flips brought a deleted id back): opening never finds a deleted id, never returns a row other than an id's newest (a
    damaged upsert's id is missing until written again), and `repair` brings back exactly the live ids."""
    path, dim = tmp_path / "flip.bank", 2
    clean, rb = _small_bank(path, dim), record_bytes(dim)
    records = [3, 6, 7, 8]  # a delete call of one record, the end of the call before a delete call of two, its records
    assert [int.from_bytes(clean[HEADER_BYTES + r * rb + 4 : HEADER_BYTES + r * rb + 8], "little") for r in records] == [
        0x102, 0x101, 2, 0x102]
    for record in records:
        first = HEADER_BYTES + record * rb
        path.write_bytes(clean)  # repair replaced it
        for _ in _each_bit_flipped(path, range(8 * first, 8 * (first + rb))):
            with _quiet_open(path, read_only=True) as bank:
                _assert_no_deleted_id_and_no_wrong_row(bank, dim, complete=False)
                assert bank.recovery.damaged_records <= 1
        for bit in _repair_samples(first, rb):
            data = bytearray(clean)
            data[bit // 8] ^= 1 << bit % 8
            path.write_bytes(bytes(data))
            with _quiet_open(path) as bank:  # the writer's scan is the reader's
                _assert_no_deleted_id_and_no_wrong_row(bank, dim, complete=False)
            report = se.MemoryBank.repair(path)
            assert report.corrected_records <= 1 and report.unreadable_records == report.hidden_ids == 0
            with se.MemoryBank(path, read_only=True) as bank:
                assert bank.recovery.damaged_records == 0
                _assert_no_deleted_id_and_no_wrong_row(bank, dim, complete=True)
    # an id hidden by its corrected upsert and then deleted: the delete is written, so repair does not bring it back
    data = bytearray(clean)
    data[HEADER_BYTES + 2 * rb + 44] ^= 1  # the upsert of 2, in its embedding
    path.write_bytes(bytes(data))
    with _quiet_open(path) as bank:
        assert not bank.lookup([2]).found[0] and bank.delete([2]) == 0  # not visible: not counted
    assert se.MemoryBank.repair(path).corrected_records == 1
    with se.MemoryBank(path) as bank:
        assert bank.lookup(np.arange(8)).found.tolist() == [i in (4, 5) for i in range(8)]


def test_a_delete_damaged_beyond_correction_refuses_to_open_until_repaired(tmp_path):
    """Two bits flipped in the id of a delete record: which id it deleted is unknown. Reader and writer refuse to open
    (naming `slimengine bank repair`); repair keeps what was written after the damage and hides every id written
    before it (any of them could be the one deleted): no deleted id comes back."""
    path, dim = tmp_path / "rot2.bank", 2
    clean, rb = _small_bank(path, dim), record_bytes(dim)
    delete_at = HEADER_BYTES + 7 * rb  # the 8th record: the delete of 0 (the call deleting 0 and 3)
    assert int.from_bytes(clean[delete_at + 4 : delete_at + 8], "little") & 0xFF == 2
    data = bytearray(clean)
    data[delete_at + 16] ^= 0x03  # the id: 0 -> 3
    path.write_bytes(bytes(data))
    for read_only in (True, False):
        with pytest.raises(se.SlimError, match=rf"byte {delete_at} is damaged beyond correction.*slimengine bank repair"):
            se.MemoryBank(path, read_only=read_only)
    report = se.MemoryBank.repair(path)
    assert (report.unreadable_records, report.dropped_records, report.ids) == (1, 1, 1)  # the delete of 3 went with it
    assert report.hidden_ids == 4  # 0, 2, 3, 4 were live before the damaged record: any could be the id it deleted
    with se.MemoryBank(path) as bank:
        assert bank.lookup(np.arange(8)).found.tolist() == [False] * 5 + [True, False, False]
        _assert_no_deleted_id_and_no_wrong_row(bank, dim, complete=False)


def test_every_single_bit_flip_in_the_header_is_corrected_and_repair_recovers_every_record(tmp_path):
    """Each of the header's 512 bits flipped: reader and writer open with every record (the header corrected in
    memory, reported); `repair` (on one bit of every field) writes the header back as it was."""
    path, dim = tmp_path / "head.bank", 2
    clean = _small_bank(path, dim)
    for _ in _each_bit_flipped(path, range(HEADER_BYTES * 8)):
        for read_only in (True, False):
            with _quiet_open(path, read_only=read_only) as bank:
                assert bank.recovery.header_corrected == 1 and bank.dim == dim
                _assert_no_deleted_id_and_no_wrong_row(bank, dim, complete=True)
    assert path.read_bytes() == clean
    data = bytearray(clean)
    data[12] ^= 0x10  # dim 2 -> 18
    path.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="the header had one flipped bit"), se.MemoryBank(path, read_only=True) as bank:
        assert bank.dim == dim
    for bit in _repair_samples(0, HEADER_BYTES):
        data = bytearray(clean)
        data[bit // 8] ^= 1 << bit % 8
        path.write_bytes(bytes(data))
        assert se.MemoryBank.repair(path).header == 1
        assert path.read_bytes()[:HEADER_BYTES] == clean[:HEADER_BYTES]  # the same header, creation time included
        with se.MemoryBank(path) as bank:
            assert bank.recovery.header_corrected == 0
            _assert_no_deleted_id_and_no_wrong_row(bank, dim, complete=True)


def test_a_header_damaged_beyond_correction_is_rebuilt_from_the_records(tmp_path):
    """A header overwritten (a bad block): opening refuses and names the repair; `slimengine bank repair PATH`
    rebuilds the header from the records (dim, and the format version: call marks or none) and keeps every record."""
    for version in (2, 1):
        path, dim = tmp_path / f"v{version}.bank", 3
        _small_bank(path, dim)
        if version == 1:
            _to_format_1(path, dim)
        data = bytearray(path.read_bytes())
        data[8:HEADER_BYTES] = os.urandom(HEADER_BYTES - 8)  # the magic is intact: a bank, with a header beyond correction
        path.write_bytes(bytes(data))
        with pytest.raises(se.SlimError, match=r"header is damaged beyond correction.*slimengine bank repair"):
            se.MemoryBank(path, read_only=True)
        proc = subprocess.run([sys.executable, "-m", "slimengine.cli", "bank", "repair", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "header rebuilt from the records" in proc.stdout and f"{len(LIVE)} ids" in proc.stdout
        assert int.from_bytes(path.read_bytes()[8:12], "little") == version
        with se.MemoryBank(path) as bank:
            assert bank.dim == dim and bank.recovery.damaged_records == 0
            _assert_no_deleted_id_and_no_wrong_row(bank, dim, complete=True)
    path.write_bytes(b"SLIMBANK" + bytes(HEADER_BYTES - 8))  # no record to take the width from
    with pytest.raises(se.SlimError, match="no intact record"):
        se.MemoryBank.repair(path)
    missing = subprocess.run([sys.executable, "-m", "slimengine.cli", "bank", "repair", str(tmp_path / "nope.bank")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "not a file" in missing.stderr


def test_a_writer_that_opens_while_the_bank_is_replaced_writes_to_the_new_file(tmp_path):
    """Repair renames its new file over the bank, then lets go of the lock. A writer that opened the old file just
    before and locks it just after would write to the old, unlinked file: its acknowledged upsert lost. A writer (and a
    repair) checks that the path still names the file it locked, and opens again if not. An LD_PRELOAD shim makes the
    race deterministic: it renames another bank over the path just before the library's flock."""
    shim = tmp_path / "shim.so"
    (tmp_path / "shim.c").write_text(textwrap.dedent("""\
        #define _GNU_SOURCE
        #include <dlfcn.h>
        #include <stdio.h>
        #include <stdlib.h>
        int flock(int fd, int op) {
            static int done;
            const char *from = getenv("SHIM_RENAME_FROM"), *to = getenv("SHIM_RENAME_TO");
            if (!done && from && to) {
                done = 1;
                rename(from, to);
            }
            return ((int (*)(int, int))dlsym(RTLD_NEXT, "flock"))(fd, op);
        }
    """))
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "shim.c"), "-ldl"], check=True)
    path, new, dim = tmp_path / "b.bank", tmp_path / "new.bank", 4
    for p, ids in ((path, [1]), (new, [2])):
        with se.MemoryBank(p, dim) as bank:
            bank.upsert(ids, values(ids, dim))
    code = f"import numpy as np, slimengine as se\nwith se.MemoryBank({str(path)!r}) as b:\n    b.upsert([3], np.ones((1, {dim}), np.float32))"
    env = dict(os.environ, LD_PRELOAD=str(shim), SHIM_RENAME_FROM=str(new), SHIM_RENAME_TO=str(path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not new.exists()  # the shim did replace the bank
    with se.MemoryBank(path, read_only=True) as reader:
        assert reader.lookup([1, 2, 3]).found.tolist() == [False, True, True]


def test_repair_is_not_blocked_by_a_leftover_temporary_of_a_killed_repair(tmp_path):
    """`bank repair` killed mid-run leaves its temporary file; a later repair (same pid or not) removes it (it holds
    the writer lock: no repair is running) and writes its own under a name that cannot collide."""
    path = tmp_path / "b.bank"
    _small_bank(path)
    (tmp_path / f"b.bank.repair-{os.getpid()}").write_bytes(b"half a repair")
    (tmp_path / "b.bank.repaired").write_bytes(b"not a temporary")  # left alone
    assert se.MemoryBank.repair(path).ids == len(LIVE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bank", "b.bank.repaired"]
    with se.MemoryBank(path) as bank:
        _assert_no_deleted_id_and_no_wrong_row(bank, 2, complete=True)


def test_a_bank_with_a_long_file_name_can_be_repaired(tmp_path):
    """A 250-character file name: the temporary gets a short name (`.slimbank-repair-...`) in the same directory.
    A path too long for the system is a one-line error, exit 2."""
    path = tmp_path / ("b" * 250)
    _small_bank(path)
    assert se.MemoryBank.repair(path).ids == len(LIVE)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    with se.MemoryBank(path) as bank:
        _assert_no_deleted_id_and_no_wrong_row(bank, 2, complete=True)
    proc = subprocess.run([sys.executable, "-m", "slimengine.cli", "bank", "repair", str(tmp_path / ("b" * 256))],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "too long" in proc.stderr, proc.stderr


def test_repairing_a_file_that_is_not_a_bank_says_so(tmp_path):
    for content in (b"", b"hello world" * 100):
        path = tmp_path / "x.bank"
        path.write_bytes(content)
        with pytest.raises(se.SlimError, match="not a memory bank"):
            se.MemoryBank.repair(path)
        assert path.read_bytes() == content


def test_a_forked_child_cannot_write_through_the_writer_it_inherited(tmp_path):
    """After os.fork() parent and child would append at the same offsets (half the child's or the
    parent's acknowledged upserts lost). Writes through a handle opened by another process fail clearly;
    lookups through it keep working (they read the index as it was at the fork)."""
    path, dim = tmp_path / "fork.bank", 8
    bank = se.MemoryBank(path, dim)
    bank.upsert([1, 2], values([1, 2], dim), model_version=1)
    size = path.stat().st_size
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what each call did, then leave at once (no cleanup of the parent's objects)
        report = []
        try:
            for name, call in (("upsert", lambda: bank.upsert([3], values([3], dim))), ("delete", lambda: bank.delete([1])),
                               ("flush", bank.flush)):
                try:
                    call()
                    report.append(f"{name}: ok")
                except se.SlimError as e:
                    report.append(f"{name}: {e.status} {e}")
            got = bank.lookup([1, 2, 3])
            report.append(f"lookup: {got.found.tolist()} {np.array_equal(got.embeddings[:2], values([1, 2], dim))}")
        except BaseException as e:  # noqa: B036 (anything, reported to the parent)
            report.append(f"child failed: {e!r}")
        finally:
            os.write(write_end, "\n".join(report).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        report = f.read().splitlines()
    assert os.waitpid(pid, 0)[1] == 0
    assert len(report) == 4, report
    for line, name in zip(report, ("upsert", "delete", "flush")):
        assert line.startswith(f"{name}: SLIM_ERR_INVALID_ARGUMENT") and f"opened by pid {os.getpid()}" in line, line
        assert "open the bank again" in line, line
    assert report[3] == "lookup: [True, True, False] True"
    assert path.stat().st_size == size and len(bank) == 2
    bank.upsert([3], values([3], dim))  # the parent's handle is unaffected
    assert bank.lookup([1, 2, 3]).found.all()
    bank.close()


TRUNCATED_READER = textwrap.dedent("""
    import sys, time
    import numpy as np
    import slimengine as se
    path, n, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    bank = se.MemoryBank(path, read_only=True)
    ids = np.arange(n)
    assert bank.lookup(ids).found.all()
    print("ready", flush=True)
    errors, message, end = 0, "", time.time() + seconds
    while time.time() < end:
        try:
            bank.lookup(ids)
        except se.SlimError as e:
            errors, message = errors + 1, f"{e.status} {e}"
            bank.refresh()
    print(errors, int(bank.lookup(ids).found.sum()), message, sep="\\n")
""")


def test_a_reader_survives_the_file_being_truncated_under_it(tmp_path):
    """Rows are read through a shared mapping; when the file shrinks (another program truncates it, or
    a writer takes back records a reader had indexed) the pages past the new end raise SIGBUS. A lookup
    that meets one fails with SLIM_ERR_IO telling the reader to refresh, instead of killing the process."""
    path, dim, per_call = tmp_path / "shrink.bank", 64, 100
    ids, rb = np.arange(10_000, dtype=np.int64), record_bytes(dim)
    with se.MemoryBank(path, dim) as bank:
        for first in range(0, len(ids), per_call):
            bank.upsert(ids[first : first + per_call], values(ids[first : first + per_call], dim))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", TRUNCATED_READER, str(path), str(len(ids)), "1.0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=root)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        os.truncate(path, HEADER_BYTES + 5000 * rb + 100)  # half the records, and part of one
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, f"reader died (returncode {proc.returncode}): {err}"
    errors, found, message = out.splitlines()
    assert int(errors) >= 1 and int(found) == 5000
    assert message.startswith("SLIM_ERR_IO") and "refresh" in message, message


def test_a_reader_never_returns_rows_cut_off_or_rewritten_under_it(tmp_path):
    """Bytes past a shrunk end within its last page read as zeros rather than faulting, and a writer may
    write other records where taken-back ones were: a lookup checks each row against the file's size and
    its head against the index, and fails with SLIM_ERR_IO rather than return a row nobody wrote."""
    path, dim = tmp_path / "cut.bank", 4
    ids, rb = np.arange(10, dtype=np.int64), record_bytes(dim)
    with se.MemoryBank(path, dim) as bank:
        for i in ids:  # a call each: what survives a cut is whole calls
            bank.upsert([i], values([i], dim))
    clean = path.read_bytes()
    with se.MemoryBank(path, read_only=True) as reader:
        assert reader.lookup(ids).found.all()
        os.truncate(path, HEADER_BYTES + 8 * rb + 12)  # the same page: ids 8, 9 would read as zeros
        assert np.array_equal(reader.lookup(ids[:8]).embeddings, values(ids[:8], dim))
        with pytest.raises(se.SlimError, match="SLIM_ERR_IO") as info:
            reader.lookup([9])
        assert "refresh" in str(info.value)
        assert reader.refresh() >= 0 and reader.lookup(ids).found.tolist() == [True] * 8 + [False] * 2
    path.write_bytes(clean)
    with se.MemoryBank(path, read_only=True) as reader:
        rewritten = bytearray(clean)  # record 9 replaced by another id's record at the same place
        other = HEADER_BYTES + 9 * rb
        rewritten[other + 16 : other + 24] = np.int64(99).tobytes()
        path.write_bytes(bytes(rewritten))
        with pytest.raises(se.SlimError, match="no longer in the file"):
            reader.lookup([9])


def test_a_sigbus_outside_the_bank_still_kills_the_process(tmp_path):
    """The bank's SIGBUS guard only catches faults inside its own lookups; any other one reaches the
    handler that was there before (here the default: the process dies)."""
    script = textwrap.dedent("""
        import mmap, os, sys
        import numpy as np
        import slimengine as se
        bank = se.MemoryBank(sys.argv[1] + "/b.bank", 4)
        bank.upsert([1], np.ones((1, 4), np.float32))
        bank.lookup([1])
        with open(sys.argv[1] + "/other", "wb") as f:
            f.write(b"x" * 65536)
        with open(sys.argv[1] + "/other", "r+b") as f:
            m = mmap.mmap(f.fileno(), 65536)
            os.truncate(sys.argv[1] + "/other", 0)
            print(m[40000], flush=True)
        print("survived")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, cwd=root, timeout=60)
    assert proc.returncode == -signal.SIGBUS and "survived" not in proc.stdout, (proc.returncode, proc.stderr)


def test_a_sigbus_sent_to_a_thread_in_a_lookup_goes_to_the_programs_handler_not_the_lookup(tmp_path):
    """The guard jumps out of a lookup only for the kernel's fault (the file shrank). A SIGBUS another
    thread sends (pthread_kill) to a thread that is copying rows used to fail that lookup with a false
    "file is shorter" error, and never reached the program's own handler."""
    script = textwrap.dedent("""
        import signal, sys, threading, time
        import numpy as np
        import slimengine as se
        handled = []
        signal.signal(signal.SIGBUS, lambda *args: handled.append(1))  # the program's handler, there first
        bank = se.MemoryBank(sys.argv[1], dim=256)
        ids = np.arange(100_000)
        bank.upsert(ids, np.ones((ids.size, 256), np.float32))
        failures, lookups, stop = [], [0], False
        def look():
            while not stop:
                try:
                    bank.lookup(ids)
                    lookups[0] += 1
                except se.SlimError as e:
                    failures.append(str(e))
        worker = threading.Thread(target=look)
        worker.start()
        time.sleep(0.05)
        for _ in range(100):
            signal.pthread_kill(worker.ident, signal.SIGBUS)
            time.sleep(0.002)
        stop = True
        worker.join()
        time.sleep(0.05)  # the Python-level handler runs in the main thread
        print(len(failures), failures[:1], lookups[0] > 0, len(handled) > 0)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "b.bank")], capture_output=True, text=True, cwd=root,
                          timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert proc.stdout.split() == ["0", "[]", "True", "True"], proc.stdout


def test_a_fault_handler_installed_after_the_bank_still_lets_a_lookup_fail_cleanly(tmp_path):
    """faulthandler, enabled after the first bank opened, sees the fault first and re-raises it with
    raise(); the guard drops that sent signal, and the fault itself then fails the lookup."""
    script = textwrap.dedent("""
        import faulthandler, os, sys
        import numpy as np
        import slimengine as se
        path = sys.argv[1]
        with se.MemoryBank(path, dim=64) as writer:
            writer.upsert(np.arange(50_000), np.ones((50_000, 64), np.float32))
        bank = se.MemoryBank(path, read_only=True)
        faulthandler.enable()
        os.truncate(path, 64)
        try:
            bank.lookup(np.arange(50_000))
        except se.SlimError as e:
            print(e.status)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "b.bank")], capture_output=True, text=True, cwd=root,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "SLIM_ERR_IO", (proc.returncode, proc.stdout, proc.stderr[-2000:])


def _splitmix64_finaliser_inverse(v: np.ndarray) -> np.ndarray:
    """The ids x whose splitmix64 finaliser (the index hash before keying) is v."""
    def unxorshift(y, s):
        x = y.copy()
        for _ in range(64 // s + 1):
            x = y ^ (x >> np.uint64(s))
        return x
    with np.errstate(over="ignore"):
        x = unxorshift(v, 31) * np.uint64(pow(0x94D049BB133111EB, -1, 2**64))
        x = unxorshift(x, 27) * np.uint64(pow(0xBF58476D1CE4E5B9, -1, 2**64))
        return unxorshift(x, 30) - np.uint64(0x9E3779B97F4A7C15)


def test_ids_chosen_to_collide_in_the_index_hash_do_not_make_calls_quadratic(tmp_path):
    """The index hash was splitmix64's finaliser: invertible, so ids whose hashes share their low 24 bits
    (every one in the same slot) could be computed, and 160k of them took 14 s to upsert and 28 s to look
    up. The hash is keyed per bank now: the same ids spread."""
    with np.errstate(over="ignore"):
        targets = np.arange(1, 400_000, dtype=np.uint64) << np.uint64(24)
    ids = _splitmix64_finaliser_inverse(targets)
    ids = ids[ids < np.uint64(2**63)].astype(np.int64)[:160_000]
    assert len(ids) == 160_000
    with np.errstate(over="ignore"):  # the construction is right: all share the old hash's low 24 bits
        x = ids[:100].astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        assert not ((x ^ (x >> np.uint64(31))) & np.uint64(2**24 - 1)).any()
    path, dim, limit_s = tmp_path / "collide.bank", 4, 2.0
    emb = np.ones((10_000, dim), np.float32)
    with se.MemoryBank(path, dim) as bank:
        start = time.perf_counter()
        for first in range(0, len(ids), 10_000):
            bank.upsert(ids[first : first + 10_000], emb)
            assert time.perf_counter() - start < limit_s, f"upserts slower than {limit_s} s by {first + 10_000} ids"
        start = time.perf_counter()
        for first in range(0, len(ids), 10_000):
            assert bank.lookup(ids[first : first + 10_000]).found.all()
            assert time.perf_counter() - start < limit_s, f"lookups slower than {limit_s} s by {first + 10_000} ids"
    start = time.perf_counter()
    with se.MemoryBank(path) as bank:
        assert time.perf_counter() - start < limit_s and len(bank) == len(ids)


def test_six_hundred_banks_open_at_once(tmp_path):
    """Each handle used to reserve 256 GiB of address space: the 510th open failed (128 TiB of user
    address space). A handle now reserves in proportion to its file."""
    path, dim = tmp_path / "many.bank", 8
    writer = se.MemoryBank(path, dim)
    writer.upsert([1, 2], values([1, 2], dim))
    readers = []
    try:
        for _ in range(600):
            readers.append(se.MemoryBank(path, read_only=True))
        writer.upsert([3], values([3], dim))
        for reader in readers[::50]:
            reader.refresh()
            assert np.array_equal(reader.lookup([1, 2, 3]).embeddings, values([1, 2, 3], dim))
    finally:
        for reader in readers:
            reader.close()
        writer.close()


LIMITED_ADDRESS_SPACE = textwrap.dedent("""
    import resource, sys, threading
    import numpy as np
    import slimengine as se
    from tests.test_lemur_bank import values
    path, dim = sys.argv[1], 256
    limit = 2 << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    bank = se.MemoryBank(path, dim)
    stop, bad, checked = threading.Event(), [], [0]

    def reader():  # lookups from another thread while the writer's mapping grows (is moved) under it
        rng = np.random.default_rng(0)
        while not stop.is_set():
            n = len(bank)
            if n == 0:
                continue
            ids = rng.integers(0, n, 512)
            got = bank.lookup(ids)
            bad.append(int((~got.found).sum()) + int((got.embeddings != values(ids, dim)).any(axis=1).sum()))
            checked[0] += len(ids)

    thread = threading.Thread(target=reader)
    thread.start()
    batch = 10_000
    for first in range(0, 200_000, batch):  # 214 MB: past the first reservation (64 MiB) several times
        ids = np.arange(first, first + batch)
        bank.upsert(ids, values(ids, dim))
    stop.set()
    thread.join()
    bank.close()
    with se.MemoryBank(path, read_only=True) as again:
        for first in range(0, 200_000, batch):  # in slices: the whole expected array would take 0.4 GiB of the 2
            ids = np.arange(first, first + batch)
            got = again.lookup(ids)
            assert got.found.all() and np.array_equal(got.embeddings, values(ids, dim))
    print(sum(bad), checked[0])
""")


def test_a_bank_grows_past_its_first_reservation_under_a_2_gib_address_space_limit(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", LIMITED_ADDRESS_SPACE, str(tmp_path / "grow.bank")], capture_output=True, text=True,
                          cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr
    bad, checked = (int(x) for x in proc.stdout.split())
    assert bad == 0 and checked > 0


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


def test_the_compiled_module_refuses_a_bank_before_it_is_bound():
    """slimengine._calls used alone, before the binding gave it the library's functions, would call a null pointer: it
    refuses to make a bank instead of crashing the interpreter."""
    proc = run_python("from slimengine._calls import Bank\ntry:\n    Bank(1, 8)\nexcept RuntimeError as e:\n    print(e)")
    assert proc.returncode == 0 and "not bound to a library" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr)
