"""Benchmark of what X-Slim offers so far (issue #3, step level), on the trained toy model, in one run:
for each step-cache threshold vs full computation of the 28-step CFG plan: wall-clock speed-up through
the runtime, effective NFE and PSNR of the final latents; and the 1.x program alone vs the 28-step CFG
baseline on the same model.

    python benchmarks/bench_xslim.py [--iters 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import cli, median_ms

import slimengine as se
from slimengine.tools import toy_shapes
from slimengine.tools.toy_demo import class_grid

TOY = Path(__file__).resolve().parents[1] / "models" / "toy-sd3.safetensors"


def psnr(a, b) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)  # latents span [-1, 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        full_bundle, student_bundle = work / "toy-28.engine", work / "toy-1x.engine"
        cli("slimengine.export.cli", str(TOY), "-o", str(full_bundle), "-q", "--force", "--cache-blocks", "none", "--steps", "28",
            "--guidance-scale", "4")
        cli("slimengine.export.cli", str(TOY), "-o", str(student_bundle), "-q", "--force")
        text, pooled = toy_shapes.prompt_embeds(*class_grid())
        kwargs = dict(negative_prompt_embeds=np.zeros_like(text), negative_pooled_embeds=np.zeros_like(pooled), seed=0, height=16, width=16)

        session = se.open_engine(full_bundle).session()
        full = session.generate(text, pooled, step_cache_threshold=0, **kwargs)
        full_ms = median_ms(lambda: session.generate(text, pooled, step_cache_threshold=0, **kwargs), args.iters)
        print(f"toy SD3 (6 blocks, 96 wide), batch 18 at 32x32 px, 28 steps x CFG 4: full computation {full_ms:.1f} ms, NFE 56")
        print(f"{'policy':<22}{'speed-up':>10}{'NFE':>8}{'PSNR dB':>10}")
        for threshold in (0.02, 0.05, 0.1, 0.2, 0.5):
            r = session.generate(text, pooled, step_cache_threshold=threshold, **kwargs)
            ms = median_ms(lambda t=threshold: session.generate(text, pooled, step_cache_threshold=t, **kwargs), args.iters)
            print(f"{'xslim step=' + str(threshold):<22}{full_ms / ms:>9.2f}x{r.stats['effective_nfe']:>8.0f}"
                  f"{psnr(r.latents, full.latents):>10.1f}")
        student = se.open_engine(student_bundle).session()
        r = student.generate(text, pooled, **kwargs)
        ms = median_ms(lambda: student.generate(text, pooled, **kwargs), args.iters)
        print(f"{'1.x program (2 steps)':<22}{full_ms / ms:>9.2f}x{r.stats['effective_nfe']:>8.2f}"
              f"{psnr(r.latents, full.latents):>10.1f}   (NFE ratio {56 / r.stats['effective_nfe']:.1f}x)")


if __name__ == "__main__":
    main()
