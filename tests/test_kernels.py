"""The "ai.slimengine" custom ops in ONNX Runtime (CPU) against numpy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from slimengine import _native

DOMAIN = "ai.slimengine"


def run_op(op: str, inputs: dict[str, np.ndarray], outputs: list[tuple[str, int]], library: Path | None = None):
    node = helper.make_node(op, list(inputs), [name for name, _ in outputs], domain=DOMAIN)
    types = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64}
    graph = helper.make_graph(
        [node], op,
        [helper.make_tensor_value_info(n, types[a.dtype], list(a.shape)) for n, a in inputs.items()],
        [helper.make_tensor_value_info(n, t, None) for n, t in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(DOMAIN, 1)])
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library or _native.ops_library_path()))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


rng = np.random.default_rng(0)


def test_l1_change_gives_mean_absolute_change_and_scale_per_sample():
    a, b = rng.standard_normal((3, 5, 7), dtype=np.float32), rng.standard_normal((3, 5, 7), dtype=np.float32)
    change, scale = run_op("L1Change", {"a": a, "b": b}, [("change", TensorProto.FLOAT), ("scale", TensorProto.FLOAT)])
    np.testing.assert_allclose(change, np.abs(a - b).mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(scale, np.abs(b).mean(axis=(1, 2)), rtol=1e-6)


def test_token_scores_and_selection_pick_the_most_changed_tokens():
    r_last, r_prev = rng.standard_normal((2, 50, 16), dtype=np.float32), rng.standard_normal((2, 50, 16), dtype=np.float32)
    (score,) = run_op("TokenChangeScore", {"r_last": r_last, "r_prev": r_prev}, [("score", TensorProto.FLOAT)])
    np.testing.assert_allclose(score, np.abs(r_last - r_prev).mean(axis=2), rtol=1e-6)
    for ratio in (0.3, 0.7, 1.0):
        (idx,) = run_op("SelectTokens", {"score": score, "ratio": np.array(ratio, np.float32)}, [("idx", TensorProto.INT64)])
        keep = max(1, round(ratio * 50))
        expected = np.sort(np.argsort(-score, axis=1, kind="stable")[:, :keep], axis=1)
        np.testing.assert_array_equal(idx, expected)


def test_gather_and_scatter_move_token_rows():
    cache = rng.standard_normal((2, 10, 4), dtype=np.float32)
    idx = np.array([[1, 4, 9], [0, 2, 3]], np.int64)
    (gathered,) = run_op("GatherTokens", {"x": cache, "idx": idx}, [("out", TensorProto.FLOAT)])
    np.testing.assert_array_equal(gathered, np.take_along_axis(cache, idx[:, :, None], axis=1))
    values = rng.standard_normal((2, 3, 4), dtype=np.float32)
    (scattered,) = run_op("ScatterTokens", {"cache": cache, "idx": idx, "values": values}, [("out", TensorProto.FLOAT)])
    expected = cache.copy()
    for b in range(2):
        expected[b, idx[b]] = values[b]
    np.testing.assert_array_equal(scattered, expected)


@pytest.mark.parametrize("op,inputs,message", [
    ("GatherTokens", {"x": np.zeros((1, 4, 2), np.float32), "idx": np.array([[4]], np.int64)}, "outside [0, N)"),
    ("ScatterTokens", {"cache": np.zeros((1, 4, 2), np.float32), "idx": np.array([[-1]], np.int64),
                       "values": np.zeros((1, 1, 2), np.float32)}, "outside [0, N)"),
    ("SelectTokens", {"score": np.zeros((1, 4), np.float32), "ratio": np.array(1.5, np.float32)}, "ratio must be in (0, 1]"),
    ("TokenChangeScore", {"r_last": np.zeros((1, 4, 2), np.float32), "r_prev": np.zeros((1, 4, 3), np.float32)}, "[B, N, C]"),
])
def test_bad_inputs_raise_clear_errors(op, inputs, message):
    with pytest.raises(Exception, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        run_op(op, inputs, [("out", TensorProto.FLOAT if op != "SelectTokens" else TensorProto.INT64)])


ROOT = Path(__file__).resolve().parents[1]
CUDA_ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def nvcc(*args: str) -> subprocess.CompletedProcess:
    if not shutil.which("nvcc"):
        pytest.skip("nvcc not installed")
    return subprocess.run(["nvcc", "-std=c++17", "-O2", *CUDA_ARCHS, *args], capture_output=True, text=True)


def test_cuda_kernels_compile_for_sm80_and_sm90(tmp_path):
    """CI has nvcc but no GPU: the CUDA sources must compile; running them is the GPU machine's job."""
    symbols = ""
    for source in ("token_ops", "elementwise"):
        proc = nvcc(f"-I{ROOT / 'kernels/include'}", "-c", str(ROOT / f"kernels/cuda/{source}.cu"), "-o", str(tmp_path / f"{source}.o"))
        assert proc.returncode == 0, proc.stderr
        symbols += subprocess.run(["nm", "-C", str(tmp_path / f"{source}.o")], capture_output=True, text=True).stdout
    for name in ("l1_change", "token_change_score", "select_tokens", "gather_tokens", "scatter_tokens", "euler_cfg", "fill", "add",
                 "subtract", "gaussian_noise"):
        assert f"slim::kernels::cuda::{name}(" in symbols, name


def test_cuda_kernel_check_program_links_with_static_cudart(tmp_path):
    """The GPU machine's kernel check (benchmarks/gpu_check.sh runs it) builds here; it needs only the driver there."""
    exe = tmp_path / "slim-cuda-kernel-check"
    proc = nvcc(f"-I{ROOT / 'kernels/include'}", "-cudart", "static", str(ROOT / "kernels/tests/cuda_kernel_check.cu"),
                str(ROOT / "kernels/cuda/token_ops.cu"), str(ROOT / "kernels/cuda/elementwise.cu"), str(ROOT / "kernels/cpu/token_ops.cpp"),
                str(ROOT / "kernels/cpu/elementwise.cpp"), "-o", str(exe))
    assert proc.returncode == 0, proc.stderr
    assert "libcudart" not in subprocess.run(["ldd", str(exe)], capture_output=True, text=True).stdout
    # Without a GPU it must fail loudly (exit 2, the CUDA error named), never report a pass.
    run = subprocess.run([str(exe), "--no-bandwidth"], capture_output=True, text=True, timeout=60)
    if run.returncode == 0:
        pytest.skip("a CUDA device is present: the check ran (see benchmarks/gpu_check.sh for the real run)")
    assert run.returncode == 2 and "CUDA ERROR" in run.stderr and "PASS" not in run.stdout, (run.returncode, run.stdout, run.stderr)


def test_cuda_custom_op_library_keeps_the_cpu_kernels():
    """libslimengine_ops_cuda.so (built where nvcc exists) loads into a CPU-only ONNX Runtime and its CPU kernels work;
    its CUDA kernels run only under the CUDA execution provider (benchmarks/gpu_check.sh)."""
    path = _native.ops_cuda_library_path()
    if not path.exists():
        pytest.skip(f"{path.name} not built (no nvcc when slimengine was installed)")
    cache = rng.standard_normal((2, 10, 4), dtype=np.float32)
    idx = np.array([[1, 4, 9], [0, 2, 3]], np.int64)
    (gathered,) = run_op("GatherTokens", {"x": cache, "idx": idx}, [("out", TensorProto.FLOAT)], library=path)
    np.testing.assert_array_equal(gathered, np.take_along_axis(cache, idx[:, :, None], axis=1))
    with pytest.raises(Exception, match=r"outside \[0, N\)"):
        run_op("GatherTokens", {"x": cache, "idx": idx + 7}, [("out", TensorProto.FLOAT)], library=path)
