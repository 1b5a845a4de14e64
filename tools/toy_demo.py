"""toy-demo: draw every class of the trained toy model through the engine and save one PNG.

    python -m slimengine.tools.toy_demo toy.engine -o shapes.png [--seed 0] [--guidance 4.0]

Rows are shapes (circle, square, triangle), columns colours; generation runs in the C runtime
through the Python binding, with the bundle's own program (1.x or full steps).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import slimengine as se
from slimengine.tools import toy_shapes


def class_grid():
    shapes = np.repeat(np.arange(len(toy_shapes.SHAPES)), len(toy_shapes.COLOURS))
    colours = np.tile(np.arange(len(toy_shapes.COLOURS)), len(toy_shapes.SHAPES))
    return shapes, colours


def generate_classes(session: se.Session, seed: int, guidance: float | None = None):
    """Latents for every (shape, colour) class in one batch, and the run's stats."""
    shapes, colours = class_grid()
    text, pooled = toy_shapes.prompt_embeds(shapes, colours)
    size = toy_shapes.IMAGE_SIZE // 2
    result = session.generate(text, pooled, negative_prompt_embeds=np.zeros_like(text), negative_pooled_embeds=np.zeros_like(pooled),
                              guidance_scale=guidance, seed=seed, height=size, width=size)
    return result.latents, result.stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="toy-demo", description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path, help="bundle exported from the toy checkpoint")
    parser.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, help="CFG scale (default: the bundle's)")
    args = parser.parse_args(argv)
    try:
        session = se.open_engine(args.engine).session()
    except se.SlimError as e:
        print(f"toy-demo: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    latents, stats = generate_classes(session, args.seed, args.guidance)
    toy_shapes.save_png(toy_shapes.to_images(latents), args.output)
    print(f"{args.engine}: {len(latents)} images, {stats['steps']} steps, effective NFE {stats['effective_nfe']:.2f}, "
          f"{stats['total_ms']:.1f} ms in the runtime ({(time.perf_counter() - start) * 1e3:.1f} ms with Python) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
