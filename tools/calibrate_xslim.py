"""calibrate-xslim: profile an SD3 bundle and write an offline X-Slim schedule (docs/xslim.md).

    calibrate-xslim model.engine --embeds calib.npz -o schedule.json [--steps 50] [--target-db 30]

X-Slim's released strategy files come from profiling a model; this does the same for step-level
reuse. On calibration prompts and seeds it computes the plan fully, then tries schedules that run the
first W steps, the last, and a full step every K steps in between (the others reuse the stack's last
residual), for W in 2..4 and K from 1.5 to 6. It writes the schedule with the fewest full steps whose
final latents stay within --target-db PSNR of full computation on every calibration seed, in
X-Slim's format ({"MODE": {"fully_infer_step": [...]}}), ready for `--xslim xslim:schedule=FILE,mode=MODE`.
Evaluate it on other seeds or prompts than the calibration ones.

--embeds: an .npz with prompt_embeds [B, L, D] and pooled_prompt_embeds [B, P] (and optionally
negative_prompt_embeds, negative_pooled_prompt_embeds; zeros otherwise), or `toy[:FOLDER]` for the 18 class
prompts of the project's trained toy pipeline ("a red circle", ...; the empty prompt as the negative), encoded by
the pipeline folder's text encoders (default models/toy-pipeline, from the source tree).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

import slimengine as se
from slimengine.staging import OutputPathError, output_file, write_file_atomically

WARMUPS = (2, 3, 4)
SPACINGS = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)


def psnr_db(latents: np.ndarray, reference: np.ndarray, peak: float | None = None) -> float:
    """PSNR of latents against a reference; `peak` defaults to the reference's range (max - min)."""
    peak = float(reference.max() - reference.min()) if peak is None else peak
    mse = float(np.mean((latents.astype(np.float64) - reference) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak * peak / mse)


def full_steps(steps: int, warmup: int, spacing: float) -> list[int]:
    """The first `warmup` steps, the last, and every `spacing` steps after the warm-up (rounded)."""
    every = {round(warmup + j * spacing) for j in range(steps)}
    return sorted(({*range(warmup), steps - 1} | every) & set(range(steps)))


def schedule_policy(steps: int, full: list[int]) -> dict:
    """The runtime's JSON policy for a step-level schedule (full listed, skip otherwise)."""
    levels = [{"level": "full" if s in full else "skip"} for s in range(steps)]
    return {"kind": "xslim", "mode": "schedule", "sample_ratio": 0.5, "block_threshold": 0.1, "first_blocks": 2, "schedule": levels}


def write_schedule(path: Path, full: list[int], mode: str) -> None:
    """The schedule in X-Slim's format: `full` steps under `mode`, every other step a skip."""
    write_file_atomically(path, lambda tmp: tmp.write_text(json.dumps({mode: {"fully_infer_step": full}}, indent=1) + "\n"))


@dataclasses.dataclass
class Candidate:
    warmup: int
    spacing: float
    full: list[int]
    psnr_db: float  # the lowest over the calibration seeds


def calibrate(session: se.Session, embeds: dict, *, steps: int, seeds: list[int], target_db: float, peak: float | None = None,
              progress: bool = False, **generate_kwargs) -> tuple[Candidate | None, list[Candidate]]:
    """Every candidate of the family, evaluated; the one with the fewest full steps reaching target_db
    on every seed (ties: the higher PSNR), or None."""
    def run(seed: int, xslim):
        return session.generate(embeds["prompt_embeds"], embeds["pooled_prompt_embeds"], seed=seed, xslim=xslim, num_steps=steps,
                                negative_prompt_embeds=embeds["negative_prompt_embeds"],
                                negative_pooled_embeds=embeds["negative_pooled_prompt_embeds"], **generate_kwargs).latents

    from tqdm import tqdm  # the profile extra, as profile-engine's

    references = {seed: run(seed, "none") for seed in seeds}
    shapes = {tuple(full_steps(steps, w, k)): (w, k) for w in WARMUPS for k in SPACINGS}  # the first (W, K) of each shape
    candidates = []
    for full, (w, k) in tqdm(shapes.items(), desc="calibrate", unit="schedule", disable=not progress, file=sys.stderr):
        policy = schedule_policy(steps, list(full))
        worst = min(psnr_db(run(seed, policy), references[seed], peak) for seed in seeds)
        candidates.append(Candidate(w, k, list(full), worst))
    passing = [c for c in candidates if c.psnr_db >= target_db]
    best = min(passing, key=lambda c: (len(c.full), -c.psnr_db)) if passing else None
    return best, candidates


def load_embeds(spec: str) -> dict:
    if spec == "toy" or spec.startswith("toy:"):
        from slimengine.tools import toy_shapes

        folder = Path(spec[len("toy:"):] or "models/toy-pipeline")
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"--embeds {spec}: {folder} is not the toy pipeline folder (models/toy-pipeline in the source tree); "
                             "run from the source tree or pass toy:FOLDER")
        prompts = toy_shapes.class_prompts()
        text, pooled = toy_shapes.prompt_embeds(folder, prompts)
        neg_text, neg_pooled = toy_shapes.prompt_embeds(folder, [""] * len(prompts))  # CFG's empty negative prompt
        embeds = {"prompt_embeds": text, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": neg_text,
                  "negative_pooled_prompt_embeds": neg_pooled}
    else:
        embeds = _read_npz(spec)
    embeds.setdefault("negative_prompt_embeds", np.zeros_like(embeds["prompt_embeds"]))
    embeds.setdefault("negative_pooled_prompt_embeds", np.zeros_like(embeds["pooled_prompt_embeds"]))
    return embeds


def _read_npz(spec: str) -> dict:
    try:
        with np.load(spec) as data:
            embeds = {k: np.asarray(data[k], dtype=np.float32) for k in data.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read --embeds {spec}: {e}") from None
    missing = {"prompt_embeds", "pooled_prompt_embeds"} - embeds.keys()
    if missing:
        raise ValueError(f"--embeds {spec} lacks {', '.join(sorted(missing))} (it holds {', '.join(sorted(embeds)) or 'nothing'})")
    return embeds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="calibrate-xslim", description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", type=Path, help="SD3 engine bundle (NAME.engine)")
    parser.add_argument("--embeds", required=True, help="calibration prompts: an .npz (see above) or 'toy[:FOLDER]'")
    parser.add_argument("-o", "--output", type=Path, required=True, help="schedule file to write (X-Slim's JSON format)")
    parser.add_argument("--steps", type=int, default=28, help="steps of the plain plan to calibrate (default 28)")
    parser.add_argument("--guidance-scale", type=float, help="CFG scale (default: the bundle's)")
    parser.add_argument("--size", type=int, help="latent height and width (default: the bundle's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="calibration noise seeds (default 1 2)")
    parser.add_argument("--target-db", type=float, default=30.0, help="lowest PSNR of the final latents vs full computation (default 30)")
    parser.add_argument("--peak", type=float, help="PSNR peak (default: the range of the full computation's latents)")
    parser.add_argument("--mode", default="fast", help="the mode name the schedule is stored under (default fast)")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"calibrate-xslim: error: {message}", file=sys.stderr)
        return 2

    if args.steps < 3:
        return fail(f"--steps must be >= 3, got {args.steps}")
    try:
        output_file(args.output, inputs=[args.engine])  # never into the bundle; never a device, FIFO, socket, directory or a link to nothing, even with --force
    except OutputPathError as e:
        return fail(str(e))
    if args.output.exists() and not args.force:
        return fail(f"{args.output} already exists (use --force to replace it)")
    try:
        embeds = load_embeds(args.embeds)
        session = se.open_engine(args.engine).session()
        best, candidates = calibrate(session, embeds, steps=args.steps, seeds=args.seeds, target_db=args.target_db, peak=args.peak,
                                     progress=not args.quiet, guidance_scale=args.guidance_scale, height=args.size, width=args.size)
    except (se.SlimError, ValueError) as e:
        return fail(str(e))
    for c in sorted(candidates, key=lambda c: len(c.full)):
        print(f"  warm-up {c.warmup}, full every {c.spacing:g}: {len(c.full):3d} of {args.steps} full steps, {c.psnr_db:5.1f} dB")
    if best is None:
        top = max(candidates, key=lambda c: c.psnr_db)
        print(f"calibrate-xslim: no schedule of the family reaches {args.target_db:g} dB (best {top.psnr_db:.1f} dB with "
              f"{len(top.full)} full steps); nothing written", file=sys.stderr)
        return 1
    try:
        write_schedule(args.output, best.full, args.mode)
    except OutputPathError as e:  # the path changed while calibrating
        return fail(str(e))
    print(f"{args.output}: mode '{args.mode}', {len(best.full)} of {args.steps} steps full (warm-up {best.warmup}, every "
          f"{best.spacing:g}), {best.psnr_db:.1f} dB on seeds {' '.join(map(str, args.seeds))}; use --xslim "
          f"xslim:schedule={args.output},mode={args.mode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
