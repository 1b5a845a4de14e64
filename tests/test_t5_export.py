"""The T5 stage's streamed export (export/t5_export.py): the same outputs as the module it streams, and a peak memory
far below the weights' size (benchmarks/bench_export_memory.py measures the T5-XXL-sized case)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from slimengine.export.pipeline_export import export_t5
from slimengine.export.t5_export import parameter_shapes, random_weights

ROOT = Path(__file__).resolve().parents[1]


def _config(**sizes):
    from transformers import T5Config

    base = dict(vocab_size=300, d_model=64, d_ff=128, num_layers=3, num_heads=4, d_kv=16)
    return T5Config(**{**base, **sizes}, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation="eager")


def _rel(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_streamed_stage_equals_module(tmp_path):
    """The stage written from a streamed weight source computes what transformers' T5EncoderModel with those same
    weights computes (fp32: equal to float rounding; fp16: finite and close), on a length and batch not traced."""
    import onnxruntime as ort
    from transformers import T5EncoderModel

    config = _config()
    weights = random_weights(config, seed=3)
    model = T5EncoderModel(config).eval()
    state = {k: weights(k) for k in parameter_shapes(config)}
    model.load_state_dict({**state, "encoder.embed_tokens.weight": state["shared.weight"]}, strict=True)
    ids = torch.randint(0, config.vocab_size, (3, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)[0].numpy()
    for precision, tolerance in (("fp32", 1e-5), ("fp16", 1e-2)):
        path = tmp_path / precision / "t5.onnx"
        path.parent.mkdir()
        export_t5(config, weights, path, precision, max_sequence_length=32)
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids.numpy()})[0]
        assert got.shape == want.shape and np.isfinite(got).all()
        assert _rel(got, want) < tolerance, (precision, _rel(got, want))
    # bf16: written and well-typed (ONNX Runtime's CPU provider does not run bf16 graphs)
    import onnx

    path = tmp_path / "bf16" / "t5.onnx"
    path.parent.mkdir()
    export_t5(config, weights, path, "bf16", max_sequence_length=32)
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    assert {i.data_type for i in model.graph.initializer if len(i.dims) == 2} == {onnx.TensorProto.BFLOAT16}


def _bench(*args: str) -> dict:
    # A T5 of 8 layers of width 1024 (d_ff 8192, a small vocabulary: no single weight dominates), 0.9 GiB of float32.
    sizes = ["--layers", "8", "--d-model", "1024", "--d-ff", "8192", "--heads", "16", "--vocab", "1024", "--precision", "fp32"]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_export_memory.py"), *sizes, "--json", *args],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_streamed_export_peak_memory():
    """Exporting the stage raises the process's peak RSS by far less than the weights' size: it never holds the model.
    The same probe on an export that first holds every weight (--naive, as a from_pretrained load would) sees at
    least the weights' size, so the bound fails if someone materializes the model."""
    streamed = _bench()
    assert streamed["data_bytes"] == streamed["weights_bytes"] > 800 * 2**20
    assert streamed["peak_over_baseline"] < 0.35 * streamed["weights_bytes"], streamed
    naive = _bench("--naive")
    assert naive["peak_over_baseline"] > streamed["weights_bytes"], naive


def test_t5_folder_checked_before_export(tmp_path):
    """A text_encoder_3/ folder is read lazily, so its tensors are checked against its config up front (names and
    shapes, from the safetensors headers): a missing or misshapen weight is refused, naming it."""
    import pytest
    from safetensors.torch import load_file, save_file
    from transformers import T5EncoderModel

    from slimengine.export.t5_export import T5Source

    T5EncoderModel(_config()).save_pretrained(tmp_path / "t5")
    source = T5Source(tmp_path / "t5")
    assert source.config.d_model == 64
    tensors = load_file(tmp_path / "t5" / "model.safetensors")
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, tmp_path / "t5" / "model.safetensors")
    with pytest.raises(ValueError, match=f"missing 1 weights its config implies, e.g. {key}"):
        T5Source(tmp_path / "t5")
    save_file({**tensors, key: tensors[key][:, :-1].contiguous()}, tmp_path / "t5" / "model.safetensors")
    with pytest.raises(ValueError, match=f"{key} has shape \\[64, 127\\]"):
        T5Source(tmp_path / "t5")
