"""Writing outputs atomically, and only where a command may write (docs/export.md, "Output files").

A file (`write_file_atomically`) is written to a hidden temporary beside it, synced and renamed over it. A directory
is built in a hidden `.NAME.tmp-PID/` sibling of its destination, then renamed into place (`publish`). Torch-free:
every command that writes a file or a directory uses it (slimengine generate and triton-repo, the exporter,
profile-engine, calibrate-xslim, toy-demo, the checkpoint makers); each checks its output path with `output_file` or
`output_directory` before any work, so a path that must not be written is a usage error found at once.

A process killed outright (kill -9, power loss) cannot clean up its temporary: the next writer to the same destination
removes such stale temporaries (remove_stale_temporaries), telling a dead writer's from a live one by a lock the writing
process holds for as long as it runs (hold_lock).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from ._native import c_path

# Inside `.NAME.tmp-PID/`: flock-ed by the writing process for as long as it runs (the kernel drops the lock when the
# process dies however it dies), so a free lock means a dead writer even if its PID has been reused. The name is the
# one exporters have always used, so that their older temporaries are still recognised.
LOCK = ".export-lock"


class OutputPathError(ValueError):
    """An output path a command must not write (a device, FIFO, socket, directory, a link to one or to nothing, no
    directory to write in, a name too long, one of the command's own inputs): a usage error, raised before any work."""


# The most a directory output's name may be shorter than NAME_MAX by: its temporaries `.NAME.tmp-PID` and
# `.NAME.old-PID` must fit too (a PID has at most 7 digits: Linux's pid_max is at most 2**22).
DIRECTORY_NAME_RESERVE = len("..tmp-") + 7


def _name_max(directory: Path) -> int:
    """NAME_MAX of the filesystem `directory` (or its nearest existing ancestor) is on; 255 where it cannot tell."""
    for folder in [directory, *directory.parents]:
        try:
            return os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return 255


def _check_name(path: Path, reserve: int = 0) -> None:
    limit = _name_max(path.parent) - reserve
    if len(os.fsencode(path.name)) > limit:
        why = f" (its temporaries .NAME.tmp-PID must fit in {limit + reserve})" if reserve else ""
        raise OutputPathError(f"cannot write {path}: its name is longer than {limit} bytes{why}")


def _check_inputs(path: Path, inputs: Iterable[str | os.PathLike], directory: bool) -> None:
    """Refuse an output that is one of the command's inputs or inside one (written over it), or, for a directory
    output (replaced whole with --force), one that holds an input. Compared as resolved real paths."""
    out = Path(os.path.realpath(path))
    for given in inputs:
        source = Path(os.path.realpath(given))
        if out == source or source in out.parents:
            raise OutputPathError(f"cannot write {path}: it is the input {given}" if out == source
                                  else f"cannot write {path}: it is inside the input {given}")
        if directory and out in source.parents:
            raise OutputPathError(f"cannot write {path}: it holds the input {given} (it would be replaced with it)")


_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def _lstat_mode(path: Path) -> int | None:
    """The mode of `path` itself (a link not followed), None when nothing is there."""
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:  # a path too long, a loop, a parent that is a file: not a path we can write
        if e.errno == errno.ENOTDIR:
            return None  # told by the parent's check
        raise OutputPathError(f"cannot write {path}: {e.strerror}") from None


def output_file(path: str | os.PathLike, parents: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Check `path` as a file to write and return the file a write replaces: `path` itself when it is missing or a
    regular file; for a symbolic link to a regular file, that file (written through: the link stays a link and shows
    the new content). Refused (OutputPathError): a directory, device, FIFO or socket (also behind a link; such a file
    is never replaced nor unlinked), a link to nothing (we do not create files where a link points), a missing
    or unwritable directory (`parents`: a missing one is created at write time), a name longer than the filesystem's
    NAME_MAX, and one of the command's `inputs` (files or folders) or a file inside one."""
    if os.fspath(path).endswith("/") or Path(path).name in ("", ".", ".."):  # Path() would drop a trailing slash
        raise OutputPathError(f"cannot write {os.fspath(path)}: give a file name, not a directory")
    path = Path(path)
    _check_name(path)
    mode = _lstat_mode(path)
    if mode is not None and stat.S_ISLNK(mode):
        target = Path(os.path.realpath(path))
        try:
            mode = os.stat(target).st_mode
        except OSError:  # dangling, a loop, or a target we cannot see
            raise OutputPathError(f"cannot write {path}: a symbolic link to nothing ({os.readlink(path)}); give the file itself") from None
        if not stat.S_ISREG(mode):
            raise OutputPathError(f"cannot write {path}: it is a symbolic link to {_kind(mode)} ({target})")
        path = target
    elif mode is not None and not stat.S_ISREG(mode):
        raise OutputPathError(f"cannot write {path}: it is {_kind(mode)}")
    _check_inputs(path, inputs, directory=False)
    directory = path.parent
    if not directory.is_dir():
        if parents and not directory.exists():
            return path
        raise OutputPathError(f"cannot write {path}: no directory {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {path}: directory {directory} is not writable")
    return path


def write_file_atomically(path: str | os.PathLike, write: Callable[[Path], None], parents: bool = False) -> Path:
    """`write(tmp)` writes the output at `tmp`, a path of the target's name in a new private directory beside the target
    (a writer that picks a format by the suffix still sees it); it is synced and renamed over the target
    (output_file(path), checked again now), a replaced file's permissions kept. On any failure the target is left as
    it was. Only that private directory and what is in it are ever removed. Returns the file written."""
    target = output_file(path, parents)
    if parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    # A short name: the target's own name (kept inside, for writers that pick a format by the suffix) may be NAME_MAX long
    private = Path(tempfile.mkdtemp(prefix=f".slim-tmp-{os.getpid()}-", dir=target.parent))
    try:
        tmp = private / target.name
        write(tmp)
        if tmp.is_dir():  # a writer may make a folder (make-sd3-checkpoint --format diffusers)
            sync_tree(tmp)
        else:
            if target.exists():
                os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
            fsync_path(tmp)
        if output_file(path, parents) != target:  # the path changed under us: never rename over what it is now
            raise OutputPathError(f"cannot write {path}: it changed while the output was written")
        os.replace(tmp, target)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    fsync_path(target.parent)
    return target


def output_directory(path: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Check `path` as a directory to create (publish): missing, or with `force` an existing directory (not a link to
    one) that publish swaps out. Refused (OutputPathError): a file, link, device, FIFO or socket at `path`, even with
    `force` (only a directory is replaced: never a link, nor what it points at), an existing directory without
    `force`, a parent that exists but is not a directory, a name too long for its temporaries (NAME_MAX less
    DIRECTORY_NAME_RESERVE), and a path that is, is inside or holds one of the command's `inputs`."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise OutputPathError(f"cannot write {path}: give the directory's own name")
    _check_name(path, DIRECTORY_NAME_RESERVE)
    mode = _lstat_mode(path)
    if mode is not None and stat.S_ISLNK(mode):
        raise OutputPathError(f"{path} exists and is not a directory (a symbolic link): give a new path or an existing directory")
    if mode is not None and not stat.S_ISDIR(mode):
        raise OutputPathError(f"{path} exists and is not a directory ({_kind(mode)}): give a new path or an existing directory")
    if mode is not None and not force:
        raise OutputPathError(f"{path} already exists (use --force to replace it)")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise OutputPathError(f"cannot write {path}: {parent} is not a directory")
    _check_inputs(path, inputs, directory=True)
    return path


def temporary_path(destination: Path) -> Path:
    """This process's temporary sibling of `destination`."""
    return destination.with_name(f".{destination.name}.tmp-{os.getpid()}")


def hold_lock(tmp: Path) -> int:
    """Create `tmp/LOCK` already locked and return its descriptor (closing it releases the lock): it is locked under
    another name and renamed, so no other process can find it unlocked while we live. Unlink it before publishing."""
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
    """Remove the `.NAME.tmp-PID/` directories beside `destination` that belong to no running writer, and return
    them. A directory with a lock file is stale when nobody holds its lock; one without (a writer starting or
    publishing, or one killed before it locked) when process PID no longer exists. A live concurrent writer's
    directory is never touched."""
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
            if not pid_alive(int(pid)):
                _remove(path, removed)
            continue
        except OSError:  # not ours to judge (permissions): leave it
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live writer holds it
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


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id we could have written: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        fsync_path(path)


def publish(tmp: Path, destination: Path, force: bool, writer: str = "export") -> None:
    """Rename into place. Without `force` the rename fails if the destination appeared meanwhile (another writer to the
    same path finished first): FileExistsError, never a silent replacement. With `force` an existing directory is
    swapped with the new one in one step (renameat2 RENAME_EXCHANGE), so the destination holds either the old or the
    new one at every moment, a kill -9 included; the old one then sits in `tmp`, removed here or, if the process is
    killed first, by the next writer as a stale temporary. Where the filesystem cannot exchange, two renames, with
    the old one put back if the second fails."""
    try:
        os.rename(tmp, destination)  # a directory replaces only a missing destination (or an empty directory)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
        if not force:
            raise FileExistsError(f"{destination} already exists (another {writer} to it finished first; use --force to "
                                  "replace it)") from None
        output_directory(destination, force)  # only a directory is swapped out (and then removed): never a link or device
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
    fsync_path(destination.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, c_path(a, "path"), at_fdcwd, c_path(b, "path"), rename_exchange) == 0:
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


def interrupt_on_sigterm() -> None:
    """SIGTERM ends a command as Ctrl-C does (KeyboardInterrupt), so its handlers remove temporaries and half-written
    outputs; a handler someone else installed is kept."""
    import signal
    import threading

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, interrupt)
