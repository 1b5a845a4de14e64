"""The engine's seeded Gaussian noise, reproducible in Python (numpy) and in the C++ runtime.

Philox4x32-10 keyed by the 64-bit seed; element k takes lane k % 4 of the block at counter k // 4;
lanes (0, 1) and (2, 3) are Box-Muller pairs: u1 = (a + 1) / 2^32, u2 = b / 2^32,
z = sqrt(-2 ln u1) * (cos 2πu2, sin 2πu2), computed in double and rounded to float32.
A batch draws each row from its own seed (seeded_latents).
"""

from __future__ import annotations

import numpy as np

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_MASK = np.uint64(0xFFFFFFFF)


def philox4x32(counter: np.ndarray, seed: int) -> np.ndarray:
    """counter: uint64 [n] block indices -> uint32 words [n, 4]."""
    c0 = counter & _MASK
    c1 = counter >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0 = np.uint64(seed & 0xFFFFFFFF)
    k1 = np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK
        k1 = (k1 + _W1) & _MASK
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def gaussian_noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Standard normal float32 noise of `shape`, identical to the runtime's noise for `seed`."""
    count = int(np.prod(shape))
    blocks = (count + 3) // 4
    words = philox4x32(np.arange(blocks, dtype=np.uint64), seed).astype(np.float64)
    u1 = (words[:, 0::2] + 1.0) / 4294967296.0
    u2 = words[:, 1::2] / 4294967296.0
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    z = np.empty((blocks, 4), dtype=np.float64)
    z[:, 0::2] = radius * np.cos(angle)
    z[:, 1::2] = radius * np.sin(angle)
    return z.reshape(-1)[:count].astype(np.float32).reshape(shape)


def seeded_latents(shape: tuple[int, ...], seed) -> np.ndarray:
    """The initial latents the runtime draws for a batch [B, ...] with `seed`: row b is gaussian_noise of one row for
    seed + b (wrapping at 2^64), or for seed[b] when `seed` is a sequence of one seed per row."""
    seeds = [(seed + b) % 2**64 for b in range(shape[0])] if np.ndim(seed) == 0 else list(seed)
    if len(seeds) != shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {shape[0]} rows")
    return np.stack([gaussian_noise(tuple(shape[1:]), int(s)) for s in seeds]) if shape[0] else np.empty(shape, np.float32)
