"""What distillation trains on: prompts, their conditioning by the pipeline's own encoders, and the teacher's samples."""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

MAX_PROMPT_CHARS = 10_000  # a longer line is a wrong file, not a prompt


class DataError(ValueError):
    """Unusable input (prompt file, pipeline folder): one line for the user."""


MAX_PROMPT_FILE = 64 << 20


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped. A regular file of at most 64 MiB."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PROMPT_FILE + 1)
        if len(raw) > MAX_PROMPT_FILE:
            raise DataError(f"{path}: larger than {MAX_PROMPT_FILE >> 20} MiB: not a prompt file")
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file of prompts") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the prompt file ({e.strerror or e})") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise DataError(f"{path}: no prompts (one per line; blank lines and # comments are skipped)")
    long = next((i for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARS), None)
    if long is not None:
        raise DataError(f"{path}: prompt {long + 1} is {len(prompts[long])} characters long (at most {MAX_PROMPT_CHARS})")
    if "\0" in text:
        raise DataError(f"{path}: contains a NUL character")
    return prompts


def load_encoder_pipeline(folder: Path):
    """diffusers' StableDiffusion3Pipeline of `folder` without transformer and VAE: its encode_prompt is the reference."""
    from diffusers import StableDiffusion3Pipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise DataError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Their loading bars and notices are noise on a command line that prints one line per error.
    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # diffusers' torch_dtype -> dtype renaming
            pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), transformer=None, vae=None, torch_dtype=torch.float32)
    except Exception as e:  # diffusers' errors are long; the first line names the problem
        raise DataError(f"{folder}: cannot load the text encoders ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], max_sequence_length: int, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt [P, L, J] and pooled [P, D] embeddings, exactly as diffusers' SD3 pipeline computes them."""
    text, pooled = [], []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        t, _, p, _ = pipe.encode_prompt(chunk, chunk, chunk, device="cpu", do_classifier_free_guidance=False,
                                        max_sequence_length=max_sequence_length)
        text.append(t.float())
        pooled.append(p.float())
    return torch.cat(text), torch.cat(pooled)


def noise(count: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian starting latents [count, *shape] of torch's CPU generator: the training pairs' noise (the engine's own
    seeded noise is Philox: evaluation seeds never meet training noise)."""
    return torch.randn(count, *shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def teacher_samples(teacher_path: Path, teacher_model, text, pooled, neg_text, neg_pooled, latents, steps: int, guidance: float,
                    shift: float, device: str, progress: bool, chunk: int = 128, threads: int = 0) -> torch.Tensor:
    """The teacher's `steps`-step CFG sample from each latent (conditioning `text[i]`, `pooled[i]`). On the CPU through
    the engine (a bundle of the teacher exported to a temporary folder: about 2x faster than PyTorch here,
    docs/distill-1x.md); elsewhere by the PyTorch reference loop on `device` (untested on GPUs here)."""
    count = latents.shape[0]
    bar = tqdm(total=count, desc=f"teacher samples ({steps} steps, CFG {guidance:g})", unit="sample", disable=not progress,
               file=sys.stderr)
    out = []
    if device == "cpu":
        import slimengine as se
        from slimengine.export.cli import main as export_main

        with tempfile.TemporaryDirectory(prefix="distill-teacher-") as tmp:
            bundle = Path(tmp) / "teacher.engine"
            said = io.StringIO()  # the export's own lines: shown with progress, or when it fails
            with contextlib.redirect_stderr(said):
                code = export_main([str(teacher_path), "-o", str(bundle), "--skip-blocks", "none", "-q"])
            if progress or code not in (0, 130):
                sys.stderr.write(said.getvalue())
            if code == 130:
                raise KeyboardInterrupt
            if code != 0:
                raise DataError(f"{teacher_path}: the teacher did not export (its error is above)")
            with se.open_engine(bundle, intra_op_threads=threads) as engine, engine.session() as session:
                for i in range(0, count, chunk):
                    n = min(chunk, count - i)
                    r = session.generate(text[i:i + n].numpy(), pooled[i:i + n].numpy(), latents=latents[i:i + n].numpy(),
                                         negative_prompt_embeds=neg_text.expand(n, -1, -1).numpy(),
                                         negative_pooled_embeds=neg_pooled.expand(n, -1).numpy(), guidance_scale=guidance,
                                         num_steps=steps, shift=shift)
                    out.append(torch.from_numpy(np.array(r.latents)))
                    bar.update(n)
    else:
        from slimengine.export.sampling_plan import make_plan

        from .student import run_program

        plan = make_plan(teacher_model.num_layers, False, steps=steps, guidance_scale=guidance, shift=shift, skip_blocks="none")
        for i in range(0, count, chunk):
            n = min(chunk, count - i)
            xs = run_program(teacher_model, plan, latents[i:i + n].to(device), text[i:i + n].to(device), pooled[i:i + n].to(device),
                             neg_text.expand(n, -1, -1).to(device), neg_pooled.expand(n, -1).to(device))
            out.append(xs[-1].cpu())
            bar.update(n)
    bar.close()
    return torch.cat(out)
