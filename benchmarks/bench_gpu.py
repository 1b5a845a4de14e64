"""The Python half of benchmarks/gpu_check.sh (issue #6): checks and timings that need the CUDA provider.

Each subcommand writes one JSON file and exits 0 when its checks passed (1 when one failed, 2 on a
usage or set-up error), so the shell script can run each part under its own timeout:

    op-models DIR                       tiny ONNX graphs of the ai.slimengine ops (made where onnx is installed)
    ops DIR --ops-lib SO --out J        each op on the CUDA provider vs the CPU provider, and on which provider it ran
    compare BUNDLE... --out J           runtime generate on CUDA vs on the CPU, same bundle and inputs; X-Slim decisions
    sd3m-export WORKDIR                 SD3-Medium config, random fp16 weights, 1.x plan with blocks 8-15 skipped
    sd3m-engine WORKDIR --out J         1 NFE (num_steps=1) and the 1.x program (1.67 NFE) through the runtime on CUDA
    sd3m-torch --mode eager|compile --out J   diffusers' SD3Transformer2DModel, same config, one forward
    report OUTDIR                       every figure of OUTDIR/*.json with its ratio to the baseline of the same run

`--device cpu` on compare and sd3m-engine runs the same code on the CPU provider (a dry run of the
script's logic on a machine without a GPU; its figures mean nothing for the GPU goals).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from common import timings_ms

TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 1e-2}  # relative L2 error, CUDA vs CPU generate
TEXT_LEN = 333  # SD3: 77 CLIP + 256 T5 tokens
SD3M_LATENT = 128  # 1024 x 1024 pixels
SD3M_PROGRAM = ("--steps", "2", "--skip-blocks", "8-15")  # 8 of 24 blocks skipped in step 2: 1.67 NFE
GOAL_1X_MS = {"H200": 25.0, "H100": 30.0}
TOKEN_POLICY = "xslim:step=0,critical=10,refresh=token,ratio=0.5"  # every step after warm-up refreshes tokens


def write(path: str, result: dict) -> None:
    Path(path).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def relative_error(got, expected) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30))


# ---- custom ops ----

OPS = {  # op: (inputs as (name, dtype, shape), outputs as (name, dtype))
    "TokenChangeScore": ([("r_last", "f", (2, 300, 64)), ("r_prev", "f", (2, 300, 64))], [("score", "f")]),
    "GatherTokens": ([("x", "f", (2, 300, 64)), ("idx", "i", (2, 120))], [("out", "f")]),
    "ScatterTokens": ([("cache", "f", (2, 300, 64)), ("idx", "i", (2, 120)), ("values", "f", (2, 120, 64))], [("out", "f")]),
}


def op_models(directory: str) -> int:
    from onnx import TensorProto, helper, save

    types = {"f": TensorProto.FLOAT, "i": TensorProto.INT64}
    Path(directory).mkdir(parents=True, exist_ok=True)
    for op, (inputs, outputs) in OPS.items():
        node = helper.make_node(op, [n for n, _, _ in inputs], [n for n, _ in outputs], domain="ai.slimengine")
        graph = helper.make_graph([node], op, [helper.make_tensor_value_info(n, types[t], list(s)) for n, t, s in inputs],
                                  [helper.make_tensor_value_info(n, types[t], None) for n, t in outputs])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("ai.slimengine", 1)])
        save(model, str(Path(directory) / f"{op}.onnx"))
    return 0


def providers_of(session, op: str) -> set[str]:
    """The execution providers that ran `op`'s node, from ONNX Runtime's profile."""
    events = json.loads(Path(session.end_profiling()).read_text())
    return {e["args"]["provider"] for e in events
            if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == op and "provider" in e.get("args", {})}


def check_ops(directory: str, ops_lib: str, out: str) -> int:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"FAIL: this onnxruntime ({ort.__file__}) has no CUDAExecutionProvider: {ort.get_available_providers()}")
        return 1
    ort.preload_dlls()
    rng = np.random.default_rng()  # fresh inputs every run
    results, ok = {}, True
    for op, (inputs, _) in OPS.items():
        feeds = {}
        for name, t, shape in inputs:
            if t == "f":
                feeds[name] = rng.standard_normal(shape, dtype=np.float32)
            else:  # distinct ascending indices per batch element, as SelectTokens gives them
                feeds[name] = np.stack([np.sort(rng.choice(300, shape[1], replace=False)) for _ in range(shape[0])]).astype(np.int64)
        outputs = {}
        for provider in ("CPUExecutionProvider", "CUDAExecutionProvider"):
            options = ort.SessionOptions()
            options.register_custom_ops_library(ops_lib)
            options.enable_profiling = True
            options.profile_file_prefix = f"/tmp/slim_ops_{op}_{provider}"
            session = ort.InferenceSession(str(Path(directory) / f"{op}.onnx"), options, providers=[provider])
            outputs[provider] = session.run(None, feeds)[0]
            ran_on = providers_of(session, op)
            results.setdefault(op, {})[f"{provider} ran on"] = sorted(ran_on)
        on_cuda = results[op]["CUDAExecutionProvider ran on"] == ["CUDAExecutionProvider"]
        err = float(np.max(np.abs(outputs["CUDAExecutionProvider"] - outputs["CPUExecutionProvider"])))
        tol = 1e-5 * float(np.max(np.abs(outputs["CPUExecutionProvider"]))) if op == "TokenChangeScore" else 0.0
        passed = on_cuda and err <= tol and np.all(np.isfinite(outputs["CUDAExecutionProvider"]))
        results[op].update(max_abs_err=err, tolerance=tol, ran_on_cuda=on_cuda, passed=bool(passed))
        ok = ok and passed
        print(f"{'PASS' if passed else 'FAIL'} {op}: CUDA vs CPU max |err| {err:.3g} (tol {tol:.3g}), node on CUDA: {on_cuda}")
    write(out, {"part": "ops", "passed": ok, "ops": results})
    return 0 if ok else 1


# ---- runtime generate, CUDA vs CPU ----

def compare(bundles: list[str], device: str, out: str) -> int:
    import slimengine as se

    rng = np.random.default_rng()
    results, ok = [], True
    for path in bundles:
        with se.open_engine(path, device=device) as gpu_engine:
            c, m = gpu_engine.config, gpu_engine.manifest
            precision = m.get("precision", "fp32")
            reference = path
            if precision == "bf16":  # ONNX Runtime's CPU provider has no bf16 Conv/MatMul: the same checkpoint's fp32 bundle
                reference = str(path).replace("bf16", "fp32")
                if reference == str(path) or not Path(reference).exists():
                    raise SystemExit(f"{path}: a bf16 bundle needs its fp32 twin ({reference}) as the CPU reference")
            text = rng.standard_normal((1, 8, c["joint_attention_dim"]), dtype=np.float32)
            pooled = rng.standard_normal((1, c["pooled_projection_dim"]), dtype=np.float32)
            token = any(s["role"] == "block_tokens" for s in m["stages"])
            kwargs = {"seed": int(rng.integers(1 << 31)), "xslim": TOKEN_POLICY if token else None}
            got = gpu_engine.session().generate(text, pooled, **kwargs)
        with se.open_engine(reference) as cpu_engine:
            want = cpu_engine.session().generate(text, pooled, **kwargs)
        err = relative_error(got.latents, want.latents)
        decisions = [[(s["level"], s["blocks_reused"], s["tokens_computed"]) for s in r.stats["per_step"]] for r in (want, got)]
        same_decisions = decisions[0] == decisions[1]
        token_steps = sum(d[0] == "token_refresh" for d in decisions[1])
        passed = err <= TOLERANCE[precision] and bool(np.all(np.isfinite(got.latents))) and same_decisions and (token_steps > 0 or not token)
        ok = ok and passed
        results.append({"bundle": Path(path).name, "cpu_reference": Path(reference).name, "precision": precision, "relative_error": err, "tolerance": TOLERANCE[precision],
                        "x_slim_token_policy": TOKEN_POLICY if token else None, "same_decisions": same_decisions, "token_steps": token_steps,
                        "levels_cpu": [d[0] for d in decisions[0]], "levels_cuda": [d[0] for d in decisions[1]],
                        "ms_cpu": want.stats["total_ms"], "ms_cuda": got.stats["total_ms"], "passed": passed})
        print(f"{'PASS' if passed else 'FAIL'} {Path(path).name} ({precision}): {device} vs CPU relative error {err:.2e} "
              f"(tol {TOLERANCE[precision]:.0e}); X-Slim decisions identical: {same_decisions}"
              + (f", token-level steps: {token_steps} (must be > 0)" if token else ""))
    write(out, {"part": "compare", "device": device, "passed": ok, "bundles": results})
    return 0 if ok else 1


# ---- SD3-Medium ----

def cli(*args: str) -> None:
    import subprocess

    subprocess.run([sys.executable, "-m", *args], check=True)


def sd3m_export(workdir: str, preset: str, layers: int | None) -> int:
    w = Path(workdir)
    w.mkdir(parents=True, exist_ok=True)
    ckpt, bundle = w / "sd3m-fp16.safetensors", w / "sd3m-fp16.engine"
    start = time.perf_counter()
    if not ckpt.exists():
        extra = ("--layers", str(layers)) if layers else ()
        cli("slimengine.tools.make_sd3_checkpoint", "--preset", preset, *extra, "--dtype", "fp16", *SD3M_PROGRAM, "-o", str(ckpt))
    made = time.perf_counter()
    cli("slimengine.export.cli", str(ckpt), "-o", str(bundle), "--precision", "fp16", "--guidance-scale", "1", "--force", "-q")
    print(f"SD3-Medium fp16: checkpoint {made - start:.0f} s, export {time.perf_counter() - made:.0f} s -> {bundle}")
    return 0


def sd3m_engine(workdir: str, device: str, out: str, iters: int, latent: int) -> int:
    import slimengine as se

    bundle = Path(workdir) / "sd3m-fp16.engine"
    start = time.perf_counter()
    engine = se.open_engine(bundle, device=device, verify="fast")  # hashing 4 GB is not what is timed here
    load_s = time.perf_counter() - start
    session = engine.session()
    c = engine.config
    rng = np.random.default_rng(0)
    text = rng.standard_normal((1, TEXT_LEN, c["joint_attention_dim"]), dtype=np.float32)
    pooled = rng.standard_normal((1, c["pooled_projection_dim"]), dtype=np.float32)
    size = dict(height=latent, width=latent, guidance_scale=1.0)
    result = {"part": "sd3m-engine", "device": device, "latent": latent, "layers": c["num_layers"], "engine_load_s": load_s, "precision": engine.manifest.get("precision")}
    for name, kwargs in [("one_nfe", {"num_steps": 1}), ("program_1x", {})]:
        stats = {}

        def run(kwargs=kwargs, stats=stats, name=name):
            r = session.generate(text, pooled, seed=1, **size, **kwargs)
            if not np.all(np.isfinite(r.latents)):
                raise SystemExit(f"{name}: non-finite latents")
            stats.update(r.stats)

        times = timings_ms(run, iters, warmup=2)
        ms = statistics.median(times)
        per_stage = sorted(stats["per_stage"].items(), key=lambda kv: -kv[1]["ms"])[:4]
        result[name] = {"median_ms": ms, "times_ms": times, "effective_nfe": stats["effective_nfe"], "backend_ms": stats["backend_ms"],
                        "runtime_total_ms": stats["total_ms"], "slowest_stages": dict(per_stage)}
        print(f"engine {name}: {ms:.1f} ms median over {iters} (NFE {stats['effective_nfe']:.2f}; inside ONNX Runtime "
              f"{stats['backend_ms']:.1f} ms of {stats['total_ms']:.1f} ms)")
    engine.close()
    write(out, result)
    return 0


def sd3m_torch(mode: str, out: str, iters: int, dtype_name: str) -> int:
    import torch
    from diffusers import SD3Transformer2DModel

    from slimengine.tools.make_sd3_checkpoint import COMMON, PRESETS

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = SD3Transformer2DModel(sample_size=SD3M_LATENT, **COMMON, **PRESETS["sd3-medium"]).to(dtype).eval()
        x = torch.randn(1, 16, SD3M_LATENT, SD3M_LATENT, dtype=dtype)
        text = torch.randn(1, TEXT_LEN, 4096, dtype=dtype)
        pooled = torch.randn(1, 2048, dtype=dtype)
        t = torch.full((1,), 500.0, dtype=dtype)
    fn = model if mode == "eager" else torch.compile(model)

    def forward():
        with torch.inference_mode():
            fn(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t, return_dict=False)
        torch.cuda.synchronize()

    start = time.perf_counter()
    forward()  # for compile: the compilation
    first_s = time.perf_counter() - start
    times = timings_ms(forward, iters, warmup=3)
    ms = statistics.median(times)
    result = {"part": f"sd3m-torch-{mode}", "dtype": dtype_name, "median_ms": ms, "times_ms": times, "first_call_s": first_s,
              "torch": torch.__version__, "device": torch.cuda.get_device_name()}
    print(f"torch {mode} SD3-Medium {dtype_name} 1024x1024 batch 1: {ms:.2f} ms median (first call {first_s:.1f} s)")
    write(out, result)
    return 0


# ---- report ----

def report(outdir: str) -> int:
    d = Path(outdir)
    load = {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json")) if p.stem != "summary"}
    card = (d / "card.txt").read_text().strip() if (d / "card.txt").exists() else "unknown card"
    lines, summary = [f"card: {card}"], {"card": card}
    if "kernels" in load:
        k = load["kernels"]
        lines.append(f"kernels vs CPU: {'PASS' if k['failures'] == 0 else 'FAIL'} ({len(k['checks'])} checks, {k['failures']} failed)")
        for b in k["bandwidth"]:
            goal = ("goal >= 0.80 " + ("met" if b["ratio"] >= 0.8 else "NOT met")) if b["memory_bound"] else "compute-bound, no goal"
            lines.append(f"  {b['kernel']:<34} {b['us']:8.1f} us  {b['gb_s']:7.0f} GB/s = {b['ratio']:.2f} x copy ({goal})")
        summary["kernels"] = {"failures": k["failures"], "bandwidth_ratio": {b["kernel"]: b["ratio"] for b in k["bandwidth"]}}
    for part in ("ops", "compare"):
        if part in load:
            lines.append(f"{part}: {'PASS' if load[part]['passed'] else 'FAIL'}")
            summary[part] = load[part]["passed"]
    if "compare" in load:
        for b in load["compare"]["bundles"]:
            lines.append(f"  {b['bundle']:<24} {b['precision']} rel err {b['relative_error']:.2e} (tol {b['tolerance']:.0e}), "
                         f"X-Slim decisions identical: {b['same_decisions']}")
    eng, eager, comp = load.get("sd3m_engine"), load.get("sd3m_torch_eager"), load.get("sd3m_torch_compile")
    if eng:
        one, prog = eng["one_nfe"]["median_ms"], eng["program_1x"]["median_ms"]
        lines.append(f"SD3-M engine ({eng['precision']}, {eng['device']}, {eng['layers']} blocks, latent {eng['latent']}): 1 NFE {one:.1f} ms; 1.x program "
                     f"(NFE {eng['program_1x']['effective_nfe']:.2f}) {prog:.1f} ms; load {eng['engine_load_s']:.0f} s")
        summary["engine_1nfe_ms"], summary["engine_1x_ms"] = one, prog
        goal = next((v for k, v in GOAL_1X_MS.items() if k in card), None)
        if goal:
            lines.append(f"  1.x goal <= {goal:.0f} ms on this card: {'met' if prog <= goal else 'NOT met'} ({prog / goal:.2f} x goal)")
        for name, base in [("eager", eager), ("compile", comp)]:
            if base:
                ratio = one / base["median_ms"]
                lines.append(f"  1 NFE engine / torch {name} ({base['dtype']}, {base['median_ms']:.2f} ms) = {ratio:.2f}"
                             + (f" (goal <= 1.00 {'met' if ratio <= 1 else 'NOT met'})" if name == "compile" else ""))
                summary[f"engine_vs_torch_{name}"] = ratio
    for name, base in [("eager", eager), ("compile", comp)]:
        if base:
            lines.append(f"torch {name} SD3-M: {base['median_ms']:.2f} ms (first call {base['first_call_s']:.1f} s)")
            summary[f"torch_{name}_ms"] = base["median_ms"]
    print("\n".join(lines))
    (d / "summary.txt").write_text("\n".join(lines) + "\n")
    (d / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("op-models")
    p.add_argument("dir")
    p = sub.add_parser("ops")
    p.add_argument("dir")
    p.add_argument("--ops-lib", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("compare")
    p.add_argument("bundles", nargs="+")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--out", required=True)
    p = sub.add_parser("sd3m-export")
    p.add_argument("workdir")
    p.add_argument("--preset", default="sd3-medium", help="another preset only for a dry run of the script")
    p.add_argument("--layers", type=int, help="override the preset's joint blocks (dry runs)")
    p = sub.add_parser("sd3m-engine")
    p.add_argument("workdir")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--latent", type=int, default=SD3M_LATENT, help="latent size (128: 1024 x 1024 pixels)")
    p.add_argument("--out", required=True)
    p = sub.add_parser("sd3m-torch")
    p.add_argument("--mode", choices=["eager", "compile"], required=True)
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", required=True)
    p = sub.add_parser("report")
    p.add_argument("outdir")
    a = parser.parse_args(argv)
    if a.command == "op-models":
        return op_models(a.dir)
    if a.command == "ops":
        return check_ops(a.dir, a.ops_lib, a.out)
    if a.command == "compare":
        return compare(a.bundles, a.device, a.out)
    if a.command == "sd3m-export":
        return sd3m_export(a.workdir, a.preset, a.layers)
    if a.command == "sd3m-engine":
        return sd3m_engine(a.workdir, a.device, a.out, a.iters, a.latent)
    if a.command == "sd3m-torch":
        return sd3m_torch(a.mode, a.out, a.iters, a.dtype)
    return report(a.outdir)


if __name__ == "__main__":
    sys.exit(main())
