"""export-engine: turn a PyTorch SD3 / 1.x-Distill or LEMUR checkpoint into an engine bundle."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from slimengine.staging import OutputPathError, interrupt_on_sigterm, output_directory

from .errors import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="export-engine",
        description="Export a PyTorch SD3 / 1.x-Distill checkpoint (.pt, .safetensors or diffusers folder) or a LEMUR "
        "recommender checkpoint (.pt/.safetensors with its config inside) into an engine bundle (ONNX stages + manifest) "
        "that the slimengine runtime executes. The family is detected from the checkpoint.",
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint file, diffusers transformer folder, diffusers SD3 pipeline folder "
                        "(model_index.json: transformer, text encoders, VAE and tokenizers all become stages; docs/pipeline.md), or "
                        "an SD3 single file with its text encoders and VAE (text_encoders.*, first_stage_model.*; give --tokenizers)")
    parser.add_argument("-o", "--output", type=Path, help="bundle directory to write (default: CHECKPOINT.engine)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8"], default="fp32",
                        help="compute precision (default fp32); int8: the transformer's matmuls in 8 bits where calibration "
                        "measures it holds (CPU; SD3 needs --calibrate, LEMUR calibrates on synthetic documents; docs/int8.md)")
    parser.add_argument("--calibrate", type=Path, metavar="FILE",
                        help="int8: calibration prompts (a text file, one per line; needs the pipeline's text encoders) or "
                        "embeddings (.safetensors: prompt_embeds, pooled_prompt_embeds, and the negative_ pair for CFG)")
    parser.add_argument("--int8-tolerance", type=float, metavar="E",
                        help="int8: the worst relative L2 error a stage may have against its float32 graph on the calibration "
                        "inputs; the most sensitive matmuls stay float until it holds (default 0.02)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: metadata, else 2 for 1.x-Distill, 28 for plain SD3)")
    parser.add_argument("--shift", type=float, help="sigma shift (default: metadata, else the pipeline's scheduler/scheduler_config.json, else 3.0)")
    parser.add_argument("--skip-blocks", help="joint blocks skipped after step 1, e.g. 2-7, or 'none' for a plain plan (default: metadata)")
    parser.add_argument("--xslim", help="default X-Slim policy (docs/xslim.md): none (default); xslim:step=T[,critical=C]"
                        "[,refresh=block|token][,ratio=R][,block=B][,first=F][,warmup=K] for the online dual-threshold "
                        "controller (skip steps below T, refresh blocks or tokens below C, full step above); or "
                        "xslim:schedule=FILE.json[,mode=NAME] for an offline schedule (X-Slim's strategy fields accepted)")
    parser.add_argument("--token-stages", action="store_true",
                        help="add the X-Slim token-level stages (block_N_tokens) so requests may use the token level; "
                        "implied by an --xslim that uses it")
    parser.add_argument("--guidance-scale", type=float, help="default CFG scale (default: 1.0 for 1.x, 7.0 for plain SD3)")
    parser.add_argument("--heads", type=int, help="attention heads, when the weights cannot tell (no qk-norm, no metadata)")
    parser.add_argument("--model-version", type=int, default=1,
                        help="LEMUR: the model version the runtime records with every embedding it writes to a memory bank (default 1)")
    parser.add_argument("--tokenizers", type=Path, metavar="PIPELINE",
                        help="diffusers pipeline folder: its tokenizer/, tokenizer_2/, tokenizer_3/ become tokenizer stages (docs/tokenizers.md); "
                        "required with a single file that has the text encoders")
    parser.add_argument("--pipeline", type=Path, metavar="FOLDER",
                        help="diffusers SD3 pipeline folder whose text encoders, VAE and tokenizers join the transformer CHECKPOINT "
                        "in the bundle (the 1.x student case; docs/pipeline.md)")
    parser.add_argument("--no-t5", action="store_true", help="with a pipeline or a single file with encoders: export without the "
                        "T5 encoder and tokenizer (SD3 then runs with zeros in T5's place; a single file's T5 is dropped)")
    parser.add_argument("--max-sequence-length", type=int,
                        help="T5 tokens (tokenizer length and the T5 stage's limit) with a pipeline or --tokenizers (default: the "
                        "checkpoint's metadata pipeline.max_sequence_length, the length it was trained with, else 256)")
    parser.add_argument("--verify", action="store_true", help="run every stage in ONNX Runtime against PyTorch")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    output = args.output or args.checkpoint.with_name(args.checkpoint.name.split(".")[0] + ".engine")
    interrupt_on_sigterm()  # a half-written bundle's temporary folder is removed on SIGTERM as on Ctrl-C
    try:
        return _main(args, output)
    except KeyboardInterrupt:  # before or after the export itself (which reports its own interruption)
        return _fail(f"interrupted; {output} was not written", code=130)


def _main(args, output: Path) -> int:
    if args.steps is not None and args.steps < 1:
        return _fail(f"--steps must be at least 1, got {args.steps}")
    if args.shift is not None and not args.shift > 0:
        return _fail(f"--shift must be positive, got {args.shift}")
    if args.precision != "int8" and (args.calibrate is not None or args.int8_tolerance is not None):
        return _fail("--calibrate and --int8-tolerance are for --precision int8")
    if args.int8_tolerance is not None and not 0 < args.int8_tolerance <= 1:
        return _fail(f"--int8-tolerance must be in (0, 1], got {args.int8_tolerance}")
    if args.calibrate is not None and not args.calibrate.is_file():
        return _fail(f"--calibrate {args.calibrate}: not a file")
    try:
        # with --force only a bundle directory is replaced: never a file, link or device, nor an input or a folder holding one
        output_directory(output, args.force, [p for p in (args.checkpoint, args.pipeline, args.tokenizers) if p is not None])
    except OutputPathError as e:
        return _fail(str(e))
    # Heavy imports after argument checks, so --help and usage errors are instant.

    from .checkpoint import checkpoint_family, load_checkpoint
    from .pipeline_export import is_pipeline_folder, open_pipeline
    from .sampling_plan import make_plan
    from .sd3_export import export_sd3, needs_token_stages
    from .single_file import component_roles, open_single_file
    from .tokenizer_export import MAX_T5_LENGTH, check_tokenizer_folders

    if args.max_sequence_length is not None and not 2 <= args.max_sequence_length <= MAX_T5_LENGTH:
        return _fail(f"--max-sequence-length must be from 2 to {MAX_T5_LENGTH} (T5 tokens), got {args.max_sequence_length}")

    start = time.perf_counter()
    if checkpoint_family(args.checkpoint) == "lemur":
        return _export_lemur(args, output, start)
    if args.precision == "int8" and args.calibrate is None:
        return _fail("--precision int8 needs --calibrate FILE (prompts, or an embeddings .safetensors): what stays float is measured on it")
    pipeline = None
    try:
        whole = is_pipeline_folder(args.checkpoint)
        single = component_roles(args.checkpoint)  # a single file with encoders and VAE: the roles it has
        if whole and args.pipeline is not None:
            raise CheckpointError(f"{args.checkpoint} is a pipeline folder already; --pipeline is for a transformer-only checkpoint")
        if single:
            pipeline = open_single_file(args.checkpoint, single, args.tokenizers, args.no_t5, args.pipeline, args.shift)
        elif whole or args.pipeline is not None:
            pipeline = open_pipeline(args.pipeline or args.checkpoint, t5=not args.no_t5, transformer=whole)
        elif args.no_t5:
            raise CheckpointError("--no-t5 needs a pipeline (a pipeline folder, --pipeline FOLDER, or a single file with the encoders)")
        elif args.tokenizers is not None:  # checked by open_* otherwise
            check_tokenizer_folders(args.tokenizers)
        if whole:
            args.checkpoint = args.checkpoint / "transformer"
        checkpoint = load_checkpoint(args.checkpoint, num_attention_heads=args.heads)
        # shift: --shift, else the checkpoint's metadata, else the pipeline's scheduler config, else the default
        metadata = checkpoint.metadata
        if pipeline is not None and pipeline.shift is not None and isinstance(metadata.get("sampling", {}), dict):
            metadata = {**metadata, "sampling": {"shift": pipeline.shift, **metadata.get("sampling", {})}}
        plan = make_plan(checkpoint.config.num_layers, checkpoint.has_compensation, metadata,
                         steps=args.steps, shift=args.shift, skip_blocks=args.skip_blocks, guidance_scale=args.guidance_scale,
                         xslim=args.xslim)
    except (CheckpointError, ValueError) as e:
        return _fail(str(e))
    if args.max_sequence_length is None:
        trained = metadata.get("pipeline", {}).get("max_sequence_length") if isinstance(metadata.get("pipeline"), dict) else None
        args.max_sequence_length = trained if isinstance(trained, int) and not isinstance(trained, bool) and 1 < trained <= 512 else 256
    calibration = None
    if args.calibrate is not None:
        from .pipeline_export import PipelineFolder
        from .quantize import CalibrationError, load_calibration

        c = checkpoint.config
        folder = pipeline.path if isinstance(pipeline, PipelineFolder) else None  # a single file has no encoder pipeline
        no_t5 = pipeline.clip_length if pipeline is not None and not pipeline.t5 else None
        try:
            calibration = load_calibration(args.calibrate, folder, args.max_sequence_length, c.joint_attention_dim,
                                           c.pooled_projection_dim, plan.guidance_scale > 1, t5_rows_from=no_t5)
        except CalibrationError as e:
            return _fail(str(e))
    c = checkpoint.config
    kind = f"skipped blocks {plan.skip_blocks[0]}-{plan.skip_blocks[1]} ({plan.compensation} compensation)" if plan.skip_blocks else "full steps"
    kind = ("1.x-Distill student, " if checkpoint.has_compensation else "plain SD3, ") + kind
    print(f"{args.checkpoint}: {c.num_layers} blocks, {c.num_attention_heads}x{c.attention_head_dim} heads, {kind}; "
          f"{plan.steps} steps, effective NFE {plan.effective_nfe(c.num_layers):.2f}", file=sys.stderr)
    token_stages = args.token_stages or needs_token_stages(plan)
    stages = c.num_layers + 2 + checkpoint.has_compensation
    if token_stages:
        stages += c.num_layers - len(c.dual_attention_layers)
    if pipeline is not None:
        stages += len(pipeline.roles())
    steps = stages  # of the progress bar: each quantized stage is a second step
    if args.precision == "int8":
        steps += c.num_layers + 2 + checkpoint.has_compensation
        if pipeline is not None and calibration.token_ids is not None:  # each text encoder's quantization
            steps += sum(role in calibration.token_ids for role in pipeline.roles())
    if calibration is not None:
        print(f"calibration: {calibration.source}", file=sys.stderr)
    failed = _run_export(args, output, steps, lambda progress, report: export_sd3(
        checkpoint, plan, output, precision=args.precision, verify=args.verify, force=args.force, token_stages=token_stages,
        tokenizers=args.tokenizers, t5_max_length=args.max_sequence_length, pipeline=pipeline, progress=progress, report=report,
        calibration=calibration, int8_tolerance=args.int8_tolerance))
    if failed is not None:
        return failed
    print(f"wrote {output} ({args.precision}, {stages} stages) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def _export_lemur(args, output: Path, start: float) -> int:

    from .checkpoint import load_lemur_checkpoint
    from .lemur_export import export_lemur, stage_specs

    if args.precision not in ("fp32", "int8"):
        return _fail(f"LEMUR bundles are fp32 or int8, got --precision {args.precision}")
    if args.calibrate is not None:
        return _fail("--calibrate is for SD3 bundles: a LEMUR int8 export calibrates on synthetic documents (docs/int8.md)")
    try:
        checkpoint = load_lemur_checkpoint(args.checkpoint)
    except (CheckpointError, ValueError) as e:
        return _fail(str(e))
    c = checkpoint.config
    print(f"{args.checkpoint}: LEMUR recommender, {c.embed_dim}-d document embeddings, text {c.text_layers}x{c.text_dim}, "
          f"image {c.image_layers}x{c.image_dim}, model version {args.model_version}", file=sys.stderr)
    stages = len(stage_specs(c)) * (2 if args.precision == "int8" else 1)  # each quantized stage: a second step of the bar
    failed = _run_export(args, output, stages, lambda progress, report: export_lemur(
        checkpoint, output, model_version=args.model_version, verify=args.verify, force=args.force, progress=progress, report=report,
        precision=args.precision, int8_tolerance=args.int8_tolerance))
    if failed is not None:
        return failed
    print(f"wrote {output} (lemur, {args.precision}, {len(stage_specs(c))} stages) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def _run_export(args, output: Path, stages: int, export) -> int | None:
    """Run export(progress, report) under a progress bar; on failure one line and the exit code (nothing
    is written then: the bundle writer is atomic), else None."""
    from tqdm import tqdm

    bar = tqdm(total=stages, desc="export", unit="stage", disable=args.quiet, file=sys.stderr)
    try:
        export(lambda name: (bar.set_postfix_str(name), bar.update()), lambda line: print(line, file=sys.stderr))
    except (ValueError, FileExistsError, CheckpointError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail(f"interrupted; {output} was not written", code=130)
    except Exception as e:  # anything unexpected: still one line, and nothing was written
        return _fail(f"export of {args.checkpoint} failed ({type(e).__name__}: {e}); {output} was not written", code=1)
    finally:
        bar.close()
    return None


def _fail(message: str, code: int = 2) -> int:
    print(f"export-engine: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
