"""slim_generate_prompt (ABI 0.7): prompt to image through the C ABI, bit for bit the Python binding's
Session.generate(prompt=...) (a thin call of it since ABI 0.8, here served from the session's prompt cache the C call
filled) on the tiny random pipeline of tests/pipeline_files.py; the C example program; the call's argument checks.
The session's prompt cache, progress and cancellation, threads: tests/test_prompt_session_c.py."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from slimengine import Engine, SlimError, _native
from slimengine.runtime import _TensorArg
from tests.conftest import PIPELINE_T5_LENGTH, edit_manifest
from tests.pipeline_files import NEGATIVES, PROMPTS

ROOT = Path(__file__).resolve().parents[1]
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


def c_generate(session, prompts, negatives=None, *, height=64, width=64, latents_out=True, image_capacity=None, latents=None, **fields):
    """slim_generate_prompt through ctypes: (status, image uint8 [B, H, W, 3], latents or None, stats, last error)."""
    lib = _native.lib()
    params = _native.params(_native.PromptParams)
    encoded = [None if p is None else p.encode() if isinstance(p, str) else p for p in prompts]
    params.prompts = (ctypes.c_char_p * len(encoded))(*encoded)
    params.prompt_count = len(encoded)
    if negatives is not None:
        params.negative_prompts = (ctypes.c_char_p * len(negatives))(*[n.encode() if isinstance(n, str) else n for n in negatives])
    params.height, params.width = height, width
    known = {name for name, _ in params._fields_}
    for name, value in fields.items():
        if name not in known:  # ctypes would keep it as a plain attribute: the call would not see it
            raise AttributeError(f"slim_prompt_params has no field {name!r}")
        setattr(params, name, value)
    if latents is not None:
        latents_arg = _TensorArg(latents)
        params.latents = latents_arg.pointer()
    default = 8 * session._engine.config["default_latent_size"]  # height/width 0: the bundle's default size
    h, w = height or default, width or default
    image = np.zeros((len(prompts), h, w, 3), np.uint8)
    out = np.zeros((len(prompts), 16, h // 8, w // 8), np.float32) if latents_out else None
    stats = _native.PromptStats(struct_size=ctypes.sizeof(_native.PromptStats))
    status = lib.slim_generate_prompt(session._handle, ctypes.byref(params), image.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                      image.size if image_capacity is None else image_capacity,
                                      None if out is None else out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                      0 if out is None else out.size, ctypes.byref(stats))
    return status, image, out, stats, lib.slim_last_error().decode()


@pytest.mark.parametrize("num_steps", [None, 3], ids=["bundle-program", "3-steps"])
def test_c_image_equals_python_cfg_batch2(engine, num_steps):
    """CFG on, batch 2, negative prompts, an over-long unicode prompt: the same image and latents bits as Python."""
    session = engine.session()
    status, image, latents, stats, error = c_generate(session, PROMPTS, NEGATIVES, height=64, width=80, seed=11, guidance_scale=5.0,
                                                      num_steps=num_steps or 0)
    assert status == 0, error
    want = session.generate(prompt=PROMPTS, negative_prompt=NEGATIVES, seed=11, guidance_scale=5.0, height=64, width=80,
                            num_steps=num_steps)
    assert want.stats["prompt_cache"]["hits"] == 4  # the four texts the C call encoded
    assert np.array_equal(image, want.image) and np.array_equal(latents, want.latents)
    assert (stats.batch, stats.height, stats.width, stats.steps) == (2, 64, 80, num_steps or 28)
    assert stats.encoder_calls == 3 * 4  # four distinct texts, three encoders each
    assert (stats.prompt_cache_hits, stats.prompt_cache_misses, stats.prompt_cache_size, stats.prompt_cache_capacity) == (0, 4, 4, 16)
    assert (stats.blocks_run, stats.stage_calls, stats.flop_fraction) == (want.stats["blocks_run"], want.stats["stage_calls"],
                                                                        want.stats["flop_fraction"])
    assert stats.backend_ms > 0
    # Only token ids go in and the image and latents come out: the conditioning and the latents stay in the session's
    # buffers from the encoders to the VAE. The C call encoded four texts; the Python call found them all in the cache.
    ids_per_text = (2 * 77 + T5_LENGTH) * 8  # int64 ids: CLIP-L, CLIP-G, T5
    assert want.stats["transfer_bytes"] == image.nbytes + latents.nbytes
    assert stats.transfer_bytes == 4 * ids_per_text + image.nbytes + latents.nbytes
    assert min(stats.tokenize_ms, stats.clip_l_ms, stats.clip_g_ms, stats.t5_ms, stats.steps_ms, stats.vae_decode_ms) > 0
    assert stats.total_ms >= stats.steps_ms + stats.vae_decode_ms
    session.close()


def test_c_defaults_and_seeded_noise_and_given_latents(engine):
    """Default size and guidance (the bundle's), the default negative "" (NULL), repeated texts encoded once; given latents."""
    session = engine.session()
    status, image, latents, stats, error = c_generate(session, ["a cat", "a cat"], None, height=0, width=0, seed=4, num_steps=2)
    assert status == 0, error
    want = session.generate(prompt=["a cat", "a cat"], seed=4, num_steps=2)
    assert np.array_equal(image, want.image) and np.array_equal(latents, want.latents)
    assert stats.encoder_calls == 3 * 2  # "a cat" and "" once each
    assert (stats.prompt_cache_hits, stats.prompt_cache_misses) == (2, 2)  # the second "a cat" and "" were found in the call
    noise = np.random.default_rng(0).standard_normal((1, 16, 8, 8)).astype(np.float32)
    want = session.generate(prompt="a dog", latents=noise, guidance_scale=3.0, num_steps=2)
    status, image, _, stats, error = c_generate(session, ["a dog"], [None], latents=noise, latents_out=False, guidance_scale=3.0,
                                                num_steps=2)
    assert status == 0, error
    assert np.array_equal(image[0], want.image)
    assert stats.transfer_bytes == noise.nbytes + image.nbytes  # texts from the cache: given latents in, the image out
    session.close()


def test_c_image_equals_python_without_t5(folder, sd3_pipeline_no_t5_bundle):
    bundle = sd3_pipeline_no_t5_bundle
    with Engine(bundle) as engine:
        session = engine.session()
        status, image, latents, stats, error = c_generate(session, PROMPTS, NEGATIVES, seed=2, guidance_scale=4.0, num_steps=3)
        assert status == 0, error
        want = session.generate(prompt=PROMPTS, negative_prompt=NEGATIVES, seed=2, guidance_scale=4.0, num_steps=3)
        assert np.array_equal(image, want.image) and np.array_equal(latents, want.latents)
        assert stats.encoder_calls == 2 * 4 and stats.t5_ms == 0
        session.close()


def test_c_program_writes_the_python_image(engine, bundle, tmp_path):
    """runtime/examples/prompt_example.c, compiled here against the installed library, from a prompt string to a PPM."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    lib_dir = _native.library_path().parent
    exe = tmp_path / "prompt-example"
    subprocess.run([cc, "-std=c99", "-Wall", "-Werror", f"-I{ROOT / 'runtime/include'}", str(ROOT / "runtime/examples/prompt_example.c"),
                    f"-L{lib_dir}", "-lslimengine", f"-Wl,-rpath,{lib_dir}", "-o", str(exe)], check=True)
    # Only ONNX Runtime's location: the tokenizers are native, so the program never loads Python. LD_DEBUG=files names
    # every shared object the dynamic loader maps, at start and by dlopen (ONNX Runtime, its providers): no libpython.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_"))}
    env.update(SLIMENGINE_ORT_LIBRARY=_native.onnxruntime_library(), LD_DEBUG="files")
    out = tmp_path / "out.ppm"
    proc = subprocess.run([str(exe), str(bundle), "a red circle", "--negative", "blurry", "--seed", "9", "--size", "64",
                           "--guidance", "4.5", "--steps", "3", "--out", str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    loaded = [line for line in proc.stderr.splitlines() if "file=" in line and "generating link map" in line]
    assert any("libonnxruntime" in line for line in loaded) and any("libslimengine" in line for line in loaded), loaded
    assert not [line for line in loaded if "libpython" in line], "the C program mapped libpython"
    proc.stderr = "\n".join(line for line in proc.stderr.splitlines() if not line.lstrip().startswith(tuple("0123456789")))
    assert "vae_decode" in proc.stdout and "3 steps" in proc.stdout
    assert [line for line in proc.stderr.splitlines() if line.startswith("step ")] == ["step 1/3", "step 2/3", "step 3/3"]  # progress
    # The second call in the same session: both texts from the prompt cache, no encoder run, the same bits.
    assert "again: prompt cache 2 hits, 0 misses, 0 encoder calls" in proc.stdout and "same image: yes" in proc.stdout
    want = engine.session().generate(prompt="a red circle", negative_prompt="blurry", seed=9, height=64, width=64, guidance_scale=4.5,
                                     num_steps=3).image
    data = out.read_bytes()
    header = b"P6\n64 64\n255\n"
    assert data.startswith(header)
    assert np.array_equal(np.frombuffer(data[len(header):], np.uint8).reshape(64, 64, 3), want)
    proc = subprocess.run([str(exe), str(bundle), "x", "--size", "60"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "multiple of 16" in proc.stderr


def test_c_call_arguments_checked(engine, bundle, tmp_path):
    session = engine.session()
    invalid = 1  # SLIM_ERR_INVALID_ARGUMENT

    def refused(*args, **kw):
        status, image, latents, _, error = c_generate(session, *args, **kw)
        assert status == invalid and not image.any() and (latents is None or not latents.any()), (status, error)
        return error

    assert "prompts[1] is NULL" in refused(["a", None], num_steps=1)
    assert "prompts[0] is not UTF-8" in refused([b"caf\xe9"], num_steps=1)
    assert "negative_prompts[0] is not UTF-8" in refused(["a"], [b"\xed\xa0\x80"], num_steps=1, guidance_scale=2.0)  # a surrogate
    assert "multiple of 16" in refused(["a"], height=72, num_steps=1)  # 8 x patch size 2
    assert "up to" in refused(["a"], width=8 * 16 * 1000, num_steps=1)
    assert "image_capacity is 100" in refused(["a"], image_capacity=100, num_steps=1)
    assert "prompt_count must be 1 to" in c_generate(session, [], num_steps=1)[4]
    assert "shift must be" in refused(["a"], shift=-1.0, num_steps=2)
    assert "guidance_scale must be finite" in refused(["a"], guidance_scale=float("nan"))
    lib = _native.lib()
    assert lib.slim_generate_prompt(session._handle, None, None, 0, None, 0, None) == invalid
    assert "params is NULL" in lib.slim_last_error().decode()
    session.close()

    copy = tmp_path / "no_pipeline.engine"
    shutil.copytree(bundle, copy)
    edit_manifest(copy, lambda m: m.pop("pipeline"))
    with Engine(copy) as plain:
        s = plain.session()
        error = c_generate(s, ["a"], num_steps=1)[4]
        assert "no pipeline stages" in error and "export-engine PIPELINE_FOLDER" in error
        s.close()
    # The manifest's pipeline block is checked against the stages at open.
    edit_manifest(copy, lambda m: m.update(pipeline={**json.loads((bundle / "manifest.json").read_text())["pipeline"], "t5": False}))
    with pytest.raises(SlimError, match=r"pipeline\.t5.*is false but a stage has role t5"):
        Engine(copy)


@pytest.mark.parametrize("field, value", [("scaling_factor", 1e-50), ("scaling_factor", 1e300), ("shift_factor", 1e300),
                                          ("scheduler_shift", 1e300)])
def test_pipeline_numbers_that_float32_cannot_hold_are_refused_at_open(bundle, tmp_path, field, value):
    """The decode and the plan compute in float32: a scaling_factor of 1e-50 became 0 there (NaN latents at the VAE, an
    error naming the VAE's input), 1e300 inf. Now the bundle is refused at open, naming the field."""
    copy = tmp_path / "edited.engine"
    shutil.copytree(bundle, copy)

    def edit(m):
        (m["pipeline"] if field == "scheduler_shift" else m["pipeline"]["vae"])[field] = value

    edit_manifest(copy, edit)
    with pytest.raises(SlimError, match=rf"pipeline\..*{field}"):
        Engine(copy)


def test_a_vae_that_makes_nan_is_an_error_not_a_black_image(bundle, tmp_path):
    """A vae_decode stage with a NaN weight (a hostile or broken bundle: the exporter refuses NaN weights) made NaN
    pixels, written as 0: a silently black image. Now SLIM_ERR_NUMERICS naming the stage, and no image is written."""
    import hashlib

    copy = tmp_path / "nan-vae.engine"
    shutil.copytree(bundle, copy)
    data = copy / "stages" / "vae_decode.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[:4] = np.array([np.nan], np.float32).tobytes()  # the first float32 of the VAE's weights
    data.write_bytes(bytes(raw))
    edit_manifest(copy, lambda m: m["files"]["stages/vae_decode.onnx.data"].update(sha256=hashlib.sha256(raw).hexdigest()))
    with Engine(copy) as nan_engine:
        session = nan_engine.session()
        status, image, _, _, error = c_generate(session, ["a red circle"], num_steps=1)
        assert status == 7 and "stage vae_decode produced NaN" in error, (status, error)
        assert not image.any()
        session.close()


def test_a_null_image_out_is_named_as_null(engine):
    """image_out NULL was reported as "image_out must hold ... 3072 bytes, image_capacity is 3072": a capacity that
    looked right. The message names the NULL."""
    lib = _native.lib()
    params = _native.params(_native.PromptParams)
    params.prompts = (ctypes.c_char_p * 1)(b"a")
    params.prompt_count, params.height, params.width, params.num_steps = 1, 32, 32, 1
    session = engine.session()
    try:
        assert lib.slim_generate_prompt(session._handle, ctypes.byref(params), None, 32 * 32 * 3, None, 0, None) == 1
        assert "slim_generate_prompt: image_out is NULL" in lib.slim_last_error().decode()
    finally:
        session.close()
