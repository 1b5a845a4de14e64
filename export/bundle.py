"""The engine bundle: `NAME.engine/` with manifest.json, manifest.sha256 and stages/*.onnx, written atomically.

Everything is written into a temporary sibling directory, hashed, optionally verified, and only then
renamed into place; on any failure the temporary directory is removed and the destination is left
as it was. A process killed outright (kill -9, power loss) cannot clean up: the next export to the same
destination removes such stale temporaries, telling a dead export's from a live one by a lock the
exporting process holds for as long as it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from slimengine.bundle import DIGEST, FORMAT, FORMAT_VERSION, MANIFEST, digest_line

# The temporary directory, its lock and the publishing rename are shared with `slimengine triton-repo` (staging.py).
from slimengine.staging import LOCK, hold_lock, output_directory, publish, remove_stale_temporaries, sync_tree, temporary_path

from .errors import CheckpointError

BUNDLE_FORMAT = FORMAT
BUNDLE_FORMAT_VERSION = FORMAT_VERSION


def refuse_special_files(folder: Path) -> None:
    """Every file of a component folder must be a regular file (a link to one is fine): a FIFO or device where a weight,
    config or vocab file is expected would block or feed endless bytes to the readers (a FIFO as the VAE's weights hung
    the export)."""
    for entry in sorted(folder.rglob("*")):
        try:
            mode = entry.stat().st_mode
        except OSError as e:
            raise CheckpointError(f"{entry}: cannot read it ({e.strerror or e})") from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise CheckpointError(f"{entry}: not a regular file (a FIFO, socket or device); give the component's files themselves")


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


def write_manifest(directory: Path, manifest: dict) -> None:
    """Write `manifest` as directory/manifest.json and its digest as manifest.sha256 (docs/bundle-format.md,
    "Integrity"). The runtime refuses a manifest.json that no longer matches its manifest.sha256."""
    data = json.dumps(manifest, indent=1, allow_nan=False).encode()
    (Path(directory) / MANIFEST).write_bytes(data)
    (Path(directory) / DIGEST).write_bytes(digest_line(data))


def write_bundle(destination: Path, fill: Callable[[Path], dict], force: bool = False, report: Callable[[str], None] | None = None,
                 check: Callable[[Path], None] | None = None) -> dict:
    """Create the bundle at `destination`: `fill(tmpdir)` writes the files and returns the manifest
    (without `files`); this function lists every file with its sha256 and size, writes the manifest and
    its digest, runs `check(tmpdir)` on the complete bundle (an exception there publishes nothing), and
    publishes atomically. Stale
    temporaries of killed exports to the same destination are removed first, each told to `report`."""
    destination = output_directory(destination, force)  # with force, only a bundle directory is replaced
    for stale in remove_stale_temporaries(destination):
        if report is not None:
            report(f"removed stale temporary {stale} of an interrupted export")
    tmp = temporary_path(destination)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lock = None
    try:
        lock = hold_lock(tmp)
        manifest = fill(tmp)
        manifest["files"] = {
            str(p.relative_to(tmp)): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(tmp.rglob("*")) if p.is_file() and p not in (tmp / MANIFEST, tmp / DIGEST, tmp / LOCK)
        }
        write_manifest(tmp, manifest)
        # Not part of the bundle. Still locked through our descriptor; until the rename, our live PID marks
        # the directory as in use (remove_stale_temporaries).
        (tmp / LOCK).unlink()
        if check is not None:
            check(tmp)
        sync_tree(tmp)  # on disk before it becomes visible: a power loss cannot publish a torn bundle
        publish(tmp, destination, force)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)
