"""Benchmark of the spine (issue #2), on this CPU machine, in one run:

1. runtime `generate` vs the PyTorch reference sampler on the same small 1.x-Distill checkpoint
   (4 layers, 8 heads x 32, 64x64 latent, 77 text tokens): ratio, goal >= 1.0x;
2. runtime overhead per stage call above ONNX Runtime's own Run time: goal <= 50 us;
3. once: export time and peak RAM of the full SD3-Medium configuration in fp16 with random
   weights: goal < 10 GiB (skip with --skip-sd3-medium; needs ~13 GB of disk).

    python benchmarks/bench_spine.py [--iters 20] [--skip-sd3-medium] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import cli, median_ms

import slimengine as se
from slimengine.export.checkpoint import load_checkpoint
from slimengine.export.reference_sampler import reference_generate
from slimengine.export.sampling_plan import make_plan
from slimengine.noise import gaussian_noise


def bench_small(workdir: Path, iters: int) -> None:
    ckpt, bundle = workdir / "sd3-small.pt", workdir / "sd3-small.engine"
    cli("slimengine.tools.make_sd3_checkpoint", "--preset", "small", "-o", str(ckpt))
    cli("slimengine.export.cli", str(ckpt), "-o", str(bundle), "-q", "--force")
    checkpoint = load_checkpoint(ckpt)
    model = checkpoint.build_model()
    plan = make_plan(model.num_layers, checkpoint.has_compensation, checkpoint.metadata)
    c = model.config
    rng = np.random.default_rng(0)
    text = rng.standard_normal((1, 77, c.joint_attention_dim), dtype=np.float32)
    pooled = rng.standard_normal((1, c.pooled_projection_dim), dtype=np.float32)
    noise = gaussian_noise((1, c.in_channels, 64, 64), 0)

    session = se.open_engine(bundle).session()
    runtime_ms = median_ms(lambda: session.generate(text, pooled, latents=noise), iters)
    stats = session.generate(text, pooled, latents=noise).stats
    t_text, t_pooled, t_noise = torch.from_numpy(text), torch.from_numpy(pooled), torch.from_numpy(noise)
    torch_ms = median_ms(lambda: reference_generate(model, plan, t_text, t_pooled, t_noise), iters)

    overheads = []
    for _ in range(iters):
        s = session.generate(text, pooled, latents=noise).stats
        overheads.append((s["total_ms"] - s["backend_ms"]) * 1e3 / s["stage_calls"])
    overhead_us = statistics.median(overheads)
    print(f"small SD3 (4 layers, 8x32 heads, 64x64 latent, 77 tokens), 1.x plan: effective NFE {stats['effective_nfe']:.2f}, "
          f"{stats['stage_calls']} stage calls, torch threads {torch.get_num_threads()}")
    print(f"  runtime generate          {runtime_ms:8.2f} ms (median of {iters})")
    print(f"  PyTorch reference sampler {torch_ms:8.2f} ms")
    print(f"  speed-up vs PyTorch: {torch_ms / runtime_ms:.2f}x (goal >= 1.0x)")
    print(f"  runtime overhead per stage call above ONNX Runtime Run: {overhead_us:.1f} us (goal <= 50 us; "
          f"{overhead_us / 50:.2f}x of the budget)")


def bench_sd3_medium_export(workdir: Path) -> None:
    ckpt, bundle = workdir / "sd3-medium-fp16.safetensors", workdir / "sd3-medium-fp16.engine"
    if not ckpt.exists():
        cli("slimengine.tools.make_sd3_checkpoint", "--preset", "sd3-medium", "--dtype", "fp16", "-o", str(ckpt))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "slimengine.export.cli", str(ckpt), "-o", str(bundle), "--precision", "fp16",
                             "-q", "--force"], stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"SD3-Medium export failed:\n{stderr}")
    peak_gib = usage.ru_maxrss * 1024 / 2**30  # ru_maxrss is in KiB on Linux
    size_gb = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 1e9
    print(f"SD3-Medium (24 layers, 2.03 B params) fp16 export: {seconds:.1f} s, peak RAM {peak_gib:.2f} GiB "
          f"(goal < 10 GiB: {peak_gib / 10:.2f}x of the budget), bundle {size_gb:.2f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--skip-sd3-medium", action="store_true")
    parser.add_argument("--workdir", type=Path, help="keep checkpoints and bundles here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"machine: {os.cpu_count()} CPUs, slimengine {se.version()}, torch {torch.__version__}")
        bench_small(workdir, args.iters)
        if not args.skip_sd3_medium:
            bench_sd3_medium_export(workdir)


if __name__ == "__main__":
    main()
