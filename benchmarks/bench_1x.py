"""Benchmark of 1.x-Distill on the toy pipeline (issue #21), in one run through the engine: the distilled student
(models/toy-sd3.safetensors, 1.x program) against its teacher's 28-step CFG program (models/toy-sd3-teacher.safetensors),
the 18 class prompts ("a red circle", ...: a caption template held out of distill-1x's prompts) at seeds 0-7 (the
engine's Philox noise; distill-1x trained on other noise).

- agreement: per seed, how many of the 18 student pictures show the colour / the shape the project's classifier reads
  from the teacher's picture of the same prompt and seed (goal: >= 17/18 colours and >= 16/18 shapes on every seed);
- diversity: mean pixel distance between the seeds' pictures of one prompt, student / teacher (goal >= 0.8);
- speed: wall time of the sampling program for the 18 prompts, 1.x vs 28 steps with CFG (28 x 2 model evaluations),
  on the same student bundle (goal >= 25x), effective NFE, and the whole prompt-to-image call (VAE decode included);
- another skipped range: blocks 1-4 with compensation fitted by fit-compensation, with no compensation (Δ reused as is),
  and the shipped range (1-3), same figures;
- a picture: per prompt the teacher's picture above the student's, seed by seed (--png).

    python benchmarks/bench_1x.py [--seeds 8] [--repeats 5] [--range 1-4] [--png out/bench_1x.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import cli

import slimengine as se
from slimengine.tools import toy_shapes
from slimengine.tools.toy_demo import agreement, diversity, generate_classes, save_comparison, score

ROOT = Path(__file__).resolve().parents[1]
STUDENT, TEACHER = ROOT / "models" / "toy-sd3.safetensors", ROOT / "models" / "toy-sd3-teacher.safetensors"
PIPELINE, PROMPTS = ROOT / "models" / "toy-pipeline", ROOT / "models" / "toy-prompts.txt"
GOALS = {"colours": 17, "shapes": 16, "diversity": 0.8, "speed": 25.0}


def export(checkpoint: Path, out: Path, *flags: str) -> Path:
    cli("slimengine.export.cli", str(checkpoint), "--pipeline", str(PIPELINE), "-o", str(out), "-q", "--force", *flags)
    return out


def without_compensation(student: Path, out: Path) -> Path:
    """The student's transformer without its compensation MLPs: exported with a range, the runtime reuses Δ as is."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(student), "pt") as f:
        metadata = f.metadata()
    save_file({k: v for k, v in load_file(str(student)).items() if not k.startswith("delta_pred_")}, str(out), metadata=metadata)
    return out


def draw(bundle: Path, seeds: int) -> tuple[np.ndarray, float]:
    """uint8 pictures [seeds, 18, 32, 32, 3] of the class prompts by the bundle's own program, and its effective NFE."""
    with se.open_engine(bundle) as engine, engine.session() as session:
        runs = [generate_classes(session, seed) for seed in range(seeds)]
    return np.stack([images for images, _ in runs]), runs[0][1]["effective_nfe"]


def quality(name: str, drawn: tuple[np.ndarray, float], teacher: np.ndarray) -> dict:
    images, nfe = drawn
    name = f"{name}, effective NFE {nfe:.2f}"
    per_seed = [agreement(s, t) for s, t in zip(images, teacher)]
    prompted = [score(s) for s in images]
    row = {"name": name, "agree_colours": [c for c, _ in per_seed], "agree_shapes": [s for _, s in per_seed],
           "prompted_colours": [c for c, _ in prompted], "prompted_shapes": [s for _, s in prompted],
           "diversity_ratio": diversity(images) / diversity(teacher)}
    n = images.shape[1]
    ok = min(row["agree_colours"]) >= GOALS["colours"] and min(row["agree_shapes"]) >= GOALS["shapes"]
    print(f"{name}:\n  agreement with the teacher per seed: colours {row['agree_colours']} (worst {min(row['agree_colours'])}/{n}), "
          f"shapes {row['agree_shapes']} (worst {min(row['agree_shapes'])}/{n}) -> {'meets' if ok else 'MISSES'} >= "
          f"{GOALS['colours']}/{n} and >= {GOALS['shapes']}/{n}\n"
          f"  prompted colour / shape per seed: {row['prompted_colours']} / {row['prompted_shapes']}\n"
          f"  diversity, student / teacher: {row['diversity_ratio']:.2f} (goal >= {GOALS['diversity']})")
    return row


def speed(bundle: Path, repeats: int) -> dict:
    """Interleaved calls of the 18 prompts, the bundle's 1.x program vs 28 steps with CFG 4, medians: the sampling program
    alone (generate from the prompts' embeddings: every transformer step, no encoders, no VAE) and the whole prompt call
    (tokenizers and encoders from the warm prompt cache, the program, the VAE decode)."""
    text, pooled = toy_shapes.prompt_embeds(PIPELINE, toy_shapes.class_prompts())
    neg_text, neg_pooled = toy_shapes.prompt_embeds(PIPELINE, [""] * len(text))
    calls = {"1.x": {}, "28 x 2": {"num_steps": 28, "guidance_scale": 4.0}}
    times = {(k, kind): [] for k in calls for kind in ("program", "prompt")}
    nfe = {}
    with se.open_engine(bundle) as engine, engine.session() as session:
        def program(seed, **kwargs):
            return session.generate(text, pooled, negative_prompt_embeds=neg_text, negative_pooled_embeds=neg_pooled, seed=seed,
                                    **kwargs).stats

        def prompt(seed, num_steps=None, guidance_scale=None):
            return generate_classes(session, seed, guidance_scale, num_steps=num_steps)[1]

        for kwargs in calls.values():  # warm: after this the prompt cache holds the 18 prompts and the empty one
            program(0, **kwargs)
            prompt(0, **kwargs)
        for r in range(repeats):
            for name, kwargs in calls.items():
                for kind, fn in (("program", program), ("prompt", prompt)):
                    start = time.perf_counter()
                    stats = fn(r, **kwargs)
                    times[name, kind].append((time.perf_counter() - start) * 1e3)
                    nfe[name] = stats["effective_nfe"]
    out = {f"{k} {kind} ms": statistics.median(v) for (k, kind), v in times.items()}
    out.update({f"{k} effective NFE": v for k, v in nfe.items()})
    out["program ratio"] = out["28 x 2 program ms"] / out["1.x program ms"]
    out["prompt ratio"] = out["28 x 2 prompt ms"] / out["1.x prompt ms"]
    print(f"speed, 18 prompts per call, median of {repeats}, interleaved, one engine (the student's bundle):\n"
          f"  sampling program: 1.x {out['1.x program ms']:.1f} ms (effective NFE {nfe['1.x']:.2f}) vs 28 x 2 "
          f"{out['28 x 2 program ms']:.1f} ms (effective NFE {nfe['28 x 2']:.2f}): {out['program ratio']:.1f}x "
          f"({'meets' if out['program ratio'] >= GOALS['speed'] else 'MISSES'} >= {GOALS['speed']:.0f}x; NFE ratio "
          f"{nfe['28 x 2'] / nfe['1.x']:.1f}x)\n"
          f"  whole prompt call (prompt cache warm, VAE decode included): 1.x {out['1.x prompt ms']:.1f} ms vs 28 x 2 "
          f"{out['28 x 2 prompt ms']:.1f} ms: {out['prompt ratio']:.1f}x")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1 (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per program (default 5)")
    parser.add_argument("--range", default="1-4", help="another skipped range to fit compensation for (default 1-4)")
    parser.add_argument("--fit-steps", type=int, default=600, help="fit-compensation's steps for --range (default 600)")
    parser.add_argument("--png", type=Path, default=ROOT / "out" / "bench_1x.png", help="teacher-over-student picture to write")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_1x-") as tmp:
        work = Path(tmp)
        print(f"exporting the teacher, the student and the student with blocks {args.range} (fitted / no compensation) ...", flush=True)
        teacher_bundle = export(TEACHER, work / "teacher.engine")
        student_bundle = export(STUDENT, work / "student.engine")
        start = time.perf_counter()
        from slimengine.distill.cli import fit_main

        fitted = work / f"student-{args.range}.safetensors"
        if fit_main([str(STUDENT), "--pipeline", str(PIPELINE), "--prompts", str(PROMPTS), "--skip-blocks", args.range,
                     "--steps", str(args.fit_steps), "-o", str(fitted), "-q"]) != 0:
            raise SystemExit("fit-compensation failed")
        fit_seconds = time.perf_counter() - start
        fitted_bundle = export(fitted, work / "fitted.engine")
        plain_bundle = export(without_compensation(STUDENT, work / "plain.safetensors"), work / "plain.engine", "--skip-blocks", args.range)

        teacher, teacher_nfe = draw(teacher_bundle, args.seeds)  # its own program: 28 steps, CFG 4 (the teacher's metadata)
        colours, shapes = zip(*(score(t) for t in teacher))
        print(f"teacher, 28 steps with CFG 4 (effective NFE {teacher_nfe:.0f}): prompted colour per seed {list(colours)}, shape {list(shapes)}")
        student = draw(student_bundle, args.seeds)
        rows = [quality("student, shipped range 1-3 (distilled with it)", student, teacher)]
        rows.append(quality(f"student, blocks {args.range}, compensation fitted by fit-compensation in {fit_seconds:.0f} s",
                            draw(fitted_bundle, args.seeds), teacher))
        rows.append(quality(f"student, blocks {args.range}, no compensation (Δ reused as is)", draw(plain_bundle, args.seeds), teacher))
        timing = speed(student_bundle, args.repeats)
        args.png.parent.mkdir(parents=True, exist_ok=True)
        save_comparison(teacher, student[0], args.png)
        print(f"picture: {args.png} (per prompt, the teacher's 28-step picture above the student's 1.x one; seeds 0-{args.seeds - 1} "
              f"top to bottom)")
        if args.json:
            args.json.write_text(json.dumps({"quality": rows, "speed": timing}, indent=1))


if __name__ == "__main__":
    main()
