"""Benchmark of serving through Triton Inference Server (issue #15), on this machine, in one run:

1. per-request overhead of Triton over a direct runtime call: LEMUR `embed` of a batch of 64 documents (the "small"
   preset) and one SD3 generation of the trained toy model (its 1.x program, 2 steps, 16x16 latents), each sent by
   one client, sequentially, over HTTP and over gRPC; the direct call is the same request on a session in this
   process;
2. throughput at 1, 4 and 16 concurrent clients (gRPC, one model instance, dynamic batching as generated), against
   the direct call's sequential throughput in the same run.

The server is nvidia-pytriton's tritonserver on loopback, serving a `slimengine triton-repo` repository.

    python benchmarks/bench_triton.py [--requests 40] [--instances 1] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from common import cli, median_ms
from tritonclient.utils import np_to_triton_dtype

import slimengine as se
from slimengine.serving import RepositoryOptions, write_repository
from slimengine.serving.server import TritonServer

TOY = Path(__file__).resolve().parents[1] / "models" / "toy-sd3.safetensors"
PROTOCOLS = {"http": thttp, "grpc": tgrpc}


def make_inputs(protocol: str, inputs: dict[str, np.ndarray]) -> list:
    module = PROTOCOLS[protocol]
    tensors = []
    for name, value in inputs.items():
        t = module.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        t.set_data_from_numpy(value)
        tensors.append(t)
    return tensors


def client(server: TritonServer, protocol: str):
    return thttp.InferenceServerClient(server.http_url) if protocol == "http" else tgrpc.InferenceServerClient(server.grpc_url)


def throughput(server: TritonServer, model: str, inputs: dict, output: str, clients: int, per_client: int) -> float:
    """Requests/s of `clients` gRPC clients each sending `per_client` requests back to back."""
    def loop(_):
        with client(server, "grpc") as c:
            tensors = make_inputs("grpc", inputs)
            for _ in range(per_client):
                c.infer(model, tensors).as_numpy(output)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(loop, range(clients)))
    return clients * per_client / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40, help="timed requests per measurement (default 40)")
    parser.add_argument("--instances", type=int, default=1, help="model instances per engine (default 1)")
    parser.add_argument("--workdir", type=Path, help="keep the bundles here (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        lemur, toy = work / "lemur-small.engine", work / "toy-1x.engine"
        if not lemur.exists():
            cli("slimengine.tools.make_lemur_checkpoint", "--preset", "small", "-o", str(work / "lemur-small.safetensors"))
            cli("slimengine.export.cli", str(work / "lemur-small.safetensors"), "-o", str(lemur), "-q")
        if not toy.exists():
            cli("slimengine.export.cli", str(TOY), "-o", str(toy), "-q")
        write_repository([str(toy), str(lemur)], work / "repo", RepositoryOptions(instances=args.instances), force=True)

        lemur_engine, toy_engine = se.open_engine(lemur), se.open_engine(toy)
        c, t = lemur_engine.config, toy_engine.config
        rng = np.random.default_rng(0)
        embed_in = {"text_ids": rng.integers(1, c["vocab_size"], (64, c["max_text_len"])),
                    "frames": rng.standard_normal((64, c["max_frames"], 3, c["image_size"], c["image_size"]), dtype=np.float32)}
        sd3_in = {"prompt_embeds": rng.standard_normal((1, 77, t["joint_attention_dim"]), dtype=np.float32),
                  "pooled_embeds": rng.standard_normal((1, t["pooled_projection_dim"]), dtype=np.float32),
                  "seed": np.array([[7]], np.uint64)}
        lemur_session, toy_session = lemur_engine.session(), toy_engine.session()
        cases = {
            "lemur_embed B=64": ("lemur_embed", embed_in, "embedding",
                                 lambda: lemur_session.embed(embed_in["text_ids"], embed_in["frames"])),
            "sd3 toy 1x": ("sd3", sd3_in, "latents", lambda: toy_session.generate(sd3_in["prompt_embeds"], sd3_in["pooled_embeds"], seed=7)),
        }
        direct = {name: median_ms(fn, args.requests) for name, (_, _, _, fn) in cases.items()}

        print(f"Triton ({'nvidia-pytriton tritonserver'}, {args.instances} instance(s) per engine) vs direct runtime calls, "
              f"median of {args.requests} requests")
        with TritonServer(work / "repo") as server:
            print(f"{'request':<18} {'direct ms':>10} {'HTTP ms':>9} {'overhead':>9} {'ratio':>6} {'gRPC ms':>9} {'overhead':>9} {'ratio':>6}")
            for name, (model, inputs, output, _) in cases.items():
                row = f"{name:<18} {direct[name]:>10.2f}"
                for protocol in ("http", "grpc"):
                    with client(server, protocol) as cl:
                        tensors = make_inputs(protocol, inputs)
                        ms = median_ms(lambda: cl.infer(model, tensors).as_numpy(output), args.requests)  # noqa: B023
                    row += f" {ms:>9.2f} {ms - direct[name]:>+9.2f} {ms / direct[name]:>6.2f}"
                print(row)
            print(f"\n{'throughput (gRPC)':<18} {'direct req/s':>12} " + " ".join(f"{f'{n} client(s)':>12} {'ratio':>6}" for n in (1, 4, 16)))
            for name, (model, inputs, output, _) in cases.items():
                row = f"{name:<18} {1e3 / direct[name]:>12.1f}"
                for n in (1, 4, 16):
                    rps = throughput(server, model, inputs, output, n, max(2, args.requests // n))
                    row += f" {rps:>12.1f} {rps * direct[name] / 1e3:>6.2f}"
                print(row)
        print("\nratio: Triton / direct (latency), Triton req/s / direct sequential req/s (throughput)")


if __name__ == "__main__":
    main()
