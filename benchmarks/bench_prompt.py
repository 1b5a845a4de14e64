"""Benchmark of prompt to image on CPU (issue #13), split by stage, against diffusers' StableDiffusion3Pipeline
with the same weights in the same run, for two pipelines.

The trained toy pipeline (models/toy-pipeline + the student models/toy-sd3.safetensors, 32 px): the student's
1.x program (2 steps, skipped blocks, no CFG) against diffusers' 2 plain steps, and 28 steps with CFG 4 both ways.

A random SD3 pipeline folder of the `small` preset (tests/pipeline_files.py: 256 px images, CLIP-L/G and T5
of 4 layers, a 4-block transformer, a VAE of widths 32-128; the tokenizers trained there) is exported with
export-engine and run both ways: same prompt, negative prompt "", seed noise, steps, guidance (CFG on) and size.
Each figure is the median of --iters runs after --warmup untimed ones, each pipeline in its own block (not
interleaved: on a small machine the thread pools' spin-waiting after a run slows the other side).

slimengine's stages are Session.generate(prompt=...)'s stats["stage_ms"] (tokenize, clip_l, clip_g, t5, steps =
the sampling call, vae_decode with the uint8 conversion), with the prompt cache off (every run encodes both
prompts, as diffusers does). diffusers' stages come from forward hooks on its modules: each text encoder, the
transformer (summed over the steps' forwards) and vae.decode; "tokenize" is encode_prompt's wall time less its
encoders' (tokenizers and tensor glue). Both sides run with the same thread count (--threads: ONNX Runtime's
intra-op threads and torch.set_num_threads).

Also the prompt-embedding cache: an encode-and-generate with a cache hit (both prompts cached) vs a miss.

    python benchmarks/bench_prompt.py [--iters 7] [--warmup 2] [--steps 4] [--threads 2] [--only small|toy] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/pipeline_files.py: the pipeline folder maker (its tokenizer files are made there)

import slimengine as se  # noqa: E402
from tests.pipeline_files import make_sd3_pipeline  # noqa: E402

PROMPT = "a photo of a cat sitting on a mat, oil on canvas"
GUIDANCE, SIZE_PX, T5_LENGTH = 5.0, 256, 256  # CFG on; 32x32 latents; SD3's max_sequence_length
TOY, TOY_PIPELINE = ROOT / "models" / "toy-sd3.safetensors", ROOT / "models" / "toy-pipeline"
TOY_PROMPT = "a red circle"
STAGES = ("tokenize", "clip_l", "clip_g", "t5", "steps", "vae_decode")


class Stopwatch:
    """Forward hooks that add each module call's wall time (ms) to a stage's total."""

    def __init__(self):
        self.ms = {}
        self._start = {}

    def watch(self, module, stage: str) -> None:
        module.register_forward_pre_hook(lambda *_: self._start.__setitem__(stage, time.perf_counter()))
        module.register_forward_hook(lambda *_: self._add(stage))

    def _add(self, stage: str) -> None:
        self.ms[stage] = self.ms.get(stage, 0.0) + (time.perf_counter() - self._start[stage]) * 1e3


def diffusers_pipeline(folder: Path, transformer=None):
    from diffusers import StableDiffusion3Pipeline

    extra = {} if transformer is None else {"transformer": transformer}
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, torch_dtype=torch.float32, **extra)
    pipe.set_progress_bar_config(disable=True)
    watch = Stopwatch()
    for module, stage in ((pipe.text_encoder, "clip_l"), (pipe.text_encoder_2, "clip_g"), (pipe.text_encoder_3, "t5"),
                          (pipe.transformer, "steps")):
        watch.watch(module, stage)
    decode = pipe.vae.decode

    def timed_decode(*args, **kwargs):  # vae.decode is a method, not a forward: wrapped
        start = time.perf_counter()
        out = decode(*args, **kwargs)
        watch.ms["vae_decode"] = watch.ms.get("vae_decode", 0.0) + (time.perf_counter() - start) * 1e3
        return out

    pipe.vae.decode = timed_decode
    encode = pipe.encode_prompt

    def timed_encode(*args, **kwargs):
        start = time.perf_counter()
        out = encode(*args, **kwargs)
        watch.ms["encode_prompt"] = watch.ms.get("encode_prompt", 0.0) + (time.perf_counter() - start) * 1e3
        return out

    pipe.encode_prompt = timed_encode
    return pipe, watch


@dataclasses.dataclass
class Case:
    """One prompt-to-image setting run both ways."""

    prompt: str
    noise: np.ndarray
    steps: int  # diffusers' num_inference_steps
    guidance: float
    t5_length: int
    engine_steps: int | None  # the engine's num_steps (None: the bundle's own program)
    engine_xslim: str | None  # the engine's X-Slim policy ("none": every block; None: the bundle's program)

    @property
    def size_px(self) -> int:
        return self.noise.shape[-1] * self.factor

    factor: int = 8


def run_diffusers(pipe, watch: Stopwatch, case: Case) -> dict:
    watch.ms.clear()
    start = time.perf_counter()
    with torch.no_grad():
        pipe(case.prompt, negative_prompt="", latents=torch.from_numpy(case.noise), guidance_scale=case.guidance,
             num_inference_steps=case.steps, height=case.size_px, width=case.size_px, max_sequence_length=case.t5_length, output_type="np")
    total = (time.perf_counter() - start) * 1e3
    ms = dict(watch.ms)
    ms["tokenize"] = ms.pop("encode_prompt") - ms["clip_l"] - ms["clip_g"] - ms["t5"]
    ms["total"] = total
    return ms


def run_engine(session, case: Case) -> dict:
    session.clear_prompt_cache()  # a miss every run, as diffusers encodes every call
    start = time.perf_counter()
    result = session.generate(prompt=case.prompt, negative_prompt="", latents=case.noise, guidance_scale=case.guidance,
                              num_steps=case.engine_steps, xslim=case.engine_xslim)
    total = (time.perf_counter() - start) * 1e3
    return dict(result.stats["stage_ms"], total=total)


def medians(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def compare(title: str, session, pipe, watch, case: Case, args) -> dict:
    """Both sides' median stage times for `case`, printed as a table with ratios; returns the engine's."""
    # One block each, not interleaved: ONNX Runtime's intra-op threads spin for a while after each run (and
    # torch's OpenMP threads after theirs), which on a small machine takes the cores the other side needs;
    # interleaved, diffusers' time tripled here on 2 cores.
    a = medians([run_engine(session, case) for _ in range(args.warmup + args.iters)][args.warmup:])
    b = medians([run_diffusers(pipe, watch, case) for _ in range(args.warmup + args.iters)][args.warmup:])
    print(f"\n{title}")
    print(f"{'stage (ms)':14} {'slimengine':>11} {'diffusers':>11} {'diffusers/slim':>15}")
    for stage in (*STAGES, "total"):
        ratio = b[stage] / a[stage] if a[stage] > 0 else float("nan")
        print(f"{stage:14} {a[stage]:11.2f} {b[stage]:11.2f} {ratio:15.2f}")
    print(f"end to end: slimengine {a['total']:.1f} ms, diffusers {b['total']:.1f} ms: {b['total'] / a['total']:.2f}x")
    return a


def bench_small(work: Path, args) -> None:
    folder, bundle = work / "sd3-small", work / "sd3-small.engine"
    if not (folder / "model_index.json").exists():
        make_sd3_pipeline(folder, preset="small")
    if not (bundle / "manifest.json").exists():
        cli("slimengine.export.cli", str(folder), "-o", str(bundle), "-q", "--max-sequence-length", str(T5_LENGTH))
    noise = np.random.default_rng(0).standard_normal((1, 16, SIZE_PX // 8, SIZE_PX // 8)).astype(np.float32)
    case = Case(PROMPT, noise, args.steps, GUIDANCE, T5_LENGTH, args.steps, "none")
    pipe, watch = diffusers_pipeline(folder)
    with se.Engine(bundle, intra_op_threads=args.threads) as engine:
        session = engine.session()
        a = compare(f"small preset (random weights): {SIZE_PX}x{SIZE_PX} px, {args.steps} steps, CFG {GUIDANCE} (batch 2 per step), "
                    f"T5 length {T5_LENGTH}", session, pipe, watch, case, args)
        # The prompt cache: the same call with both prompts cached (hit) vs encoded (miss); stage_ms has the steps
        # and the decode as well, so the encode part alone is compared too.
        hit_runs, miss_runs = [], []
        kwargs = dict(prompt=PROMPT, negative_prompt="", latents=noise, guidance_scale=GUIDANCE, num_steps=args.steps)
        session.generate(**kwargs)
        for _ in range(args.iters):
            start = time.perf_counter()
            hit = session.generate(**kwargs)
            hit_runs.append((time.perf_counter() - start) * 1e3)
            assert hit.stats["prompt_cache"]["misses"] == 0
            session.clear_prompt_cache()
            start = time.perf_counter()
            miss = session.generate(**kwargs)
            miss_runs.append((time.perf_counter() - start) * 1e3)
            assert miss.stats["prompt_cache"]["hits"] == 0
        session.close()
    print("(diffusers' tokenize: encode_prompt less its encoders' forwards; its total also has the scheduler and postprocess)")
    hit_ms, miss_ms = statistics.median(hit_runs), statistics.median(miss_runs)
    print(f"prompt cache: hit {hit_ms:.1f} ms vs miss {miss_ms:.1f} ms per generate: hit/miss {hit_ms / miss_ms:.3f} "
          f"(encode part of a miss: {a['tokenize'] + a['clip_l'] + a['clip_g'] + a['t5']:.1f} ms)")


def bench_toy(work: Path, args) -> None:
    """The trained toy pipeline (models/): the student's 1.x program (2 steps, blocks 1-3 skipped after step 1, no CFG)
    against diffusers' 2 plain steps, and 28 steps with CFG 4 both ways; diffusers' pipeline is models/toy-pipeline with
    the student's transformer weights (its compensation MLPs are the engine's alone)."""
    from slimengine.export.checkpoint import load_checkpoint

    student, full = work / "toy-1x.engine", work / "toy-28.engine"
    if not (student / "manifest.json").exists():
        cli("slimengine.export.cli", str(TOY), "--pipeline", str(TOY_PIPELINE), "-o", str(student), "-q")
    if not (full / "manifest.json").exists():
        cli("slimengine.export.cli", str(TOY), "--pipeline", str(TOY_PIPELINE), "-o", str(full), "-q", "--skip-blocks", "none",
            "--steps", "28", "--guidance-scale", "4")
    checkpoint = load_checkpoint(TOY)
    t5_length = checkpoint.metadata["pipeline"]["max_sequence_length"]
    pipe, watch = diffusers_pipeline(TOY_PIPELINE, transformer=checkpoint.build_model().transformer.eval())
    noise = np.random.default_rng(0).standard_normal((1, 16, 16, 16)).astype(np.float32)
    cases = [("1.x program (engine: 2 steps, blocks 1-3 skipped at step 2, NFE 1.5; diffusers: 2 plain steps), no CFG", student,
              Case(TOY_PROMPT, noise, 2, 1.0, t5_length, None, None, factor=2)),
             ("28 steps, CFG 4 (batch 2 per step), every block", full, Case(TOY_PROMPT, noise, 28, 4.0, t5_length, 28, "none", factor=2))]
    for title, bundle, case in cases:
        with se.Engine(bundle, intra_op_threads=args.threads) as engine:
            session = engine.session()
            compare(f"toy pipeline (trained, models/), \"{TOY_PROMPT}\", 32x32 px, T5 length {t5_length}: {title}", session, pipe, watch,
                    case, args)
            session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="steps of the small preset's run (default 4)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads and torch threads (default 2)")
    parser.add_argument("--only", choices=("small", "toy"), help="run one of the two pipelines (default both)")
    parser.add_argument("--workdir", type=Path, help="keep the pipeline folder and bundles here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"prompt -> image, CPU; {args.threads} threads each (ONNX Runtime intra-op, torch.set_num_threads); median of {args.iters} "
          f"after {args.warmup} warm-up, one block each; slimengine {se.version()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="bench-prompt-") as tmp:
        work = args.workdir or Path(tmp)
        if args.only in (None, "small"):
            bench_small(work, args)
        if args.only in (None, "toy"):
            bench_toy(work, args)


if __name__ == "__main__":
    main()
