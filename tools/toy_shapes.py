"""The toy image domain of slimengine's trained test model: coloured shapes on black.

Images are RGB 32x32 in [-1, 1]; the model's "latent" is the image pixel-unshuffled by 2
(12 channels at 16x16), so latents render back to pictures without a VAE. A class is a
(shape, colour) pair; its prompt embedding is two tokens (shape, colour) drawn from fixed seeded
tables, and its pooled embedding the concatenation of two pooled tables.
"""

from __future__ import annotations

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "yellow": (1, 1, -1), "cyan": (-1, 1, 1),
           "magenta": (1, -1, 1)}
IMAGE_SIZE = 32
LATENT_CHANNELS = 12  # 3 colours x 2 x 2 pixels
JOINT_DIM = 64
POOLED_DIM = 32
_TABLE_SEED = 2026


def _tables():
    rng = np.random.default_rng(_TABLE_SEED)
    return {
        "shape_tokens": rng.standard_normal((len(SHAPES), JOINT_DIM)).astype(np.float32),
        "colour_tokens": rng.standard_normal((len(COLOURS), JOINT_DIM)).astype(np.float32),
        "shape_pooled": rng.standard_normal((len(SHAPES), POOLED_DIM // 2)).astype(np.float32),
        "colour_pooled": rng.standard_normal((len(COLOURS), POOLED_DIM // 2)).astype(np.float32),
    }


_TABLES = _tables()


def prompt_embeds(shape: int | np.ndarray, colour: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prompt [B, 2, JOINT_DIM] and pooled [B, POOLED_DIM] embeddings for class indices."""
    shape, colour = np.atleast_1d(shape), np.atleast_1d(colour)
    text = np.stack([_TABLES["shape_tokens"][shape], _TABLES["colour_tokens"][colour]], axis=1)
    pooled = np.concatenate([_TABLES["shape_pooled"][shape], _TABLES["colour_pooled"][colour]], axis=1)
    return text, pooled


def render(shape: int, colour: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB image [3, 32, 32] in [-1, 1] with a shape of random size and position."""
    size = IMAGE_SIZE
    radius = rng.uniform(5, 10)
    cx, cy = rng.uniform(radius + 1, size - radius - 1, size=2)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    if SHAPES[shape] == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    elif SHAPES[shape] == "square":
        mask = (np.abs(x - cx) <= radius * 0.85) & (np.abs(y - cy) <= radius * 0.85)
    else:  # upward triangle
        top, bottom = cy - radius, cy + radius
        half_width = (y - top) / (2 * radius) * radius
        mask = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
    image = -np.ones((3, size, size), dtype=np.float32)
    image[:, mask] = np.array(list(COLOURS.values())[colour], dtype=np.float32)[:, None]
    return image


def batch(count: int, rng: np.random.Generator):
    """Images [B, 3, 32, 32], shape and colour indices."""
    shapes = rng.integers(0, len(SHAPES), count)
    colours = rng.integers(0, len(COLOURS), count)
    images = np.stack([render(s, c, rng) for s, c in zip(shapes, colours)])
    return images, shapes, colours


def to_latents(images) -> torch.Tensor:
    return torch.nn.functional.pixel_unshuffle(torch.as_tensor(images), 2)


def to_images(latents) -> np.ndarray:
    """Latents [B, 12, H, W] -> RGB uint8 [B, 2H, 2W, 3]."""
    rgb = torch.nn.functional.pixel_shuffle(torch.as_tensor(np.asarray(latents)), 2).numpy()
    return ((np.clip(rgb, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)


def save_png(images: np.ndarray, path, columns: int = 6, scale: int = 4) -> None:
    """A grid of uint8 RGB images [B, H, W, 3] as one PNG, each pixel scaled up `scale` times."""
    from PIL import Image

    b, h, w, _ = images.shape
    rows = (b + columns - 1) // columns
    grid = np.zeros((rows * (h + 2), columns * (w + 2), 3), dtype=np.uint8) + 40
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = img
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def dominant_colour(image: np.ndarray) -> int | None:
    """Index of the palette colour the non-background pixels of a uint8 image are closest to."""
    pixels = image.reshape(-1, 3).astype(np.float32) / 127.5 - 1
    foreground = pixels[np.abs(pixels + 1).max(axis=1) > 0.5]
    if len(foreground) < 4:
        return None
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    return int(np.argmin(((foreground.mean(axis=0)[None] - palette) ** 2).sum(axis=1)))
