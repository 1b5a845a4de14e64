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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


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
            handle.flush()
            os.fsync(handle.fileno())
        _publish(tmp, destination)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, destination: Path) -> None:
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        os.rename(destination, old)
        os.rename(tmp, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, destination)
