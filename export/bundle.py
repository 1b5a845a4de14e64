"""The engine bundle: `NAME.engine/` with manifest.json, manifest.sha256 and stages/*.onnx, written atomically.

Everything is written into a temporary sibling directory, hashed, optionally verified, and only then
renamed into place; on any failure the temporary directory is removed and the destination is left
as it was. A process killed outright (kill -9, power loss) cannot clean up: the next export to the same
destination removes such stale temporaries, telling a dead export's from a live one by a lock the
exporting process holds for as long as it runs.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from slimengine.bundle import DIGEST, FORMAT, FORMAT_VERSION, MANIFEST, digest_line

BUNDLE_FORMAT = FORMAT
BUNDLE_FORMAT_VERSION = FORMAT_VERSION
# Inside `.NAME.tmp-PID/`: flock-ed by the exporting process for as long as it runs (the kernel drops the lock when
# the process dies however it dies), so a free lock means a dead export even if its PID has been reused.
LOCK = ".export-lock"


def sha256_files(paths: list[Path]) -> str:
    """One sha256 over the bytes of `paths`, in order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_files([path])


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes a temporary sibling file, which then replaces `path` whole; on any failure it
    is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_manifest(directory: Path, manifest: dict) -> None:
    """Write `manifest` as directory/manifest.json and its digest as manifest.sha256 (docs/bundle-format.md,
    "Integrity"). The runtime refuses a manifest.json that no longer matches its manifest.sha256."""
    data = json.dumps(manifest, indent=1, allow_nan=False).encode()
    (Path(directory) / MANIFEST).write_bytes(data)
    (Path(directory) / DIGEST).write_bytes(digest_line(data))


def write_bundle(destination: Path, fill: Callable[[Path], dict], force: bool = False, report: Callable[[str], None] | None = None) -> dict:
    """Create the bundle at `destination`: `fill(tmpdir)` writes the files and returns the manifest
    (without `files`); this function lists every file with its sha256 and size, writes the manifest and
    its digest, and publishes atomically. Stale
    temporaries of killed exports to the same destination are removed first, each told to `report`."""
    destination = Path(destination)
    if destination.exists() and not force:
        raise FileExistsError(f"{destination} already exists (use --force to replace it)")
    for stale in remove_stale_temporaries(destination):
        if report is not None:
            report(f"removed stale temporary {stale} of an interrupted export")
    tmp = destination.with_name(f".{destination.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lock = None
    try:
        lock = _hold_lock(tmp)
        manifest = fill(tmp)
        manifest["files"] = {
            str(p.relative_to(tmp)): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(tmp.rglob("*")) if p.is_file() and p not in (tmp / MANIFEST, tmp / DIGEST, tmp / LOCK)
        }
        write_manifest(tmp, manifest)
        # Not part of the bundle. Still locked through our descriptor; until the rename, our live PID marks
        # the directory as in use (remove_stale_temporaries).
        (tmp / LOCK).unlink()
        _sync_tree(tmp)  # on disk before it becomes visible: a power loss cannot publish a torn bundle
        _publish(tmp, destination, force)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)


def _hold_lock(tmp: Path) -> int:
    """Create `tmp/LOCK` already locked: it is locked under another name and renamed, so no other process can
    find it unlocked while we live."""
    partial = tmp / f"{LOCK}.new"
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(partial, tmp / LOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_stale_temporaries(destination: Path) -> list[Path]:
    """Remove the `.NAME.tmp-PID/` directories beside `destination` that belong to no running export, and
    return them. A directory with a lock file is stale when nobody holds its lock; one without (an export
    starting or publishing, or one killed before it locked) when process PID no longer exists. A live
    concurrent export's directory is never touched."""
    destination = Path(destination)
    prefix = f".{destination.name}.tmp-"
    try:
        entries = list(os.scandir(destination.parent))
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        pid = entry.name[len(prefix) :]
        if not entry.name.startswith(prefix) or not pid.isdigit() or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        try:
            fd = os.open(path / LOCK, os.O_RDWR)
        except FileNotFoundError:
            if not _pid_alive(int(pid)):
                _remove(path, removed)
            continue
        except OSError:  # not ours to judge (permissions): leave it
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live export holds it
            os.close(fd)
            continue
        try:
            _remove(path, removed)  # holding the lock: another cleaner skips it meanwhile
        finally:
            os.close(fd)
    return removed


def _remove(path: Path, removed: list[Path]) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if not path.exists():
        removed.append(path)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id we could have written: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        _fsync(path)


def _publish(tmp: Path, destination: Path, force: bool) -> None:
    """Rename into place. Without `force` the rename fails if the destination appeared meanwhile (another export
    to the same path finished first): FileExistsError, never a silent replacement. With `force` an existing bundle
    is swapped with the new one in one step (renameat2 RENAME_EXCHANGE), so the destination holds either the old
    or the new bundle at every moment, a kill -9 included; the old one then sits in `tmp`, removed here or, if
    the process is killed first, by the next export as a stale temporary. Where the filesystem cannot exchange,
    two renames, with the old bundle put back if the second fails."""
    try:
        os.rename(tmp, destination)  # a directory replaces only a missing destination (or an empty directory)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
        if not force:
            raise FileExistsError(f"{destination} already exists (another export to it finished first; use --force to replace "
                                  "it)") from None
        if _exchange(tmp, destination):
            _remove_any(tmp)
        else:
            old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
            os.rename(destination, old)
            try:
                os.rename(tmp, destination)
            except BaseException:
                os.rename(old, destination)
                raise
            _remove_any(old)
    _fsync(destination.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove_any(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
