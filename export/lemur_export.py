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


# int8 (docs/int8.md, "LEMUR"): the stages' matmuls are quantized on synthetic documents and histories, which suit a
# tower whose inputs are token ids, pixels and unit-norm embeddings; the embeddings of other documents are then checked.
CALIBRATION_SEEDS = (0, 1)
CALIBRATION_BATCH = 8
HELD_OUT_SEED = 2
MIN_COSINE = 0.995  # the worst document's cosine between its int8 and float32 embedding: below it nothing is published
MAX_SCORE_ERROR = 0.05  # --verify: the score stage's worst relative error on held-out histories


def calibration_inputs(c: LemurConfig, seed: int, batch: int = CALIBRATION_BATCH) -> dict[str, tuple[torch.Tensor, ...]]:
    """Seeded random documents and histories of the sizes a service sends (up to 128 text tokens, 4 frames, 64 history
    embeddings, the longest query), each stage's inputs."""
    return example_inputs(c, batch=batch, text=min(128, c.max_text_len), frames=min(4, c.max_frames), history=64, query=c.max_query_len,
                          seed=seed)


def quantize_lemur(model: LemurModel, directory: Path, specs: list[StageSpec], tolerance: float | None, progress, report) -> dict:
    """Quantize both stages under `directory` in place (quantize.py's sensitivity rule) and return the manifest's
    `quantization` record."""
    from . import quantize

    tolerance = quantize.DEFAULT_TOLERANCE if tolerance is None else tolerance
    records = [calibration_inputs(model.config, seed) for seed in CALIBRATION_SEEDS]
    stages = {}
    for spec in specs:
        feeds = [{t.name: x.numpy() for t, x in zip(spec.inputs, r[spec.name])} for r in records]
        stages[spec.name] = quantize.quantize_stage(directory / spec.file, feeds, tolerance)
        report(quantize.report_line(spec.name, stages[spec.name]))
        if progress is not None:
            progress(f"int8 {spec.name}")
    return quantize.finish_record({
        "method": quantize.METHOD,
        "calibration": {"source": "synthetic documents and histories", "documents": CALIBRATION_BATCH * len(CALIBRATION_SEEDS),
                        "seeds": list(CALIBRATION_SEEDS)},
        "tolerance": tolerance,
        "stages": {name: q.to_json() for name, q in stages.items()},
    }, specs)


@torch.no_grad()
def verify_embeddings(bundle: Path, model: LemurModel, batch: int = 32) -> tuple[float, float]:
    """The bundle's `embed` program (the engine) against the float32 PyTorch model on held-out documents: the worst
    document's cosine between the two embeddings, and the `score` stage's worst relative error on held-out histories."""
    import slimengine as se

    held_out = calibration_inputs(model.config, HELD_OUT_SEED, batch)
    text_ids, segment_ids, frames = held_out["embed"]
    expected = model.embed(text_ids, segment_ids, frames).numpy().astype(np.float64)
    history, mask, query_ids = held_out["score"]
    expected_score = model.score(history, mask, query_ids).numpy().astype(np.float64)
    with se.open_engine(bundle) as engine, engine.session() as session:
        got = np.asarray(session.embed(text_ids.numpy(), frames.numpy(), segment_ids=segment_ids.numpy()).embeddings, dtype=np.float64)
        score = session.run_stage("score", {"history": history.numpy(), "history_mask": mask.numpy(), "query_ids": query_ids.numpy()},
                                  {"score": np.empty(batch, np.float32)})["score"]
    with np.errstate(all="ignore"):  # a zero or non-finite embedding gives NaN, which the caller refuses
        cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
        score_error = np.abs(np.asarray(score, dtype=np.float64) - expected_score).max() / max(np.abs(expected_score).max(), 1e-12)
    return float(np.min(cosine)), float(score_error)


def export_lemur(checkpoint: LemurCheckpoint, destination: Path, model_version: int = 1, verify: bool = False, force: bool = False,
                 progress=None, report=print, precision: str = "fp32", int8_tolerance: float | None = None) -> dict:
    """Write the LEMUR bundle for `checkpoint`; with `verify`, check both stages in ONNX Runtime (relative error <= 1e-5;
    int8: the engine's embeddings of held-out documents, cosine >= MIN_COSINE). `precision` "int8" quantizes both
    stages (quantize_lemur)."""
    if not 0 <= model_version < 2**31:
        raise ValueError(f"--model-version must be in [0, 2^31), got {model_version}")
    if precision not in ("fp32", "int8"):
        raise ValueError(f"LEMUR bundles are fp32 or int8, got --precision {precision}")
    model = checkpoint.build_model()
    c = model.config

    def fill(tmp: Path) -> dict:
        specs = export_stages(model, tmp, progress=progress)
        if verify:
            for name, err in verify_stages(model, tmp, specs).items():
                report(f"verify {name:>6}: relative |ORT - PyTorch| = {err:.3e}")
                if not err <= 1e-5:
                    raise ValueError(f"stage {name} does not match PyTorch (relative error {err:.3e} > 1e-5)")
        quantization = {}
        if precision == "int8":
            quantization = {"quantization": quantize_lemur(model, tmp, specs, int8_tolerance, progress, report)}
        return {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "family": "lemur",
            "precision": precision,
            **quantization,
            "exporter": {"name": "slimengine", "version": EXPORTER_VERSION, "torch": torch.__version__, "onnx": onnx.__version__,
                         "opset": OPSET},
            "source": {"path": str(checkpoint.path), "sha256": checkpoint.sha256},
            "config": {**c.to_json(), "num_segments": len(SEGMENTS), "max_batch": MAX_BATCH, "max_history": MAX_HISTORY},
            "stages": [s.to_json() for s in specs],
            "program": {"programs": ["embed", "score"], "model_version": model_version, "padding_token": 0,
                        "embedding_normalized": True},
            "custom_op_library": None,
        }

    def check(tmp: Path) -> None:
        if precision == "int8":
            cosine, score_error = verify_embeddings(tmp, model)
            report(f"int8 embeddings of held-out documents vs float32 PyTorch: worst cosine {cosine:.5f}; "
                   f"score: worst relative error {score_error:.4f}")
            if not cosine >= MIN_COSINE:  # NaN included: a service would rank by these embeddings
                raise ValueError(f"int8 embeddings fall below cosine {MIN_COSINE} of float32 ({cosine:.5f}) on held-out documents: "
                                 "export with a lower --int8-tolerance, or in fp32 (and check the fp32 model with --verify)")
            if verify and not score_error <= MAX_SCORE_ERROR:
                raise ValueError(f"int8 scores differ from float32 by {score_error:.4f} (relative, worst held-out history; at most "
                                 f"{MAX_SCORE_ERROR}): export with a lower --int8-tolerance, or in fp32")

    return write_bundle(destination, fill, force=force, report=report, check=check)
