"""The toy image domain of slimengine's trained test pipeline: coloured shapes on black, and their captions.

Images are RGB 32x32 in [-1, 1]. A class is a (shape, colour) pair and is asked for in words: captions such as
"a red circle" or "a picture of a yellow triangle" (CAPTION_TEMPLATES). The pipeline trained on them
(tools/train_toy_sd3.py: tokenizers, CLIP-style and T5-style text encoders, a VAE and an SD3 transformer, shipped as
models/toy-pipeline/ and models/toy-sd3.safetensors) turns such a caption into a picture; `dominant_colour` and
`shape_of` say what a picture shows, so tests can check it is what was asked for.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "yellow": (1, 1, -1), "cyan": (-1, 1, 1),
           "magenta": (1, -1, 1)}
IMAGE_SIZE = 32
# Ways of asking for a class; the first is the one tests and the demo use ("a red circle").
CAPTION_TEMPLATES = ("a {c} {s}", "{c} {s}", "a picture of a {c} {s}", "a photo of a {c} {s}", "a drawing of a {c} {s}",
                     "the {s} is {c}", "a {s}, {c}", "a {c} coloured {s}", "one {c} {s} on black", "A {C} {S}")


def caption(shape: int, colour: int, template: int = 0) -> str:
    c, s = list(COLOURS)[colour], SHAPES[shape]
    return CAPTION_TEMPLATES[template].format(c=c, s=s, C=c.upper(), S=s.upper())


def all_captions() -> list[str]:
    """Every caption of every class (the tokenizers' training text)."""
    return [caption(s, c, t) for t in range(len(CAPTION_TEMPLATES)) for s in range(len(SHAPES)) for c in range(len(COLOURS))]


def class_grid() -> tuple[np.ndarray, np.ndarray]:
    """Shape and colour indices of every class, rows of shapes by columns of colours."""
    shapes = np.repeat(np.arange(len(SHAPES)), len(COLOURS))
    colours = np.tile(np.arange(len(COLOURS)), len(SHAPES))
    return shapes, colours


def class_prompts() -> list[str]:
    """"a red circle", ... for every class, in class_grid order."""
    return [caption(s, c) for s, c in zip(*class_grid())]


# --- conditioning: the shipped text encoders, assembled as diffusers' SD3 encode_prompt does ---------------------

ENCODER_FOLDERS = {"clip_l": ("tokenizer", "text_encoder"), "clip_g": ("tokenizer_2", "text_encoder_2"),
                   "t5": ("tokenizer_3", "text_encoder_3")}


def tokenize(tokenizers: dict, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Ids of each tokenizer, as diffusers' SD3 pipeline calls them (padding to the tokenizer's model_max_length;
    the toy's tokenizer_3 carries the T5 length it was trained with)."""
    return {role: torch.tensor(tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                                   add_special_tokens=True)["input_ids"]) for role, tok in tokenizers.items()}


def sd3_conditioning(encoders: dict, ids: dict, joint_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' SD3 encode_prompt: CLIP-L || CLIP-G penultimate hidden states zero-padded to the T5 width, then T5's
    last hidden states along the sequence; pooled = CLIP-L || CLIP-G projections."""
    hidden, pooled = [], []
    for role in ("clip_l", "clip_g"):
        out = encoders[role](ids[role], output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    clip = torch.cat(hidden, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, joint_dim - clip.shape[-1]))
    return torch.cat([clip, encoders["t5"](ids["t5"])[0]], dim=1), torch.cat(pooled, dim=-1)


@functools.lru_cache(maxsize=2)
def load_text_encoders(pipeline: str) -> tuple[dict, dict, int]:
    """(tokenizers, encoders in float32 eval mode, T5 width) of a toy pipeline folder."""
    import transformers
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    transformers.utils.logging.set_verbosity_error()
    root = Path(pipeline)
    tok_classes = {"clip_l": CLIPTokenizer, "clip_g": CLIPTokenizer, "t5": T5TokenizerFast}
    enc_classes = {"clip_l": CLIPTextModelWithProjection, "clip_g": CLIPTextModelWithProjection, "t5": T5EncoderModel}
    tokenizers = {r: tok_classes[r].from_pretrained(str(root / t)) for r, (t, _) in ENCODER_FOLDERS.items()}
    encoders = {r: enc_classes[r].from_pretrained(str(root / e), torch_dtype=torch.float32).eval() for r, (_, e) in ENCODER_FOLDERS.items()}
    return tokenizers, encoders, encoders["t5"].config.d_model


@torch.no_grad()
def prompt_embeds(pipeline: Path | str, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Prompt [B, L, joint] and pooled [B, P] embeddings of `prompts` by the toy pipeline's own encoders (in torch)."""
    tokenizers, encoders, joint = load_text_encoders(str(pipeline))
    text, pooled = sd3_conditioning(encoders, tokenize(tokenizers, prompts), joint)
    return text.numpy(), pooled.numpy()


@functools.lru_cache(maxsize=2)
def _vae(pipeline: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(Path(pipeline) / "vae"), torch_dtype=torch.float32).eval()


@torch.no_grad()
def decode(pipeline: Path | str, latents) -> np.ndarray:
    """Transformer latents [B, 16, h, w] -> uint8 RGB [B, 2h, 2w, 3] by the pipeline's VAE (its scaling and shift)."""
    vae = _vae(str(pipeline))
    z = torch.as_tensor(np.asarray(latents, dtype=np.float32)) / vae.config.scaling_factor + vae.config.shift_factor
    return to_uint8(vae.decode(z).sample.numpy())


# --- images ---------------------------------------------------------------------------------------------------------


def render(shape: int, colour: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB image [3, 32, 32] in [-1, 1] with a shape of random size and position."""
    size = IMAGE_SIZE
    radius = rng.uniform(5, 10)
    cx, cy = rng.uniform(radius + 1, size - radius - 1, size=2)
    mask = shape_mask(shape, cx, cy, radius, size)
    image = -np.ones((3, size, size), dtype=np.float32)
    image[:, mask] = np.array(list(COLOURS.values())[colour], dtype=np.float32)[:, None]
    return image


def batch(count: int, rng: np.random.Generator):
    """Images [B, 3, 32, 32], shape and colour indices."""
    shapes = rng.integers(0, len(SHAPES), count)
    colours = rng.integers(0, len(COLOURS), count)
    images = np.stack([render(s, c, rng) for s, c in zip(shapes, colours)])
    return images, shapes, colours


def to_uint8(images) -> np.ndarray:
    """Images [B, 3, H, W] in [-1, 1] -> RGB uint8 [B, H, W, 3]."""
    return ((np.clip(np.asarray(images), -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)


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


def _foreground(image: np.ndarray) -> np.ndarray:
    """[H, W] mask of the pixels that are not background (some channel at least half lit)."""
    return image.astype(np.float32).max(axis=-1) > 127.5


def dominant_colour(image: np.ndarray) -> int | None:
    """Index of the palette colour the non-background pixels of a uint8 image [H, W, 3] are closest to."""
    pixels = image.reshape(-1, 3).astype(np.float32) / 127.5 - 1
    foreground = pixels[np.abs(pixels + 1).max(axis=1) > 0.5]
    if len(foreground) < 4:
        return None
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    return int(np.argmin(((foreground.mean(axis=0)[None] - palette) ** 2).sum(axis=1)))


def shape_mask(shape: int, cx: float, cy: float, radius: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """[size, size] mask of SHAPES[shape] centred at (cx, cy) with `radius`, drawn as render() draws it."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    if SHAPES[shape] == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    if SHAPES[shape] == "square":
        return (np.abs(x - cx) <= radius * 0.85) & (np.abs(y - cy) <= radius * 0.85)
    top, bottom = cy - radius, cy + radius  # upward triangle
    return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= (y - top) / 2)


# Area of each shape per radius^2 (circle pi, square 1.7^2, triangle base 2r x height 2r / 2), and how far its centroid
# lies below its centre cy, per radius (the triangle's: r/3).
_AREA_PER_R2 = {"circle": np.pi, "square": 1.7**2, "triangle": 2.0}
_CENTROID_BELOW = {"circle": 0.0, "square": 0.0, "triangle": 1 / 3}


def shape_scores(image: np.ndarray) -> list[float] | None:
    """Per shape, the best intersection-over-union of the image's foreground with that shape drawn at the size its area
    implies and around its centroid (a small search over radius and position); None without a foreground."""
    mask = _foreground(image)
    area = mask.sum()
    if area < 4:
        return None
    ys, xs = np.nonzero(mask)
    my, mx = ys.mean() + 0.5, xs.mean() + 0.5
    scores = []
    for shape, name in enumerate(SHAPES):
        r0, best = np.sqrt(area / _AREA_PER_R2[name]), 0.0
        for r in r0 * np.array([0.85, 0.93, 1.0, 1.08, 1.16]):
            for dy in (-1.5, -0.75, 0, 0.75, 1.5):
                for dx in (-1.5, -0.75, 0, 0.75, 1.5):
                    drawn = shape_mask(shape, mx + dx, my - _CENTROID_BELOW[name] * r + dy, r, mask.shape[0])
                    best = max(best, (drawn & mask).sum() / (drawn | mask).sum())
        scores.append(float(best))
    return scores


def shape_of(image: np.ndarray) -> int | None:
    """Index in SHAPES of the shape a uint8 image [H, W, 3] shows: the one whose template fits its foreground best."""
    scores = shape_scores(image)
    return None if scores is None else int(np.argmax(scores))
