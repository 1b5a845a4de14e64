"""distill-1x and fit-compensation: the command lines of docs/distill-1x.md."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

DISTILL_HELP = """Distil a 2-step 1.x student from an SD3 teacher: the student's second step skips a block range and adds
back the compensation MLPs' correction of the first step's change over it; student and compensation train together on
the teacher's CFG samples of the given prompts (docs/distill-1x.md). Seeded; --resume continues an interrupted run."""

FIT_HELP = """Fit only the compensation MLPs of a frozen 1.x student for a skipped block range (e.g. 1-4 instead of the range
it was distilled with), on calibration prompts, and write a checkpoint export-engine reads (docs/distill-1x.md)."""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", type=Path, required=True, help="diffusers SD3 pipeline folder of the checkpoint's text encoders")
    parser.add_argument("--prompts", type=Path, required=True, help="text file, one prompt per line (# comments and blank lines skipped)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="student checkpoint to write (.safetensors)")
    parser.add_argument("--skip-blocks", help="joint blocks the second step skips, A-B inclusive (within 0 to layers-2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda is untested here: no GPU)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (default: every core)")
    parser.add_argument("--max-sequence-length", type=int,
                        help="T5 tokens (default: the checkpoint's metadata pipeline.max_sequence_length, else 256)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def distill_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill-1x", description=DISTILL_HELP)
    p.add_argument("teacher", type=Path, help="SD3 checkpoint (any form export-engine reads: .safetensors, .pt, diffusers transformer folder)")
    _common(p)
    p.add_argument("--samples-per-prompt", type=int, default=16, help="teacher samples (noises) per prompt (default 16)")
    p.add_argument("--teacher-steps", type=int, default=28, help="teacher sampling steps (default 28)")
    p.add_argument("--guidance", type=float, help="teacher CFG scale (default: its metadata's guidance_scale, else 7.0)")
    p.add_argument("--train-steps", type=int, default=1200, help="optimiser steps (default 1200)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW, warm-up then cosine; default 5e-4)")
    p.add_argument("--shift", type=float, help="the student's shift: its middle sigma is S/(S+1) (default: the teacher's, "
                   "from its metadata or the pipeline's scheduler, else 3)")
    p.add_argument("--save-every", type=int, default=100, help="write the resume file every N steps (default 100)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT.resume (written while training)")
    return p


def fit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fit-compensation", description=FIT_HELP)
    p.add_argument("student", type=Path, help="1.x student checkpoint (a plain SD3 checkpoint gets new compensation MLPs)")
    _common(p)
    p.add_argument("--samples-per-prompt", type=int, default=4, help="noises per calibration prompt (default 4)")
    p.add_argument("--steps", type=int, default=600, help="optimiser steps per stream (default 600)")
    return p


class UsageError(ValueError):
    """A wrong flag or input: printed as one line."""


def _expected_errors() -> tuple:
    from slimengine.export.errors import CheckpointError

    return (ValueError, OSError, CheckpointError)  # UsageError, DataError and OutputPathError are ValueErrors


MAX_THREADS = 1024
MAX_SHIFT = 1000.0  # beyond it float32 sigmas saturate (the runtime refuses an infinite shift)


class Shifts(NamedTuple):
    """The flow-matching shifts a run uses: the teacher samples with `sampling`; the student's two steps take the
    sigmas of `student`, snapped to the 1000-step grid of `grid` (the teacher's training grid)."""

    sampling: float
    student: float
    grid: float


def _positive(args, *names, most: int | None = None) -> None:
    for name in names:
        value = getattr(args, name)
        if value is None or value < 1 or (most is not None and value > most):
            bound = f"from 1 to {most}" if most is not None else "at least 1"
            raise UsageError(f"--{name.replace('_', '-')} must be {bound}, got {value}")


def _regular_file(path: Path, what: str) -> None:
    """A FIFO or device as an input would hang or never end (/dev/zero): refused before it is opened."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise UsageError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(mode) and not (what == "checkpoint" and stat.S_ISDIR(mode)):
        raise UsageError(f"{path}: the {what} must be a regular file{' or a diffusers folder' if what == 'checkpoint' else ''}")


def _real_in(value, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise UsageError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def _check_memory(pairs: int, latent: tuple[int, ...]) -> None:
    """The pairs' noise and teacher samples stay in memory (float32): refused when they would not fit in half the RAM."""
    need = pairs * math.prod(latent) * 4 * 2
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > ram // 2:
        raise UsageError(f"{pairs} pairs of {'x'.join(map(str, latent))} latents need {need / 2**30:.1f} GiB, more than half of "
                         f"this machine's {ram / 2**30:.0f} GiB: lower --samples-per-prompt or the prompts")


def _check_output(args, model_path: Path) -> None:
    """The output: a .safetensors file we may write, never one of the inputs nor inside one."""
    from slimengine.staging import output_file

    if args.output.suffix != ".safetensors":
        raise UsageError(f"the output must be a .safetensors file, got {args.output}")
    output_file(args.output, inputs=[model_path, args.pipeline, args.prompts])


def _setup(args, model_path: Path):
    """Checked before any work (after _check_output): the checkpoint, the range, the device, the prompts, the pipeline.
    Returns (checkpoint, plan, shifts, prompts, encoder pipeline, T5 length)."""
    from slimengine.export.checkpoint import load_checkpoint
    from slimengine.export.sampling_plan import make_plan, sampling_key

    from .data import load_encoder_pipeline, read_prompts

    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise UsageError(f"--device must be cpu or cuda, got {args.device!r}")
    import torch

    if args.device != "cpu" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: PyTorch sees no CUDA device here")
    _positive(args, "threads", most=MAX_THREADS)
    _positive(args, "samples_per_prompt")
    torch.set_num_threads(args.threads)
    if model_path.exists() and not model_path.is_dir():
        _regular_file(model_path, "checkpoint")
    _regular_file(args.prompts, "prompt file")
    checkpoint = load_checkpoint(model_path)
    layers = checkpoint.config.num_layers
    sampling = checkpoint.metadata.get("sampling", {})
    if not isinstance(sampling, dict):
        raise UsageError(f"{model_path}: the metadata's sampling must be an object, got {type(sampling).__name__}")
    blocks = args.skip_blocks or sampling_key(sampling, "skip_blocks", "cache_blocks")[1]
    if blocks is None:
        if layers < 9:
            raise UsageError(f"{model_path} has {layers} blocks and names no skipped range: pass --skip-blocks A-B (within 0-{layers - 2})")
        blocks = "2-7"
    shift = sampling.get("shift")
    shift = _real_in(shift if shift is not None else _scheduler_shift(args.pipeline) or 3.0, "the shift (metadata sampling.shift)",
                     1e-3, MAX_SHIFT)
    teacher_shift = sampling.get("teacher_shift")
    teacher_shift = _real_in(teacher_shift if teacher_shift is not None else shift, "the metadata's sampling.teacher_shift", 1e-3, MAX_SHIFT)
    shifts = Shifts(sampling=shift, student=shift, grid=teacher_shift)
    if getattr(args, "shift", None) is not None:  # distill-1x --shift: the student's own
        shifts = shifts._replace(student=_real_in(args.shift, "--shift", 1e-3, MAX_SHIFT))
    # The student's program: two steps, the second skipping the range, no CFG (docs/distill.md).
    plan = make_plan(layers, True, steps=2, shift=shifts.student, teacher_shift=shifts.grid, skip_blocks=blocks, guidance_scale=1.0)
    if not 0 < plan.sigmas[1] < 1:  # on the teacher's 1000-step grid a tiny or huge shift puts it on an end: one step does nothing
        raise UsageError(f"the student's shift {shifts.student:g} puts its middle step at sigma {plan.sigmas[1]:g} on the teacher's "
                         "grid: one of its two steps would do nothing; give a larger --shift (0.01 and up)")
    plan.validate(layers, True)
    prompts = read_prompts(args.prompts)
    c = checkpoint.config
    _check_memory(len(prompts) * args.samples_per_prompt, (c.in_channels, c.sample_size, c.sample_size))
    length = args.max_sequence_length
    if length is None:
        trained = checkpoint.metadata.get("pipeline", {}).get("max_sequence_length") if isinstance(checkpoint.metadata.get("pipeline"), dict) else None
        length = trained if isinstance(trained, int) and not isinstance(trained, bool) and 1 < trained <= 512 else 256
    if not 2 <= length <= 512:
        raise UsageError(f"--max-sequence-length must be from 2 to 512, got {length}")
    return checkpoint, plan, shifts, prompts, load_encoder_pipeline(args.pipeline), length


def _scheduler_shift(pipeline: Path) -> float | None:
    try:
        shift = json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text()).get("shift")
    except (OSError, ValueError, AttributeError):
        return None
    return float(shift) if isinstance(shift, (int, float)) and not isinstance(shift, bool) and shift > 0 else None


def save_student(path: Path, model, checkpoint, plan, shifts: Shifts, record: dict, key: str) -> None:
    """The student as a checkpoint export-engine reads (diffusers keys + delta_pred_*), in the source's float type, with
    the 1.x plan and `record` in its metadata; written atomically."""
    import torch
    from safetensors.torch import save_file

    from slimengine.staging import write_file_atomically

    dtype = next(iter(checkpoint.state_dict.values())).dtype
    dtype = dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    state = {k.removeprefix("transformer."): v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    metadata = {k: v for k, v in checkpoint.metadata.items() if k not in ("sampling", "training", "distill", "fit_compensation")}
    metadata.setdefault("num_attention_heads", checkpoint.config.num_attention_heads)
    first, last = plan.skip_blocks
    metadata["sampling"] = {"steps": plan.steps, "shift": shifts.student, "teacher_shift": shifts.grid, "skip_blocks": f"{first}-{last}"}
    if "distill" in checkpoint.metadata and key != "distill":
        metadata["distill"] = checkpoint.metadata["distill"]
    metadata[key] = record
    write_file_atomically(path, lambda tmp: save_file(state, str(tmp), metadata={"slimengine": json.dumps(metadata)}))


MAX_GUIDANCE = 100.0


def teacher_guidance(args, checkpoint) -> float:
    """--guidance, else the teacher's metadata sampling.guidance_scale, else SD3's 7.0; from 1 (no CFG) to 100."""
    if args.guidance is not None:
        return _real_in(args.guidance, "--guidance", 1, MAX_GUIDANCE)
    return _real_in(checkpoint.metadata["sampling"].get("guidance_scale", 7.0) if "sampling" in checkpoint.metadata else 7.0,
                    f"{checkpoint.path}: the metadata's guidance_scale (or pass --guidance)", 1, MAX_GUIDANCE)


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def distill_main(argv=None) -> int:
    from slimengine.export.sampling_plan import MAX_STEPS
    from slimengine.staging import output_file

    args = distill_parser().parse_args(argv)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    lock = None
    try:
        _positive(args, "train_steps", "batch_size", "save_every")
        _positive(args, "teacher_steps", most=MAX_STEPS)
        if not (args.lr > 0 and args.lr < 1):
            raise UsageError(f"--lr must be in (0, 1), got {args.lr}")
        if args.guidance is not None:
            _real_in(args.guidance, "--guidance", 1, MAX_GUIDANCE)
        _check_output(args, args.teacher)
        resume = args.output.with_name(args.output.name + ".resume")  # the run's state, beside the output
        output_file(resume, inputs=[args.teacher, args.pipeline, args.prompts])  # not a directory, FIFO, ... nor too long a name
        lock = _lock(args.output)
        if args.resume and not resume.is_file():
            raise UsageError(f"--resume: {resume} does not exist")
        if resume.exists() and not args.resume:
            raise UsageError(f"{resume} exists (an interrupted run): pass --resume to continue it, or delete it")
        checkpoint, plan, shifts, prompts, pipe, length = _setup(args, args.teacher)
        guidance = teacher_guidance(args, checkpoint)
        if args.batch_size > len(prompts) * args.samples_per_prompt:
            raise UsageError(f"--batch-size {args.batch_size} is more than the {len(prompts) * args.samples_per_prompt} pairs "
                             f"(prompts x --samples-per-prompt)")
    except _expected_errors() as e:
        if lock is not None:
            _unlock(lock)
        return _fail("distill-1x", e)
    try:
        return _distill(args, checkpoint, plan, shifts, prompts, pipe, length, guidance, resume, log)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: temporaries are removed on the way out; the last periodic save stands
        saved = f"; {resume} holds the last saved step: --resume continues" if resume.exists() else ""
        print(f"distill-1x: interrupted{saved}", file=sys.stderr)
        return 130
    except _expected_errors() as e:
        return _fail("distill-1x", e)
    finally:
        _unlock(lock)


def _distill(args, checkpoint, plan, shifts, prompts, pipe, length, guidance, resume: Path, log) -> int:
    import torch

    from slimengine.staging import interrupt_on_sigterm

    from .data import encode_prompts, noise, teacher_samples
    from .student import make_student, mean_loss, train

    interrupt_on_sigterm()
    start = time.perf_counter()
    teacher = checkpoint.build_model().to(args.device)
    # What the teacher samples and the run depend on: a resume file of other inputs is refused.
    key = _digest(checkpoint.sha256, prompts, plan.skip_blocks, plan.sigmas, args.samples_per_prompt, args.teacher_steps, guidance,
                  args.seed, length, args.train_steps, args.batch_size, args.lr, shifts)
    if args.resume:
        try:
            state = torch.load(resume, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"{resume}: not a readable resume file ({type(e).__name__})") from None
        if not isinstance(state, dict) or state.get("key") != key:
            raise UsageError(f"{resume} was written by a run with other inputs or settings; delete it to start over")
        data = state["data"] = _checked_state(state, resume, len(prompts), args.samples_per_prompt, checkpoint.config, args.train_steps)
        log(f"resuming at step {state['step']} of {args.train_steps}")
    else:
        text, pooled = encode_prompts(pipe, prompts, length)
        neg_text, neg_pooled = encode_prompts(pipe, [""], length)
        pairs = len(prompts) * args.samples_per_prompt
        prompt_index = torch.arange(len(prompts)).repeat(args.samples_per_prompt)
        c = checkpoint.config
        latents = noise(pairs, (c.in_channels, c.sample_size, c.sample_size), args.seed)
        target = teacher_samples(args.teacher, teacher, text[prompt_index], pooled[prompt_index], neg_text, neg_pooled, latents,
                                 args.teacher_steps, guidance, shifts.sampling, args.device, not args.quiet, threads=args.threads)
        if not torch.isfinite(target).all():
            raise UsageError(f"{args.teacher}: the teacher's samples are not finite (NaN or inf)")
        data = {"prompt": prompt_index, "noise": latents, "target": target, "text": text, "pooled": pooled}
        order = torch.Generator().manual_seed(args.seed + 1)
        state = {"key": key, "step": 0, "losses": [], "order_rng": order.get_state(), "data": data,
                 "teacher_seconds": time.perf_counter() - start}
        log(f"teacher: {pairs} samples of {len(prompts)} prompts in {state['teacher_seconds']:.0f} s")
    torch.manual_seed(args.seed)
    student = make_student(teacher).to(args.device)
    del teacher
    if "student" in state:
        try:
            student.load_state_dict(state["student"])
        except (RuntimeError, TypeError, AttributeError) as e:
            raise UsageError(f"{resume}: its student does not fit the teacher ({str(e).splitlines()[0]})") from None

    def save(s):
        from slimengine.staging import write_file_atomically

        s["student"] = student.state_dict()
        write_file_atomically(resume, lambda tmp: torch.save(s, tmp))

    try:
        save(state)
        train(student, plan, data, state, args.train_steps, args.batch_size, args.lr, args.device, not args.quiet, save, args.save_every)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:  # what _checked_state cannot see: the optimiser's state
        if not args.resume:
            raise
        raise UsageError(f"{resume}: not a valid resume file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    losses = state["losses"]
    if not all(math.isfinite(v) for v in losses) or not all(torch.isfinite(p).all() for p in student.parameters()):
        raise UsageError(f"training diverged (a non-finite loss or weight): nothing written; lower --lr ({resume} holds the last save)")
    record = {"teacher_sha256": checkpoint.sha256, "prompts": len(prompts), "samples_per_prompt": args.samples_per_prompt,
              "teacher_steps": args.teacher_steps, "guidance": guidance, "train_steps": args.train_steps, "batch_size": args.batch_size,
              "lr": args.lr, "seed": args.seed, "teacher_seconds": round(state["teacher_seconds"]),
              "first_loss": mean_loss(losses, first=True), "final_loss": mean_loss(losses, first=False),
              "seconds": round(time.perf_counter() - start)}
    save_student(args.output, student, checkpoint, plan, shifts, record, "distill")
    resume.unlink(missing_ok=True)
    log(f"wrote {args.output}: skipped blocks {plan.skip_blocks[0]}-{plan.skip_blocks[1]}, effective NFE "
        f"{plan.effective_nfe(checkpoint.config.num_layers):.2f}; final-step MSE to the teacher {record['first_loss']:.4f} -> "
        f"{record['final_loss']:.4f} in {record['seconds']} s")
    return 0


def fit_main(argv=None) -> int:
    args = fit_parser().parse_args(argv)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    try:
        _positive(args, "steps", most=10_000_000)
        if not args.skip_blocks:
            raise UsageError("--skip-blocks A-B is required: the range to fit the compensation for")
        _check_output(args, args.student)
        checkpoint, plan, shifts, prompts, pipe, length = _setup(args, args.student)
    except _expected_errors() as e:
        return _fail("fit-compensation", e)
    from slimengine.staging import interrupt_on_sigterm

    interrupt_on_sigterm()
    try:
        return _fit(args, checkpoint, plan, shifts, prompts, pipe, length, log)
    except KeyboardInterrupt:
        print("fit-compensation: interrupted; nothing written", file=sys.stderr)
        return 130
    except _expected_errors() as e:
        return _fail("fit-compensation", e)


def _fit(args, checkpoint, plan, shifts, prompts, pipe, length, log) -> int:
    import torch

    from .data import encode_prompts, noise
    from .student import fit_compensation, make_student, skip_error

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = make_student(checkpoint.build_model()).to(args.device).requires_grad_(False)
    text, pooled = encode_prompts(pipe, prompts, length)
    index = torch.arange(len(prompts)).repeat(args.samples_per_prompt)
    c = checkpoint.config
    shape = (c.in_channels, c.sample_size, c.sample_size)
    latents = noise(len(index), shape, args.seed)
    held_out = noise(len(prompts), shape, args.seed + 1)  # one fresh noise per prompt, for the report only
    identity = dataclasses.replace(plan, compensation="identity")
    before = skip_error(model, identity, held_out.to(args.device), text.to(args.device), pooled.to(args.device))
    errors = fit_compensation(model, plan, latents, text[index], pooled[index], args.steps, args.seed, args.device, not args.quiet)
    after = skip_error(model, plan, held_out.to(args.device), text.to(args.device), pooled.to(args.device))
    record = {"source_sha256": checkpoint.sha256, "prompts": len(prompts), "samples_per_prompt": args.samples_per_prompt,
              "steps": args.steps, "seed": args.seed, "delta_mse": {k: list(v) for k, v in errors.items()},
              "held_out_relative_error": {"identity": before, "fitted": after}, "seconds": round(time.perf_counter() - start)}
    save_student(args.output, model, checkpoint, plan, shifts, record, "fit_compensation")
    for name, (plain, fitted) in errors.items():
        log(f"{name} stream: MSE of step 1's Δ, reused as is {plain:.5f} -> fitted {fitted:.5f}")
    log(f"wrote {args.output}: blocks {plan.skip_blocks[0]}-{plan.skip_blocks[1]}; final latents vs the full student on "
        f"held-out noise, relative L2: Δ as is {before:.4f} -> fitted {after:.4f} ({record['seconds']} s)")
    return 0


def _lock(output: Path) -> tuple[int, Path]:
    """An exclusive lock held while a run writes `output` and its resume file: a second run to the same output is
    refused (two would overwrite each other's state). The lock file `.NAME.lock` is removed by _unlock; a lock taken on a
    file another run removed meanwhile is retaken on the new one."""
    import fcntl

    path = output.with_name(f".{output.name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"another distill-1x is writing {output} (it holds {path})") from None
        held = os.fstat(fd)
        try:
            now = os.stat(path, follow_symlinks=False)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return fd, path
        except FileNotFoundError:
            pass
        os.close(fd)


def _unlock(lock: tuple[int, Path]) -> None:
    fd, path = lock
    path.unlink(missing_ok=True)  # while still held: a run waiting on this file retakes the lock on a new one
    os.close(fd)


def _checked_state(state: dict, resume: Path, prompts: int, samples: int, config, train_steps: int) -> dict:
    """A resume file's contents, checked against this run's inputs before any of it is used (its key only says which
    run wrote it). Returns its data."""
    import torch

    def bad(what):
        return UsageError(f"{resume}: not a valid resume file ({what})")

    data = state.get("data")
    step, losses = state.get("step"), state.get("losses")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= train_steps:
        raise bad(f"step {step!r} outside 0-{train_steps}")
    if not isinstance(losses, list) or len(losses) != step or not all(isinstance(v, float) and math.isfinite(v) for v in losses):
        raise bad("its losses")
    if not isinstance(data, dict) or not isinstance(state.get("student"), dict) or not isinstance(state.get("order_rng"), torch.Tensor):
        raise bad("missing data, student or batch order")
    if not isinstance(state.get("teacher_seconds"), float):
        raise bad("teacher_seconds")
    pairs, latent = prompts * samples, (config.in_channels, config.sample_size, config.sample_size)
    expected = {"prompt": ((pairs,), torch.int64), "noise": ((pairs, *latent), torch.float32), "target": ((pairs, *latent), torch.float32)}
    for name, (shape, dtype) in expected.items():
        value = data.get(name)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or value.dtype != dtype:
            raise bad(f"data.{name} is not {dtype} {list(shape)}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise bad(f"data.{name} is not finite")
    if int(data["prompt"].min()) < 0 or int(data["prompt"].max()) >= prompts:
        raise bad("a prompt index out of range")
    for name in ("text", "pooled"):
        value = data.get(name)
        if not isinstance(value, torch.Tensor) or value.shape[0] != prompts or value.dtype != torch.float32 or not torch.isfinite(value).all():
            raise bad(f"data.{name}")
    return data


def _fail(prog: str, e: Exception) -> int:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
