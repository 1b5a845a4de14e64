"""Open time of an SD3-Medium fp16 bundle (random weights): the default (fast) check against the full sha256
of every file, which is what every open did before bundle format 2 (issue 11), in one run. Then, each in a fresh
process, the engine's open (every file read into memory at open: issue 20) against ONNX Runtime's plain file load
of the same stage graphs (what the engine did before: ONNX Runtime maps the weight files), open time and RSS.

    python benchmarks/bench_open.py [--iters 2] [--workdir DIR] [--bundle NAME.engine]

Without --bundle it first exports the full SD3-Medium configuration in fp16 (about 85 s, 8.2 GiB RAM, 4.2 GB
of disk) into --workdir (default: a temporary folder under /tmp, removed afterwards). Timings are with the
bundle in the page cache (it was just written or read), the runs of each kind interleaved.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cli

import slimengine as se


def export_sd3_medium(workdir: Path) -> Path:
    ckpt, bundle = workdir / "sd3-medium-fp16.safetensors", workdir / "sd3-medium-fp16.engine"
    cli("slimengine.tools.make_sd3_checkpoint", "--preset", "sd3-medium", "--dtype", "fp16", "-o", str(ckpt))
    start = time.perf_counter()
    cli("slimengine.export.cli", str(ckpt), "-o", str(bundle), "--precision", "fp16", "-q", "--force")
    print(f"exported SD3-Medium fp16 in {time.perf_counter() - start:.1f} s")
    ckpt.unlink()  # 4 GB the benchmark no longer needs
    return bundle


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def open_and_close(bundle: Path, verify: str) -> None:
    se.open_engine(bundle, verify=verify).close()
    gc.collect()


# Run in a fresh process (RSS is per process): open the bundle one way, print open seconds and /proc/self/status figures.
_OPEN_IN_CHILD = """
import json, sys, time
import slimengine as se
bundle, how = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if how == "engine":
    keep = se.open_engine(bundle)
else:  # ONNX Runtime's plain file load of every stage graph, as the engine's sessions are made
    import onnxruntime as ort
    manifest = json.load(open(bundle + "/manifest.json"))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    keep = [ort.InferenceSession(bundle + "/" + s["file"], options, providers=["CPUExecutionProvider"]) for s in manifest["stages"]]
seconds = time.perf_counter() - start
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
kib = {k: int(status[k].split()[0]) for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
print(json.dumps({"seconds": seconds, **{k: v / 2**20 for k, v in kib.items()}}))
"""


def open_in_child(bundle: Path, how: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _OPEN_IN_CHILD, str(bundle), how], check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.splitlines()[-1])


def compare_memory(bundle: Path, iters: int) -> None:
    """The engine's in-memory open against ONNX Runtime's file load (the old open), interleaved, medians."""
    runs = {"engine": [], "ort": []}
    for _ in range(iters):
        for how in runs:
            runs[how].append(open_in_child(bundle, how))
    median = {how: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for how, rs in runs.items()}
    names = {"engine": "open_engine (weights read into memory)", "ort": "ONNX Runtime file load (the old open)"}
    print(f"fresh process per open, medians of {iters}; RSS in GiB (anon: the process's own memory; file: mapped file pages)")
    for how, m in median.items():
        print(f"  {names[how]:40s} {m['seconds']:7.2f} s  RSS {m['VmRSS']:5.2f} (anon {m['RssAnon']:5.2f}, file {m['RssFile']:5.2f}), "
              f"peak {m['VmHWM']:5.2f}")
    e, o = median["engine"], median["ort"]
    print(f"  engine / old: open time {e['seconds'] / o['seconds']:.2f}x, RSS {e['VmRSS'] / o['VmRSS']:.2f}x, "
          f"peak RSS {e['VmHWM'] / o['VmHWM']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="export here and keep the bundle (default: a temporary folder, removed)")
    parser.add_argument("--bundle", type=Path, help="time this bundle instead of exporting one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        bundle = args.bundle or export_sd3_medium(workdir)
        files = [p for p in bundle.rglob("*") if p.is_file()]
        graphs = [p for p in files if p.suffix == ".onnx"]
        print(f"machine: {os.cpu_count()} CPUs, slimengine {se.version()}, Python {sys.version.split()[0]}")
        print(f"bundle {bundle.name}: {len(files)} files, {sum(p.stat().st_size for p in files) / 1e9:.2f} GB "
              f"({len(graphs)} stage graphs, {sum(p.stat().st_size for p in graphs) / 1e6:.1f} MB of them)")
        se.verify_bundle(bundle, verify="full")  # warm the page cache, so every run below reads from memory
        runs = {"check fast": [], "check full": [], "open fast (default)": [], "open full (= the old open)": []}
        for _ in range(args.iters):
            runs["check fast"].append(timed(lambda: se.verify_bundle(bundle, verify="fast")))
            runs["check full"].append(timed(lambda: se.verify_bundle(bundle, verify="full")))
            runs["open fast (default)"].append(timed(lambda: open_and_close(bundle, "fast")))
            runs["open full (= the old open)"].append(timed(lambda: open_and_close(bundle, "full")))
        median = {name: statistics.median(times) for name, times in runs.items()}
        for name, m in median.items():
            print(f"  {name:28s} {m:8.2f} s  (median of {args.iters}: {', '.join(f'{t:.2f}' for t in runs[name])})")
        print(f"  open: full / fast = {median['open full (= the old open)'] / median['open fast (default)']:.2f}x; "
              f"the fast open saves {median['open full (= the old open)'] - median['open fast (default)']:.1f} s")
        print(f"  check alone: full / fast = {median['check full'] / median['check fast']:.0f}x")
        compare_memory(bundle, args.iters)


if __name__ == "__main__":
    main()
