"""toy-demo: draw every class of the trained toy pipeline from its prompt ("a red circle", ...) and save one PNG.

    python -m slimengine.tools.toy_demo toy.engine -o shapes.png [--seed 0] [--guidance 4.0] [--steps 28]

The bundle is the toy student exported with its pipeline (export-engine models/toy-sd3.safetensors --pipeline
models/toy-pipeline). Rows are shapes (circle, square, triangle), columns colours; each picture is made from its
prompt string in the C runtime (tokenizers, text encoders, the bundle's own program, VAE) through the Python binding,
and the demo prints how many show the prompted colour and shape (toy_shapes.dominant_colour, toy_shapes.shape_of).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import slimengine as se
from slimengine.staging import OutputPathError, output_file, write_file_atomically
from slimengine.tools import toy_shapes


def generate_classes(session: se.Session, seed: int, guidance: float | None = None, **kwargs):
    """uint8 pictures [18, 32, 32, 3] of every class from its prompt, in toy_shapes.class_grid order, and the run's stats."""
    result = session.generate(prompt=toy_shapes.class_prompts(), guidance_scale=guidance, seed=seed, height=toy_shapes.IMAGE_SIZE,
                              width=toy_shapes.IMAGE_SIZE, **kwargs)
    return result.image, result.stats


def score(images: np.ndarray) -> tuple[int, int]:
    """(pictures in the prompted colour, pictures of the prompted shape) among class-grid pictures."""
    shapes, colours = toy_shapes.class_grid()
    colour = sum(toy_shapes.dominant_colour(img) == c for img, c in zip(images, colours))
    shape = sum(toy_shapes.shape_of(img) == s for img, s in zip(images, shapes))
    return int(colour), int(shape)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="toy-demo", description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path, help="bundle exported from the toy checkpoint with --pipeline models/toy-pipeline")
    parser.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, help="CFG scale (default: the bundle's)")
    parser.add_argument("--steps", type=int, help="a plain plan of that many steps (default: the bundle's program, 1.x)")
    args = parser.parse_args(argv)
    try:
        output_file(args.output, inputs=[args.engine])  # never into the bundle; before generating: never a device, FIFO, socket, directory or a link to nothing
    except OutputPathError as e:
        print(f"toy-demo: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        session = se.open_engine(args.engine).session()
        images, stats = generate_classes(session, args.seed, args.guidance, num_steps=args.steps)
    except (se.SlimError, ValueError) as e:
        print(f"toy-demo: error: {e}", file=sys.stderr)
        return 2
    try:
        write_file_atomically(args.output, lambda tmp: toy_shapes.save_png(images, tmp))
    except OutputPathError as e:  # the path changed while generating
        print(f"toy-demo: error: {e}", file=sys.stderr)
        return 2
    colour, shape = score(images)
    print(f"{args.engine}: {len(images)} prompts (\"{toy_shapes.class_prompts()[0]}\", ...), {stats['steps']} steps, effective NFE "
          f"{stats['effective_nfe']:.2f}, {(time.perf_counter() - start) * 1e3:.0f} ms; {colour}/{len(images)} in the prompted colour, "
          f"{shape}/{len(images)} of the prompted shape -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
