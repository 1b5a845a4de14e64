"""The engine bundle: `NAME.engine/` with manifest.json and stages/*.onnx, written atomically.

Everything is written into a temporary sibling directory, hashed, optionally verified, and only then
renamed into place; on any failure the temporary directory is removed and the destination is left
as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

BUNDLE_FORMAT = "slimengine-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"


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


def write_bundle(destination: Path, fill: Callable[[Path], dict], force: bool = False) -> dict:
    """Create the bundle at `destination`: `fill(tmpdir)` writes the files and returns the manifest
    (without `files`); this function adds the sha256 of every file and publishes atomically."""
    destination = Path(destination)
    if destination.exists() and not force:
        raise FileExistsError(f"{destination} already exists (use --force to replace it)")
    tmp = destination.with_name(f".{destination.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = fill(tmp)
        manifest["files"] = {
            str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != MANIFEST
        }
        with open(tmp / MANIFEST, "w") as handle:
            json.dump(manifest, handle, indent=1)
        _sync_tree(tmp)  # on disk before it becomes visible: a power loss cannot publish a torn bundle
        _publish(tmp, destination)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        _fsync(path)


def _publish(tmp: Path, destination: Path) -> None:
    """Rename into place. Replacing an existing bundle takes two renames; if the second fails the old
    bundle is put back, so the destination holds either the old or the new bundle."""
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        os.rename(destination, old)
        try:
            os.rename(tmp, destination)
        except BaseException:
            os.rename(old, destination)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, destination)
    _fsync(destination.parent)
