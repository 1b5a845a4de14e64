"""toy-demo: draw every class of the trained toy pipeline from its prompt ("a red circle", ...) and save one PNG.

    python -m slimengine.tools.toy_demo toy.engine -o shapes.png [--seed 0] [--guidance 4.0] [--steps 28]
                                        [--teacher toy-teacher.engine --compare teacher-vs-student.png]

The bundle is a toy checkpoint exported with its pipeline (export-engine models/toy-sd3.safetensors --pipeline
models/toy-pipeline: the 1.x student; models/toy-sd3-teacher.safetensors: its 28-step teacher). Rows are shapes
(circle, square, triangle), columns colours; each picture is made from its prompt string in the C runtime (tokenizers,
text encoders, the bundle's own program, VAE) through the Python binding, and the demo prints how many show the
prompted colour and shape (toy_shapes.dominant_colour, toy_shapes.shape_of). With --teacher it also draws the teacher
bundle's grid from the same seed, prints its figures and how often the two pictures of a prompt agree, and --compare
writes the teacher's row over the student's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import slimengine as se
from slimengine.staging import output_file, write_file_atomically
from slimengine.tools import toy_shapes


def generate_classes(session: se.Session, seed: int, guidance: float | None = None, **kwargs):
    """uint8 pictures [18, 32, 32, 3] of every class from its prompt, in toy_shapes.class_grid order, and the run's stats."""
    result = session.generate(prompt=toy_shapes.class_prompts(), guidance_scale=guidance, seed=seed, height=toy_shapes.IMAGE_SIZE,
                              width=toy_shapes.IMAGE_SIZE, **kwargs)
    return result.image, result.stats


def labels(images: np.ndarray) -> tuple[list, list]:
    """(colour index, shape index) the project's classifiers read from each picture (None: nothing drawn)."""
    return [toy_shapes.dominant_colour(img) for img in images], [toy_shapes.shape_of(img) for img in images]


def score(images: np.ndarray) -> tuple[int, int]:
    """(pictures in the prompted colour, pictures of the prompted shape) among class-grid pictures."""
    shapes, colours = toy_shapes.class_grid()
    colour, shape = labels(images)
    return sum(int(a == b) for a, b in zip(colour, colours)), sum(int(a == b) for a, b in zip(shape, shapes))


def agreement(images: np.ndarray, reference: np.ndarray) -> tuple[int, int]:
    """(pairs whose colours agree, pairs whose shapes agree) between two pictures of each prompt; nothing drawn never agrees."""
    (c1, s1), (c2, s2) = labels(images), labels(reference)
    return (sum(int(a is not None and a == b) for a, b in zip(c1, c2)), sum(int(a is not None and a == b) for a, b in zip(s1, s2)))


def diversity(images_by_seed: np.ndarray) -> float:
    """Mean absolute pixel difference (0-255) between the pictures two seeds give one prompt, averaged over every pair of
    seeds and every prompt: [seeds, prompts, H, W, 3] -> float."""
    x = images_by_seed.astype(np.float32)
    seeds = x.shape[0]
    pairs = [np.abs(x[i] - x[j]).mean() for i in range(seeds) for j in range(i + 1, seeds)]
    return float(np.mean(pairs))


def save_comparison(teacher: np.ndarray, student: np.ndarray, path) -> None:
    """Per prompt a column: the teacher's picture above the student's (several seeds: pairs of rows, seed by seed)."""
    teacher, student = teacher.reshape(-1, *teacher.shape[-3:]), student.reshape(-1, *student.shape[-3:])
    prompts = len(toy_shapes.class_prompts())
    rows = [block for i in range(0, len(teacher), prompts) for block in (teacher[i:i + prompts], student[i:i + prompts])]
    toy_shapes.save_png(np.concatenate(rows), path, columns=prompts)


def _line(engine: Path, images: np.ndarray, stats: dict, ms: float) -> str:
    colour, shape = score(images)
    return (f"{engine}: {len(images)} prompts (\"{toy_shapes.class_prompts()[0]}\", ...), {stats['steps']} steps, effective NFE "
            f"{stats['effective_nfe']:.2f}, {ms:.0f} ms; {colour}/{len(images)} in the prompted colour, {shape}/{len(images)} of the "
            f"prompted shape")


def _draw(engine: Path, seed: int, guidance, steps) -> tuple[np.ndarray, dict, float]:
    start = time.perf_counter()
    with se.open_engine(engine) as bundle, bundle.session() as session:
        images, stats = generate_classes(session, seed, guidance, num_steps=steps)
    return images, stats, (time.perf_counter() - start) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="toy-demo", description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path, help="bundle exported from a toy checkpoint with --pipeline models/toy-pipeline")
    parser.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, help="CFG scale (default: the bundle's)")
    parser.add_argument("--steps", type=int, help="a plain plan of that many steps (default: the bundle's program)")
    parser.add_argument("--teacher", type=Path, help="the teacher's bundle: draw its grid too (its own program) and compare")
    parser.add_argument("--compare", type=Path, help="with --teacher: PNG of the teacher's row over this bundle's row")
    args = parser.parse_args(argv)
    if args.compare is not None and args.teacher is None:
        parser.error("--compare needs --teacher")
    inputs = [args.engine] + ([args.teacher] if args.teacher else [])
    try:  # never into a bundle; before generating: never a device, FIFO, socket, directory or a link to nothing
        for path in (args.output, args.compare):
            if path is not None:
                output_file(path, inputs=inputs)
        images, stats, ms = _draw(args.engine, args.seed, args.guidance, args.steps)
        teacher = _draw(args.teacher, args.seed, None, None) if args.teacher else None
        write_file_atomically(args.output, lambda tmp: toy_shapes.save_png(images, tmp))
        if args.compare is not None:
            write_file_atomically(args.compare, lambda tmp: save_comparison(teacher[0], images, tmp))
    except (se.SlimError, ValueError) as e:  # OutputPathError is a ValueError (a path that changed while generating)
        print(f"toy-demo: error: {e}", file=sys.stderr)
        return 2
    if teacher is not None:
        print(_line(args.teacher, *teacher) + " (teacher)")
    print(_line(args.engine, images, stats, ms) + f" -> {args.output}")
    if teacher is not None:
        colour, shape = agreement(images, teacher[0])
        print(f"agreement with the teacher's picture of the same prompt and seed: {colour}/{len(images)} colours, "
              f"{shape}/{len(images)} shapes" + (f" -> {args.compare}" if args.compare else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
