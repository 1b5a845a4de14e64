"""Prompt to image (Session.generate(prompt=...), `slimengine generate`; docs/pipeline.md, "Runtime") against diffusers'
StableDiffusion3Pipeline loaded from the same tiny random pipeline folder (tests/pipeline_files.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from slimengine import Engine, ImageResult, SlimError
from tests.conftest import PIPELINE_T5_LENGTH, edit_manifest
from tests.pipeline_files import NEGATIVES, PROMPTS

T5_LENGTH = PIPELINE_T5_LENGTH


@pytest.fixture(scope="module")
def folder(sd3_pipeline):
    return sd3_pipeline


@pytest.fixture(scope="module")
def bundle(sd3_pipeline_bundle):
    return sd3_pipeline_bundle


@pytest.fixture(scope="module")
def engine(bundle):
    with Engine(bundle) as engine:
        yield engine


def _diffusers(folder, **components):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, torch_dtype=torch.float32, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(folder):
    return _diffusers(folder)


def _uint8(np_images) -> np.ndarray:
    """diffusers' output_type="np" (floats in [0, 1], NHWC) to uint8 as its numpy_to_pil does."""
    return (np_images * 255).round().astype("uint8")


def _noise(batch, height, width, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 16, height // 8, width // 8)).astype(np.float32)


def _compare(got, want):
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert got.shape == want.shape and got.dtype == np.uint8
    assert diff.mean() <= 0.5 and diff.max() <= 2, (diff.mean(), diff.max())


@pytest.mark.parametrize("num_steps", [None, 4], ids=["bundle-program", "4-steps"])
def test_matches_diffusers_cfg(engine, reference, num_steps):
    """Same prompts, negative prompts and initial latents, CFG on: the bundle's 28-step program (the folder's scheduler
    shift) and a 4-step plan (num_steps takes the pipeline's scheduler shift, as diffusers' scheduler does)."""
    height, width, guidance = 64, 80, 5.0
    noise = _noise(2, height, width)
    session = engine.session()
    result = session.generate(prompt=PROMPTS, negative_prompt=NEGATIVES, latents=noise, guidance_scale=guidance, num_steps=num_steps)
    with torch.no_grad():
        want = reference(PROMPTS, negative_prompt=NEGATIVES, latents=torch.from_numpy(noise), guidance_scale=guidance,
                         num_inference_steps=num_steps or 28, height=height, width=width, max_sequence_length=T5_LENGTH,
                         output_type="np").images
    assert isinstance(result, ImageResult) and result.image.shape == (2, height, width, 3)
    _compare(result.image, _uint8(want))
    assert result.stats["steps"] == (num_steps or 28)
    assert set(result.stats["stage_ms"]) == {"tokenize", "clip_l", "clip_g", "t5", "steps", "vae_decode"}
    session.close()


def test_single_prompt_seeded_and_pil(engine, reference):
    """A str prompt gives [H, W, 3]; seeded noise is the runtime's (slimengine.noise), passed to diffusers as latents."""
    from slimengine.noise import seeded_latents

    session = engine.session()
    result = session.generate(prompt=PROMPTS[0], seed=7, num_steps=3, guidance_scale=4.0)
    assert result.image.shape == (64, 64, 3)
    noise = seeded_latents((1, 16, 8, 8), 7)
    with torch.no_grad():
        want = reference(PROMPTS[0], latents=torch.from_numpy(noise), guidance_scale=4.0, num_inference_steps=3, height=64, width=64,
                         max_sequence_length=T5_LENGTH, output_type="np").images
    _compare(result.image, _uint8(want)[0])
    pil = result.pil()
    assert pil.mode == "RGB" and pil.size == (64, 64) and np.array_equal(np.asarray(pil), result.image)
    session.close()


def test_prompt_cache_hit_equals_miss(engine):
    session = engine.session(prompt_cache=2)
    first = session.generate(prompt="a green triangle", seed=3, num_steps=2)
    assert first.stats["prompt_cache"] == {"hits": 0, "misses": 2, "size": 2, "capacity": 2}  # the prompt and ""
    assert first.stats["encoder_calls"] == {"clip_l": 2, "clip_g": 2, "t5": 2}
    again = session.generate(prompt="a green triangle", seed=3, num_steps=2)
    assert again.stats["prompt_cache"]["hits"] == 2 and again.stats["prompt_cache"]["misses"] == 0
    assert again.stats["encoder_calls"] == {"clip_l": 0, "clip_g": 0, "t5": 0}  # a hit skips every encoder stage
    assert again.stats["stage_ms"]["clip_l"] == 0 and again.stats["stage_ms"]["tokenize"] == 0
    assert np.array_equal(first.image, again.image) and np.array_equal(first.latents, again.latents)
    # a session without a cache: the same bits, every prompt encoded
    uncached = engine.session(prompt_cache=0)
    for _ in range(2):
        r = uncached.generate(prompt="a green triangle", seed=3, num_steps=2)
        assert r.stats["prompt_cache"] == {"hits": 0, "misses": 2, "size": 0, "capacity": 0}
        assert np.array_equal(r.latents, first.latents) and np.array_equal(r.image, first.image)
    # LRU: "" was used last, so a new prompt evicts "a green triangle"; "" stays a hit
    r = session.generate(prompt="a blue square", seed=3, num_steps=2)
    assert r.stats["prompt_cache"]["hits"] == 1 and r.stats["prompt_cache"]["misses"] == 1
    r = session.generate(prompt="a green triangle", seed=3, num_steps=2)
    assert r.stats["prompt_cache"]["misses"] == 1 and r.stats["encoder_calls"]["clip_l"] == 1
    session.clear_prompt_cache()
    assert session.generate(prompt="a blue square", seed=3, num_steps=2).stats["prompt_cache"]["misses"] == 2
    session.close()
    uncached.close()


def test_no_cfg_encodes_no_negative(engine):
    session = engine.session()
    r = session.generate(prompt="a red circle", negative_prompt="ignored", guidance_scale=1.0, num_steps=2)
    assert r.stats["prompt_cache"]["misses"] == 1 and r.stats["encoder_calls"]["t5"] == 1
    session.close()


def test_arguments_checked(engine):
    session = engine.session()
    with pytest.raises(TypeError, match="not both"):
        session.generate(np.zeros((1, 109, 96), np.float32), np.zeros((1, 64), np.float32), prompt="x")
    with pytest.raises(TypeError, match="negative_prompt"):
        session.generate(np.zeros((1, 109, 96), np.float32), np.zeros((1, 64), np.float32), negative_prompt="x")
    with pytest.raises(ValueError, match="multiple of 16 .the VAE.s scale factor 8"):
        session.generate(prompt="x", height=60)
    with pytest.raises(ValueError, match="up to 256 .image pixels., got 264"):
        session.generate(prompt="x", width=264)
    with pytest.raises(TypeError, match="as long as prompt"):
        session.generate(prompt=["a", "b"], negative_prompt=["c"])
    with pytest.raises(TypeError, match="prompt_cache"):
        engine.session(prompt_cache=None)
    session.close()


def test_embeddings_path_unchanged(engine):
    """generate(embeddings) still returns the latents only, as before."""
    session = engine.session()
    rng = np.random.default_rng(0)
    embeds, pooled = rng.standard_normal((1, 109, 96), dtype=np.float32), rng.standard_normal((1, 64), dtype=np.float32)
    r = session.generate(embeds, pooled, guidance_scale=1.0, num_steps=2)
    assert not isinstance(r, ImageResult) and r.latents.shape == (1, 16, 8, 8)
    session.close()


def test_without_t5_matches_diffusers(folder, sd3_pipeline_no_t5_bundle):
    """A --no-t5 bundle uses zeros in T5's place, as diffusers does without text_encoder_3."""
    bundle = sd3_pipeline_no_t5_bundle
    noise = _noise(1, 64, 64, seed=5)
    with Engine(bundle) as engine:
        result = engine.session().generate(prompt=PROMPTS[0], latents=noise, num_steps=3, guidance_scale=3.0)
    assert set(result.stats["encoder_calls"]) == {"clip_l", "clip_g"}
    pipe = _diffusers(folder, text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        want = pipe(PROMPTS[0], latents=torch.from_numpy(noise), guidance_scale=3.0, num_inference_steps=3, height=64, width=64,
                    max_sequence_length=T5_LENGTH, output_type="np").images
    _compare(result.image, _uint8(want)[0])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "slimengine.cli", "generate", *map(str, args)], capture_output=True, text=True)


def test_cli_writes_the_python_image(engine, bundle, tmp_path):
    from PIL import Image

    out = tmp_path / "out.png"
    proc = _cli(bundle, "a red circle", "-o", out, "--negative", "blurry", "--seed", 11, "--size", "64x80", "--guidance", 4.5,
                "--steps", 3, "--xslim", "none")
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and "vae_decode" in proc.stdout
    session = engine.session()
    want = session.generate(prompt="a red circle", negative_prompt="blurry", seed=11, height=64, width=80, guidance_scale=4.5,
                            num_steps=3, xslim="none").image
    session.close()
    with Image.open(out) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), want)


def test_cli_refuses_a_bundle_without_pipeline(bundle, tmp_path):
    copy = tmp_path / "plain.engine"
    shutil.copytree(bundle, copy)
    edit_manifest(copy, lambda m: m.pop("pipeline"))
    proc = _cli(copy, "a red circle", "-o", tmp_path / "x.png", "-q")
    assert proc.returncode == 1 and "no pipeline stages" in proc.stderr
    assert "export-engine PIPELINE_FOLDER" in proc.stderr and "--pipeline" in proc.stderr
    assert not (tmp_path / "x.png").exists()
    with Engine(copy) as engine, pytest.raises(SlimError, match="no pipeline stages"):
        engine.session().generate(prompt="x")


@pytest.mark.parametrize("args, message", [(("--size", "0"), "height"), (("--steps", "-1"), "steps must be in"),
                                           (("--size", "65"), "multiple of")])
def test_cli_values_out_of_range_are_usage_errors(bundle, tmp_path, args, message):
    """Out-of-range values exited 1 (a failed call) instead of 2 (a usage error, as docs/pipeline.md says)."""
    proc = _cli(bundle, "a red circle", "-o", tmp_path / "x.png", "-q", *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_cli_checks_the_output_path_before_generating(bundle, tmp_path):
    """A missing output directory was found only after the whole generation; now at once, exit 2. A directory as the
    output is refused too, and a successful write leaves no temporary beside the PNG."""
    proc = _cli(bundle, "a red circle", "-o", tmp_path / "missing" / "x.png", "-q", "--steps", "1000")
    assert proc.returncode == 2 and "no directory" in proc.stderr, proc.stderr
    proc = _cli(bundle, "a red circle", "-o", tmp_path, "-q")
    assert proc.returncode == 2 and "is a directory" in proc.stderr, proc.stderr
    proc = _cli(bundle, "a red circle", "-o", tmp_path / "ok.png", "-q", "--steps", "1", "--size", "32")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.png"]


@pytest.fixture(scope="module")
def student(folder, workdir):
    """A 1.x-Distill student (compensation MLPs, skipped blocks 1-2 of 4) that fits the tiny pipeline, written by
    make-sd3-checkpoint's own functions, and its fp32 bundle with the folder's encoders, VAE and tokenizers."""
    import json

    from slimengine.export.sd3_model import SD3Config
    from slimengine.tools.make_sd3_checkpoint import random_state_dict, write_checkpoint
    from tests.conftest import export

    t = json.loads((folder / "transformer" / "config.json").read_text())
    config = SD3Config(num_layers=4, in_channels=16, out_channels=16, patch_size=2,
                       **{k: t[k] for k in ("num_attention_heads", "attention_head_dim", "joint_attention_dim", "caption_projection_dim",
                                            "pooled_projection_dim", "pos_embed_max_size", "sample_size")})
    path = workdir / "student-for-pipeline.safetensors"
    metadata = {"num_attention_heads": config.num_attention_heads, "sample_size": config.sample_size,
                "sampling": {"skip_blocks": "1-2", "steps": 3}}
    write_checkpoint(random_state_dict(config, True, 4, torch.float32), config, metadata, path, "safetensors")
    bundle = export(path, workdir / "student-for-pipeline.engine", "--pipeline", str(folder), "--precision", "fp32",
                    "--max-sequence-length", str(T5_LENGTH))
    return path, bundle


def test_student_from_prompts_matches_pytorch_reference(student, reference):
    """The 1.x student from prompt strings, CFG and negative prompts on, against PyTorch: diffusers' encode_prompt for the
    conditioning, the project's reference sampler of the 1.x plan (reference_sampler.reference_generate) for the
    latents, diffusers' VAE decode and numpy_to_pil's uint8 conversion (measured: mean |Δ| 3.3e-4, max 1)."""
    import json

    from slimengine.export.checkpoint import load_checkpoint
    from slimengine.export.reference_sampler import reference_generate
    from slimengine.export.sampling_plan import make_plan
    from tests.pipeline_files import SCALING, SCHEDULER_SHIFT, SHIFT_FACTOR

    path, bundle = student
    height, width, guidance = 64, 80, 4.0
    noise = _noise(2, height, width, seed=9)
    with Engine(bundle) as engine:
        session = engine.session()
        result = session.generate(prompt=PROMPTS, negative_prompt=NEGATIVES, latents=noise, guidance_scale=guidance)
        session.close()
    assert result.stats["steps"] == 3
    checkpoint = load_checkpoint(path)
    plan = make_plan(checkpoint.config.num_layers, True, checkpoint.metadata, shift=SCHEDULER_SHIFT)  # the folder's scheduler shift
    program = json.loads((bundle / "manifest.json").read_text())["program"]
    assert plan.skip_blocks == (1, 2) and [s["sigma"] for s in program["steps"]] == pytest.approx(plan.sigmas[:-1], rel=1e-6)
    with torch.no_grad():
        embeds, negative_embeds, pooled, negative_pooled = reference.encode_prompt(
            PROMPTS, PROMPTS, PROMPTS, negative_prompt=NEGATIVES, do_classifier_free_guidance=True, max_sequence_length=T5_LENGTH)
        latents = reference_generate(checkpoint.build_model(), plan, embeds, pooled, torch.from_numpy(noise), negative_embeds,
                                     negative_pooled, guidance_scale=guidance).latents
        decoded = reference.vae.decode(latents / SCALING + SHIFT_FACTOR, return_dict=False)[0]
    want = _uint8(reference.image_processor.postprocess(decoded, output_type="np"))
    assert np.abs(result.latents - latents.numpy()).max() < 1e-3 * np.abs(latents.numpy()).max()
    _compare(result.image, want)


def test_progress_ticks_each_step_and_an_exception_cancels(engine):
    """progress(phase, step, total) from the runtime's callback: encode, each tokenizer call, each sampling step, decode; an
    exception it raises cancels the runtime call, reaches the caller, and the session goes on (the same image as an
    uncancelled call)."""
    session = engine.session(prompt_cache=0)
    seen = []
    first = session.generate(prompt="a red circle", seed=2, num_steps=3, progress=lambda *tick: seen.append(tick))
    tokenize = [("tokenize", i, 3) for i in range(3)]  # clip_l, clip_g, t5 of the prompt, then of the negative ""
    assert seen == [("encode", 0, 1), *tokenize, *tokenize, ("step", 0, 3), ("step", 1, 3), ("step", 2, 3), ("decode", 0, 1)]

    class Stop(Exception):
        pass

    def stop(phase, step, total):
        if phase == "step" and step == 1:
            raise Stop

    with pytest.raises(Stop):
        session.generate(prompt="a red circle", seed=2, num_steps=3, progress=stop)
    again = session.generate(prompt="a red circle", seed=2, num_steps=3)
    assert np.array_equal(again.image, first.image) and np.array_equal(again.latents, first.latents)
    session.close()


def test_cli_progress_bar_counts_the_sampling_steps(bundle, tmp_path):
    """On a terminal (a pseudo-terminal here) the bar ticks once per sampling step, from the runtime's progress callback."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide: tqdm draws nothing
    try:
        proc = subprocess.run([sys.executable, "-m", "slimengine.cli", "generate", str(bundle), "a red circle", "-o",
                               str(tmp_path / "out.png"), "--steps", "5", "--size", "64"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=slave, text=True, timeout=300)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed and everything was read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    bar = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, bar
    assert "5/5" in bar and "step" in bar, bar  # (it counted the 3 phases before ABI 0.8)
