"""Benchmark of int8 engines (`export-engine --precision int8`, issue #22), one run, every row printed:

1. One NFE of the small preset (4 layers, 8x32 heads, 64x64 latent, 77 text tokens, batch 1; random seeded weights):
   the int8 engine against the fp32 engine (goal >= 1.6x), OpenVINO f32, OpenVINO with NNCF 8-bit weights
   (`nncf.compress_weights`) and OpenVINO with NNCF 8-bit weights and activations (`nncf.quantize`, transformer
   scheme, calibrated on the same embeddings), all on the same weights and threads, interleaved, medians. The engine
   runs a whole one-step generate (its stage calls and Euler update); OpenVINO runs one forward of the same transformer
   (diffusers' math, converted by `ov.convert_model`) with the f32 inference-precision hint.
2. The toy pipeline in int8 through the engine, the 18 class prompts at seeds 0-2: the classifier's counts for the
   28-step CFG teacher (goal >= 17/18 colours and shapes) and the 1.x student (goal: within 1 of the fp32 bundle's),
   and PSNR of every int8 picture against the fp32 bundle's (goal >= 28 dB; median and worst).
3. Bundle size on disk and open time, int8 vs fp32 (the toy student and the small preset).
4. LEMUR towers in int8 (the "small" preset, random seeded weights): documents/s of `embed` (batch 64, 128 tokens,
   4 frames of 32x32) through the int8 engine vs the fp32 engine and PyTorch eager (same threads, interleaved,
   medians), and the worst cosine of the int8 engine's embeddings against PyTorch float32 on 256 documents
   (goal >= 0.995); bundle size and open time.

    pip install -e ".[bench-int8]"   # OpenVINO and NNCF, for the baselines of part 1
    python benchmarks/bench_int8.py [--repeats 9] [--threads 2] [--skip-openvino] [--parts 1,2,4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import cli

import slimengine as se
from slimengine.tools.toy_demo import generate_classes, score

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
PIPELINE = MODELS / "toy-pipeline"


def export(checkpoint: Path, out: Path, *flags: str) -> Path:
    cli("slimengine.export.cli", str(checkpoint), "-o", str(out), "-q", "--force", *flags)
    return out


def bundle_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())


def open_ms(bundle: Path, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with se.open_engine(bundle):
            pass
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def calibration_embeddings(path: Path, config, prompts: int = 4, text: int = 77) -> Path:
    """Seeded random conditioning in the shapes the transformer takes (the small preset has no text encoders)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"prompt_embeds": torch.randn(prompts, text, config.joint_attention_dim, generator=g),
               "pooled_prompt_embeds": torch.randn(prompts, config.pooled_projection_dim, generator=g),
               "negative_prompt_embeds": torch.randn(1, text, config.joint_attention_dim, generator=g),
               "negative_pooled_prompt_embeds": torch.randn(1, config.pooled_projection_dim, generator=g)}, str(path))
    return path


def openvino_models(checkpoint_path: Path, inputs: dict, calib: Path, threads: int) -> dict:
    """name -> a callable running one forward of the transformer in OpenVINO (f32 hint, `threads` threads)."""
    import nncf
    import openvino as ov
    import torch
    from safetensors.torch import load_file

    from slimengine.export.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint_path).build_model(torch.float32).eval()

    class Forward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, latents, timestep, pooled, text):
            return self.model.forward_full(latents, timestep, pooled, text)

    example = tuple(torch.from_numpy(inputs[k]) for k in ("latents", "timestep", "pooled", "text"))
    with torch.no_grad():
        ov_model = ov.convert_model(Forward(), example_input=example)
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    t = load_file(str(calib))
    calib_items = [{"latents": np.random.default_rng(i).standard_normal(inputs["latents"].shape).astype(np.float32),
                    "timestep": np.array([1000.0 * (1 - i / 8)], np.float32), "pooled": t["pooled_prompt_embeds"][i % 4:i % 4 + 1].numpy(),
                    "text": t["prompt_embeds"][i % 4:i % 4 + 1].numpy()} for i in range(8)]
    names = [p.get_any_name() for p in ov_model.inputs]
    dataset = nncf.Dataset(calib_items, lambda item: tuple(item[k] for k in ("latents", "timestep", "pooled", "text")))
    variants = {
        "OpenVINO f32": ov_model,
        "OpenVINO NNCF int8 weights": nncf.compress_weights(ov_model.clone()),
        "OpenVINO NNCF int8 weights+activations": nncf.quantize(ov_model.clone(), dataset, model_type=nncf.ModelType.TRANSFORMER,
                                                                subset_size=len(calib_items)),
    }
    feed = [inputs[k] for k in ("latents", "timestep", "pooled", "text")]
    out = {}
    for name, m in variants.items():
        compiled = core.compile_model(m, "CPU", config)
        request = compiled.create_infer_request()
        out[name] = (lambda r=request: r.infer(dict(zip(names, feed))))
    return out


def nfe_speed(tmp: Path, repeats: int, threads: int, openvino: bool) -> dict:
    checkpoint = tmp / "small.safetensors"
    cli("slimengine.tools.make_sd3_checkpoint", "--preset", "small", "--plain", "-o", str(checkpoint), "--seed", "0")
    from slimengine.export.checkpoint import load_checkpoint

    config = load_checkpoint(checkpoint).config
    calib = calibration_embeddings(tmp / "calib.safetensors", config)
    fp32 = export(checkpoint, tmp / "small-fp32.engine")
    start = time.perf_counter()
    int8 = export(checkpoint, tmp / "small-int8.engine", "--precision", "int8", "--calibrate", str(calib))
    int8_export_s = time.perf_counter() - start
    rng = np.random.default_rng(1)
    inputs = {"latents": rng.standard_normal((1, config.in_channels, 64, 64)).astype(np.float32),
              "timestep": np.array([1000.0], np.float32),
              "pooled": rng.standard_normal((1, config.pooled_projection_dim)).astype(np.float32),
              "text": rng.standard_normal((1, 77, config.joint_attention_dim)).astype(np.float32)}
    runners, closers = {}, []
    for name, bundle in (("engine fp32", fp32), ("engine int8", int8)):
        engine = se.open_engine(bundle, intra_op_threads=threads)
        session = engine.session()
        closers += [session.close, engine.close]
        runners[name] = (lambda s=session: s.generate(inputs["text"], inputs["pooled"], latents=inputs["latents"], num_steps=1,
                                                      guidance_scale=1.0))
    with se.open_engine(fp32) as e1, e1.session() as s1, se.open_engine(int8) as e2, e2.session() as s2:
        a = s1.generate(inputs["text"], inputs["pooled"], latents=inputs["latents"], num_steps=1, guidance_scale=1.0).latents
        b = s2.generate(inputs["text"], inputs["pooled"], latents=inputs["latents"], num_steps=1, guidance_scale=1.0).latents
        nfe_error = float(np.linalg.norm(np.asarray(b) - np.asarray(a)) / np.linalg.norm(np.asarray(a) - inputs["latents"]))
    if openvino:
        runners.update(openvino_models(checkpoint, inputs, calib, threads))
    times = {name: [] for name in runners}
    for fn in runners.values():  # warm-up
        fn(), fn()
    for _ in range(repeats):  # interleaved: every variant once per round
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    for close in closers:
        close()
    return {"ms": {k: statistics.median(v) for k, v in times.items()}, "int8_export_s": int8_export_s,
            "nfe_error": nfe_error, "bundles": {"fp32": fp32, "int8": int8}}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def toy_quality(tmp: Path, seeds: int) -> dict:
    prompts = MODELS / "toy-prompts.txt"  # calibration: the training prompts; drawn below: the held-out template, other noise
    rows = {}
    for name, checkpoint in (("teacher 28 steps CFG", MODELS / "toy-sd3-teacher.safetensors"), ("student 1.x", MODELS / "toy-sd3.safetensors")):
        flags = ("--pipeline", str(PIPELINE)) + (("--skip-blocks", "none") if "teacher" in name else ())
        slug = name.split()[0]
        fp32 = export(checkpoint, tmp / f"toy-{slug}-fp32.engine", *flags)
        int8 = export(checkpoint, tmp / f"toy-{slug}-int8.engine", *flags, "--precision", "int8", "--calibrate", str(prompts))
        images = {}
        for precision, bundle in (("fp32", fp32), ("int8", int8)):
            with se.open_engine(bundle) as engine, engine.session() as session:
                images[precision] = [generate_classes(session, seed)[0] for seed in range(seeds)]
        counts = {p: [score(imgs) for imgs in images[p]] for p in images}
        psnrs = [psnr(a, b) for s in range(seeds) for a, b in zip(images["int8"][s], images["fp32"][s])]
        rows[name] = {"counts": counts, "psnr_median": float(np.median(psnrs)), "psnr_worst": float(np.min(psnrs)),
                      "bytes": {"fp32": bundle_bytes(fp32), "int8": bundle_bytes(int8)},
                      "open_ms": {"fp32": open_ms(fp32), "int8": open_ms(int8)}}
    return rows


def lemur_speed(tmp: Path, repeats: int, threads: int) -> dict:
    """Part 4: the small LEMUR preset's embed program, int8 and fp32 engines and PyTorch eager."""
    import torch

    from slimengine.export.checkpoint import load_lemur_checkpoint

    checkpoint = tmp / "lemur-small.safetensors"
    cli("slimengine.tools.make_lemur_checkpoint", "--preset", "small", "--seed", "0", "-o", str(checkpoint))
    start = time.perf_counter()
    bundles = {"fp32": export(checkpoint, tmp / "lemur-fp32.engine")}
    bundles["int8"] = export(checkpoint, tmp / "lemur-int8.engine", "--precision", "int8")
    export_s = time.perf_counter() - start
    model = load_lemur_checkpoint(checkpoint).build_model()
    c = model.config
    rng = np.random.default_rng(1)

    def documents(batch: int):
        text_ids = rng.integers(1, c.vocab_size, (batch, 128))
        segment_ids = np.repeat(np.array([0] * 32 + [1] * 32 + [2] * 64)[None], batch, 0)
        return text_ids, segment_ids, rng.standard_normal((batch, 4, 3, c.image_size, c.image_size), dtype=np.float32)

    text_ids, segment_ids, frames = documents(64)
    torch.set_num_threads(threads)
    engines = {p: se.open_engine(b, intra_op_threads=threads) for p, b in bundles.items()}
    sessions = {p: e.session() for p, e in engines.items()}
    calls = {f"engine {p}": (lambda s=s: s.embed(text_ids, frames, segment_ids=segment_ids)) for p, s in sessions.items()}
    t_args = [torch.from_numpy(a) for a in (text_ids, segment_ids, frames)]

    def eager():
        with torch.no_grad():
            model.embed(*t_args)

    calls["PyTorch eager fp32"] = eager
    times = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    docs_per_s = {name: 64 / statistics.median(t) for name, t in times.items()}
    held_out = documents(256)
    with torch.no_grad():
        expected = model.embed(*[torch.from_numpy(a) for a in held_out]).numpy().astype(np.float64)
    got = sessions["int8"].embed(held_out[0], held_out[2], segment_ids=held_out[1]).embeddings.astype(np.float64)
    cosine = float(((got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))).min())
    for s in sessions.values():
        s.close()
    for e in engines.values():
        e.close()
    return {"docs_per_s": docs_per_s, "cosine": cosine, "export_s": export_s, "bundles": bundles}


def nfe_rows(tmp: Path, args) -> None:
    speed = nfe_speed(tmp, args.repeats, args.threads, not args.skip_openvino)
    ms = speed["ms"]
    base = ms["engine fp32"]
    print(f"1. One NFE, small preset (4 layers, 8x32 heads, 64x64 latent, 77 tokens, batch 1), {args.threads} threads, "
          f"median of {args.repeats} interleaved:")
    for name, t in ms.items():
        vs_ov = f", {ms['OpenVINO f32'] / t:.2f}x OpenVINO f32" if "OpenVINO f32" in ms else ""
        print(f"   {name:40s} {t:8.1f} ms   {base / t:.2f}x engine fp32{vs_ov}")
    int8 = ms["engine int8"]
    for name in [n for n in ms if n.startswith("OpenVINO")]:
        print(f"   engine int8 vs {name}: {ms[name] / int8:.2f}x")
    print(f"   int8 one-step latents vs fp32: relative L2 of the update {speed['nfe_error']:.4f}; int8 export took "
          f"{speed['int8_export_s']:.0f} s")
    for precision, bundle in speed["bundles"].items():
        print(f"   small preset {precision}: {bundle_bytes(bundle) / 1e6:.1f} MB on disk, open {open_ms(bundle):.0f} ms")


def toy_rows(tmp: Path, args) -> None:
    print(f"2. Toy pipeline through the engine, 18 class prompts x seeds 0-{args.seeds - 1}:")
    for name, row in toy_quality(tmp, args.seeds).items():
        for precision in ("fp32", "int8"):
            counts = row["counts"][precision]
            print(f"   {name:22s} {precision}: colours {' '.join(str(c) for c, _ in counts)}, shapes "
                  f"{' '.join(str(s) for _, s in counts)} (of 18 per seed)")
        print(f"   {name:22s} PSNR int8 vs fp32: median {row['psnr_median']:.1f} dB, worst {row['psnr_worst']:.1f} dB")
        b, o = row["bytes"], row["open_ms"]
        print(f"   {name:22s} bundle {b['int8'] / 1e6:.2f} MB int8 vs {b['fp32'] / 1e6:.2f} MB fp32 ({b['int8'] / b['fp32']:.2f}x); "
              f"open {o['int8']:.0f} ms vs {o['fp32']:.0f} ms ({o['int8'] / o['fp32']:.2f}x)")


def lemur_rows(tmp: Path, args) -> None:
    row = lemur_speed(tmp, args.repeats, args.threads)
    rate = row["docs_per_s"]
    print(f"4. LEMUR small preset, embed: batch 64, 128 tokens, 4 frames of 32x32, {args.threads} threads, median of "
          f"{args.repeats} interleaved:")
    for name, r in rate.items():
        print(f"   {name:40s} {r:8.0f} documents/s   {r / rate['engine fp32']:.2f}x engine fp32, "
              f"{r / rate['PyTorch eager fp32']:.2f}x PyTorch eager")
    print(f"   engine int8 vs engine fp32: {rate['engine int8'] / rate['engine fp32']:.2f}x; vs PyTorch eager: "
          f"{rate['engine int8'] / rate['PyTorch eager fp32']:.2f}x")
    print(f"   int8 embeddings vs PyTorch float32, 256 documents: worst cosine {row['cosine']:.5f} (goal >= 0.995); exports took "
          f"{row['export_s']:.0f} s")
    for precision, bundle in row["bundles"].items():
        print(f"   LEMUR small {precision}: {bundle_bytes(bundle) / 1e6:.1f} MB on disk, open {open_ms(bundle):.0f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--skip-openvino", action="store_true", help="engine rows only (no OpenVINO/NNCF installed)")
    parser.add_argument("--parts", default="1,2,4", help="which parts to run (default all: 1,2,4; part 3 is printed with 1 and 2)")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",")}
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        tmp = Path(tmp)
        if "1" in parts:
            nfe_rows(tmp, args)
        if "2" in parts:
            toy_rows(tmp, args)
        if "4" in parts:
            lemur_rows(tmp, args)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
