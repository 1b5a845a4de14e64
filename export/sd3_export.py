"""Checkpoint -> SD3 engine bundle: stages, sampling program and manifest."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch

from .bundle import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, write_bundle
from .checkpoint import Checkpoint
from .lowering import DTYPES, OPSET
from .onnx_export import export_stages, verify_stages
from .pipeline_export import (
    PipelineFolder,
    check_against_transformer,
    export_pipeline_stages,
    pipeline_manifest,
    verify_pipeline_stages,
)
from .sampling_plan import SamplingPlan
from .single_file import SingleFile
from .tokenizer_export import export_tokenizers

EXPORTER_VERSION = "0.1.0"
CUSTOM_OP_LIBRARY = "libslimengine_ops.so"  # the runtime's own "ai.slimengine" ops, found beside libslimengine.so


def needs_token_stages(plan: SamplingPlan) -> bool:
    return plan.xslim is not None and "token" in plan.xslim.uses


def export_sd3(
    checkpoint: Checkpoint,
    plan: SamplingPlan,
    destination: Path,
    precision: str = "fp32",
    verify: bool = False,
    force: bool = False,
    progress=None,
    report=print,
    token_stages: bool = False,
    tokenizers: Path | None = None,
    t5_max_length: int = 256,
    pipeline: PipelineFolder | SingleFile | None = None,
    calibration=None,
    int8_tolerance: float | None = None,
) -> dict:
    """Write the bundle for `checkpoint` with `plan`; with `verify`, check every stage in ONNX Runtime.
    `token_stages` adds the X-Slim token-level stages (always when the plan's policy uses that level).
    `tokenizers`: a diffusers pipeline folder whose tokenizer/, tokenizer_2/, tokenizer_3/ become the bundle's
    tokenizer stages (docs/tokenizers.md); T5's keeps `t5_max_length` tokens. `pipeline`: a checked diffusers SD3
    pipeline folder whose text encoders and VAE become stages too (docs/pipeline.md), and whose tokenizers are
    exported unless `tokenizers` names another folder; or a checked single file's encoders and VAE
    (export/single_file.py), whose tokenizers `tokenizers` names. `precision` "int8" quantizes the transformer's
    stages and, calibrated on prompts, the text encoders', measured on `calibration` (quantize.py: a Calibration) within
    `int8_tolerance`; the rest stays float32."""
    compute = "fp32" if precision == "int8" else precision  # what the graphs are traced in
    model = checkpoint.build_model(DTYPES[compute])  # no float32 copy of a half-precision model
    if precision == "int8":
        from .quantize import check_memory

        check_memory(model, plan, calibration, _latent_size(model))
    plan.validate(model.num_layers, model.has_compensation)
    token_stages = token_stages or needs_token_stages(plan)
    components = None
    if pipeline is not None:
        components = pipeline.load()
        check_against_transformer(components, checkpoint.config, pipeline)
        tokenizers = tokenizers or pipeline.path
    tokenizer_roles = pipeline.tokenizer_roles() if pipeline is not None else ("clip_l", "clip_g", "t5")

    def fill(tmp: Path) -> dict:
        specs = export_stages(model, tmp, compute, progress=progress, token_stages=token_stages)
        if verify:
            errors = verify_stages(model, tmp, specs, compute)
            for name, err in errors.items():
                report(f"verify {name:>12}: max |ORT - PyTorch| = {err:.3e}")
        record = quantize_transformer(model, plan, specs, tmp, calibration, int8_tolerance, progress, report) if precision == "int8" else None
        if components is not None:
            encoder_specs = export_pipeline_stages(components, tmp, compute, t5_max_length, pipeline.clip_length, progress=progress)
            if verify:
                for name, err in verify_pipeline_stages(components, tmp, encoder_specs, compute, pipeline.clip_length).items():
                    report(f"verify {name:>12}: max |ORT - PyTorch| = {err:.3e}")
            specs = specs + encoder_specs
            if record is not None:
                from .quantize import quantize_encoders

                encoders = quantize_encoders(tmp, encoder_specs, calibration, record["tolerance"], report, progress)
                record["stages"].update({name: q.to_json() for name, q in encoders.items()})
        if record is not None:
            from .quantize import finish_record

            finish_record(record, specs)
        config = checkpoint.config
        return {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "family": "sd3",
            "precision": precision,
            "exporter": {"name": "slimengine", "version": EXPORTER_VERSION, "torch": torch.__version__,
                         "onnx": onnx.__version__, "opset": OPSET},
            "source": {"path": str(checkpoint.path), "sha256": checkpoint.sha256},
            "config": {**config.to_json(), "max_latent_size": config.pos_embed_max_size * config.patch_size,
                       "default_latent_size": min(config.sample_size, config.pos_embed_max_size * config.patch_size)},
            "stages": [s.to_json() for s in specs],
            "program": plan.to_manifest(model.num_layers),
            "custom_op_library": CUSTOM_OP_LIBRARY if token_stages else None,
            "tokenizers": export_tokenizers(tokenizers, tmp, t5_max_length, tokenizer_roles) if tokenizers is not None else [],
            **({"pipeline": pipeline_manifest(components, pipeline, config, t5_max_length)} if components is not None else {}),
            **({"quantization": record} if record is not None else {}),
        }

    def check(bundle: Path) -> None:
        if verify and precision == "int8":
            from .quantize import verify_program

            error, psnr = verify_program(bundle, model, plan, calibration, _latent_size(model))
            report(f"verify      program: final latents vs the float32 PyTorch program: relative L2 {error:.4f}, PSNR {psnr:.1f} dB")

    return write_bundle(destination, fill, force=force, report=report, check=check)


def quantize_transformer(model, plan: SamplingPlan, specs, directory: Path, calibration, tolerance: float | None, progress, report) -> dict:
    """Quantize the transformer's stages under `directory` in place (quantize.py) and return the manifest's
    `quantization` record; each stage's result goes to `report`."""
    from . import quantize

    tolerance = quantize.DEFAULT_TOLERANCE if tolerance is None else tolerance
    latent_size = _latent_size(model)
    records = quantize.record_stage_inputs(model, plan, calibration, specs, latent_size)
    stages = quantize.quantize_stages(directory, specs, records, tolerance, progress=progress)
    for name, q in stages.items():
        report(quantize.report_line(name, q))
    return {
        "method": quantize.METHOD,
        "calibration": {"source": calibration.source, "steps": quantize.recorded_steps(plan.steps), "latent_size": latent_size,
                        "seed": 0},
        "tolerance": tolerance,
        "stages": {name: q.to_json() for name, q in stages.items()},
    }


def _latent_size(model) -> int:
    """The bundle's default latent size: what calibration runs at."""
    c = model.config
    return min(c.sample_size, c.pos_embed_max_size * c.patch_size)
