"""Peak memory of exporting a T5-XXL-sized encoder stage (issue #13: within 10 GiB of RAM, like the transformer).

The real T5-XXL encoder config (d_model 4096, d_ff 10240, 24 layers, 64 heads, d_kv 64, vocab 32128, gated-gelu;
4.76 B parameters) with random weights, generated per tensor as it is written (export/t5_export.py random_weights:
no 19 GB source either), exported as the bundle's t5 stage by the same function export-engine uses
(pipeline_export.export_t5: traced from a weightless skeleton, each weight streamed to the external data file).

Peak RSS is the process's high-water mark (VmHWM) over the export, after the imports (reset through
/proc/self/clear_refs); printed in GiB, as a ratio to the 10 GiB budget and to the size of the weights written.
--naive holds every weight in memory first (what a from_pretrained load does), for comparison. The output folder is
deleted afterwards unless --keep.

    python benchmarks/bench_export_memory.py [--precision fp16|fp32] [--layers N] [--d-model N] [--d-ff N] [--heads N]
                                             [--vocab N] [--naive] [--json] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import T5Config

from slimengine.export.lowering import DTYPES
from slimengine.export.pipeline_export import export_t5
from slimengine.export.t5_export import parameter_shapes, random_weights

BUDGET = 10 * 2**30
XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(sizes: dict, precision: str, directory: Path, naive: bool = False, max_sequence_length: int = 256) -> dict:
    config = T5Config(**sizes, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    params = sum(torch.Size(s).numel() for s in parameter_shapes(config).values())
    weights = random_weights(config)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on
    baseline = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    if naive:  # every weight materialized first
        held = {k: weights(k) for k in parameter_shapes(config)}
        weights = held.__getitem__
    export_t5(config, weights, directory / "t5.onnx", precision, max_sequence_length)
    wall = time.perf_counter() - start
    peak = _status_kib("VmHWM") * 1024
    data = directory / "t5.onnx.data"
    return {"params": params, "precision": precision, "naive": naive, "weights_bytes": params * DTYPES[precision].itemsize,
            "data_bytes": data.stat().st_size, "baseline_rss": baseline, "peak_rss": peak, "peak_over_baseline": peak - baseline,
            "wall_s": wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16")
    ap.add_argument("--layers", type=int, default=XXL["num_layers"])
    ap.add_argument("--d-model", type=int, default=XXL["d_model"])
    ap.add_argument("--d-ff", type=int, default=XXL["d_ff"])
    ap.add_argument("--heads", type=int, default=XXL["num_heads"])
    ap.add_argument("--vocab", type=int, default=XXL["vocab_size"])
    ap.add_argument("--naive", action="store_true", help="hold every weight in memory first (for comparison)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    ap.add_argument("--workdir", type=Path, default=None, help="where the stage is written (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the written stage")
    args = ap.parse_args(argv)
    sizes = dict(vocab_size=args.vocab, d_model=args.d_model, d_ff=args.d_ff, num_layers=args.layers, num_heads=args.heads,
                 d_kv=args.d_model // args.heads)
    directory = Path(tempfile.mkdtemp(prefix="t5-export-", dir=args.workdir))
    try:
        r = measure(sizes, args.precision, directory, naive=args.naive)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print(json.dumps(r))
        return 0
    gib = 2**30
    print(f"T5 encoder {sizes}: {r['params'] / 1e9:.2f} B params, {args.precision}{' (naive)' if args.naive else ''}")
    print(f"  weights written   {r['data_bytes'] / gib:7.2f} GiB")
    print(f"  peak RSS          {r['peak_rss'] / gib:7.2f} GiB  = {r['peak_rss'] / BUDGET:.2f} x the 10 GiB budget, "
          f"{r['peak_rss'] / r['weights_bytes']:.3f} x the weights")
    print(f"  over the imports  {r['peak_over_baseline'] / gib:7.2f} GiB (baseline RSS {r['baseline_rss'] / gib:.2f} GiB)")
    print(f"  wall time         {r['wall_s']:7.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
