"""What an engine bundle is on disk (format 3, docs/bundle-format.md): file names, the manifest's digest
line and strict reading of manifest JSON. Torch-free: the runtime, the exporter and the tools share it."""

from __future__ import annotations

import hashlib
import json
import math

FORMAT = "slimengine-bundle"
FORMAT_VERSION = 3  # what export writes; the runtime also reads format 2 (its legacy program keys)
MANIFEST = "manifest.json"
DIGEST = "manifest.sha256"  # "<sha256 of manifest.json's bytes>  manifest.json\n", as sha256sum writes it
# Stage roles (the runtime binds stages by role, never by name); block and block_tokens also carry `block`.
SD3_ROLES = ("embed", "block", "block_tokens", "compensate", "final", "clip_l", "clip_g", "t5", "vae_decode")
LEMUR_ROLES = ("lemur_embed", "lemur_score")
VERIFY_LEVELS = {"fast": 0, "full": 1}  # slim_verify


def digest_line(manifest_bytes: bytes) -> bytes:
    """The content of manifest.sha256 for these manifest bytes."""
    return f"{hashlib.sha256(manifest_bytes).hexdigest()}  {MANIFEST}\n".encode()


def _refuse_duplicates(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise ValueError(f"duplicate key {duplicate!r}")
    return dict(pairs)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is outside double's range")
    return value


def _int(text: str) -> int:
    _finite(text)  # the C runtime reads every number as a double
    return int(text)


MAX_DEPTH = 64  # json.hpp's kMaxDepth


def _check_strings_and_depth(value, depth: int) -> None:
    if isinstance(value, (dict, list)):
        if depth >= MAX_DEPTH:
            raise ValueError(f"nesting deeper than {MAX_DEPTH}")
        for item in (value if isinstance(value, list) else [*value.keys(), *value.values()]):
            _check_strings_and_depth(item, depth + 1)
    elif isinstance(value, str):
        if "\0" in value:
            raise ValueError("\\u0000 in a string (names and paths are C strings)")
        value.encode("utf-8")  # an unpaired surrogate escape gives a str that cannot be encoded: UnicodeEncodeError


def loads_strict(data: bytes | str):
    """JSON as the C runtime reads it (runtime/src/json.hpp): duplicate keys, NaN/Infinity, numbers past double's range,
    invalid UTF-8 (for bytes), unpaired surrogate escapes, \\u0000 and nesting deeper than 64 raise ValueError
    (json.JSONDecodeError, UnicodeDecodeError and UnicodeEncodeError are ValueErrors)."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    try:
        value = json.loads(text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant, parse_float=_finite,
                           parse_int=_int)
    except RecursionError:
        raise ValueError(f"nesting deeper than {MAX_DEPTH}") from None
    _check_strings_and_depth(value, 0)
    return value
