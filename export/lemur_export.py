"""Checkpoint -> LEMUR engine bundle: the `embed` and `score` stages and the manifest.

Both stages are traced once with torch.export (opset 23, attention as the ONNX `Attention` op) with
dynamic batch, text length, frame count, history length and query length. Token ids are int64;
everything else is float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from .bundle import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, write_bundle
from .checkpoint import LemurCheckpoint
from .lemur_model import SEGMENTS, LemurConfig, LemurModel
from .lowering import OPSET, trace_stage
from .sd3_export import EXPORTER_VERSION
from .stage_spec import StageSpec, TensorSpec

MAX_BATCH = 4096  # as the SD3 stages; the runtime checks the same limits
MAX_HISTORY = 4096


def stage_specs(c: LemurConfig) -> list[StageSpec]:
    return [
        StageSpec("embed", (TensorSpec("text_ids", ("batch", "text"), "int64"), TensorSpec("segment_ids", ("batch", "text"), "int64"),
                            TensorSpec("frames", ("batch", "frames", 3, c.image_size, c.image_size))),
                  (TensorSpec("doc_embedding", ("batch", c.embed_dim)),), role="lemur_embed"),
        StageSpec("score", (TensorSpec("history", ("batch", "history", c.embed_dim)), TensorSpec("history_mask", ("batch", "history")),
                            TensorSpec("query_ids", ("batch", "query"), "int64")),
                  (TensorSpec("score", ("batch",)),), role="lemur_score"),
    ]


class EmbedStage(nn.Module):
    def __init__(self, model: LemurModel):
        super().__init__()
        self.model = model

    def forward(self, text_ids, segment_ids, frames):
        return self.model.embed(text_ids, segment_ids, frames)


class ScoreStage(nn.Module):
    def __init__(self, model: LemurModel):
        super().__init__()
        self.model = model

    def forward(self, history, history_mask, query_ids):
        return self.model.score(history, history_mask, query_ids)


def stage_module(model: LemurModel, spec: StageSpec) -> nn.Module:
    return EmbedStage(model) if spec.role == "lemur_embed" else ScoreStage(model)


def example_inputs(c: LemurConfig, batch: int, text: int, frames: int, history: int, query: int, seed: int) -> dict:
    """Random inputs of the given sizes, with some padding in every sequence."""
    g = torch.Generator().manual_seed(seed)
    text_ids = torch.randint(1, c.vocab_size, (batch, text), generator=g)
    text_ids[0, text // 2 :] = 0
    segment_ids = torch.randint(0, len(SEGMENTS), (batch, text), generator=g)
    frames_in = torch.randn(batch, frames, 3, c.image_size, c.image_size, generator=g)
    history_in = torch.nn.functional.normalize(torch.randn(batch, history, c.embed_dim, generator=g), dim=-1)
    mask = torch.ones(batch, history)
    mask[0, history // 2 :] = 0
    query_ids = torch.randint(1, c.vocab_size, (batch, query), generator=g)
    query_ids[-1, query // 2 :] = 0
    return {"embed": (text_ids, segment_ids, frames_in), "score": (history_in, mask, query_ids)}


def _dynamic_shapes(spec: StageSpec, c: LemurConfig):
    dims = {
        "batch": torch.export.Dim("batch", min=1, max=MAX_BATCH),
        "text": torch.export.Dim("text", min=1, max=c.max_text_len),
        "frames": torch.export.Dim("frames", min=1, max=c.max_frames),
        "history": torch.export.Dim("history", min=1, max=MAX_HISTORY),
        "query": torch.export.Dim("query", min=1, max=c.max_query_len),
    }
    return tuple({axis: dims[d] for axis, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs)


def export_stages(model: LemurModel, directory: Path, progress=None) -> list[StageSpec]:
    c = model.config
    specs = stage_specs(c)
    args = example_inputs(c, batch=2, text=6, frames=2, history=5, query=4, seed=0)
    (directory / "stages").mkdir(parents=True, exist_ok=True)
    for spec in specs:
        program = trace_stage(stage_module(model, spec), spec, args[spec.name], dynamic_shapes=_dynamic_shapes(spec, c))
        program.save(directory / spec.file, external_data=True)
        if progress is not None:
            progress(spec.name)
    return specs


def verify_stages(model: LemurModel, directory: Path, specs: list[StageSpec]) -> dict[str, float]:
    """Run both stages in ONNX Runtime on inputs of new shapes; max relative error vs PyTorch per stage."""
    import onnxruntime as ort

    c = model.config
    args = example_inputs(c, batch=3, text=min(9, c.max_text_len), frames=min(3, c.max_frames), history=7, query=min(5, c.max_query_len),
                          seed=1)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    errors = {}
    for spec in specs:
        with torch.no_grad():
            expected = stage_module(model, spec)(*args[spec.name]).numpy()
        session = ort.InferenceSession(str(directory / spec.file), options, providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {t.name: x.numpy() for t, x in zip(spec.inputs, args[spec.name])})
        errors[spec.name] = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
    return errors


def export_lemur(checkpoint: LemurCheckpoint, destination: Path, model_version: int = 1, verify: bool = False, force: bool = False,
                 progress=None, report=print) -> dict:
    """Write the LEMUR bundle for `checkpoint`; with `verify`, check both stages in ONNX Runtime (relative error <= 1e-5)."""
    if not 0 <= model_version < 2**31:
        raise ValueError(f"--model-version must be in [0, 2^31), got {model_version}")
    model = checkpoint.build_model()
    c = model.config

    def fill(tmp: Path) -> dict:
        specs = export_stages(model, tmp, progress=progress)
        if verify:
            for name, err in verify_stages(model, tmp, specs).items():
                report(f"verify {name:>6}: relative |ORT - PyTorch| = {err:.3e}")
                if not err <= 1e-5:
                    raise ValueError(f"stage {name} does not match PyTorch (relative error {err:.3e} > 1e-5)")
        return {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "family": "lemur",
            "precision": "fp32",
            "exporter": {"name": "slimengine", "version": EXPORTER_VERSION, "torch": torch.__version__, "onnx": onnx.__version__,
                         "opset": OPSET},
            "source": {"path": str(checkpoint.path), "sha256": checkpoint.sha256},
            "config": {**c.to_json(), "num_segments": len(SEGMENTS), "max_batch": MAX_BATCH, "max_history": MAX_HISTORY},
            "stages": [s.to_json() for s in specs],
            "program": {"programs": ["embed", "score"], "model_version": model_version, "padding_token": 0,
                        "embedding_normalized": True},
            "custom_op_library": None,
        }

    return write_bundle(destination, fill, force=force, report=report)
