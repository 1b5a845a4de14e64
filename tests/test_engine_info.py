"""ABI 0.5's run-time ABI version and typed engine introspection (slim_engine_get_info, slim_engine_program_step),
checked against the manifest JSON of real exported bundles."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import numpy as np
import pytest

import slimengine as se
from slimengine import _native

from .conftest import edit_manifest


def test_the_abi_version_is_queryable_at_run_time():
    lib = _native.lib()
    major, minor = ctypes.c_int32(-1), ctypes.c_int32(-1)
    lib.slim_abi_version(ctypes.byref(major), ctypes.byref(minor))
    assert (major.value, minor.value) == se.abi_version() == (_native.ABI_MAJOR, _native.ABI_MINOR) == (1, 0)
    assert lib.slim_abi_version_major() == major.value
    lib.slim_abi_version(None, None)  # either pointer may be NULL
    header = _native.header_path().read_text()
    assert re.search(r"#define SLIM_ABI_VERSION_MAJOR 1\n#define SLIM_ABI_VERSION_MINOR 0\n", header)


def test_the_binding_refuses_a_library_of_another_abi(tmp_path):
    """_native.lib() checks the library's ABI: here a 0.x one (before 1.0), and one of the next major version."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    for major, minor, expected in [(0, 11, "C ABI 0.11"), (2, 0, "C ABI 2.0")]:
        src = tmp_path / "fake.cpp"
        src.write_text(f'extern "C" int slim_abi_version_major() {{ return {major}; }}\n'
                       f'extern "C" void slim_abi_version(int* a, int* b) {{ if (a) *a = {major}; if (b) *b = {minor}; }}\n')
        lib = tmp_path / f"libfake{major}{minor}.so"
        subprocess.run([cxx, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
        with pytest.raises(RuntimeError, match=rf"{expected}; this Python binding needs ABI 1\.0 or a newer 1\.x"):
            _native._check_abi(ctypes.CDLL(str(lib)), lib)
    old = tmp_path / "old.cpp"  # before 0.5 there is no slim_abi_version
    old.write_text('extern "C" int slim_abi_version_major() { return 0; }\n')
    subprocess.run([cxx, "-shared", "-fPIC", str(old), "-o", str(tmp_path / "libold.so")], check=True)
    with pytest.raises(RuntimeError, match=r"C ABI 0\.4 or older"):
        _native._check_abi(ctypes.CDLL(str(tmp_path / "libold.so")), tmp_path / "libold.so")


def check_sd3_info(engine: se.Engine) -> se.EngineInfo:
    info, m = engine.info, engine.manifest
    c, p = m["config"], m["program"]
    assert (info.family, info.precision, info.stage_count) == ("sd3", m["precision"], len(m["stages"]))
    assert (info.num_blocks, info.hidden_size, info.num_attention_heads) == (c["num_layers"], c["inner_dim"], c["num_attention_heads"])
    assert (info.latent_channels, info.patch_size) == (c["in_channels"], c["patch_size"])
    assert (info.joint_attention_dim, info.pooled_projection_dim) == (c["joint_attention_dim"], c["pooled_projection_dim"])
    assert (info.default_latent_size, info.max_latent_size) == (c["default_latent_size"], c["max_latent_size"])
    assert info.num_steps == len(p["steps"]) == len(info.steps)
    assert (info.skip_first_block, info.skip_last_block) == tuple(p["skip_blocks"] or (-1, -1))
    assert info.compensation == (p.get("compensation") or "none")
    assert info.guidance_scale == pytest.approx(p["guidance_scale"])
    assert info.has_token_stages == any(s["role"] == "block_tokens" for s in m["stages"])
    for got, step in zip(info.steps, p["steps"]):
        assert (got.sigma, got.sigma_next, got.timestep) == (step["sigma"], step["sigma_next"], step["timestep"])
        assert (got.record_delta, got.skip_range) == (step["record_delta"], step["skip_range"])
    assert (info.embed_dim, info.vocab_size, info.max_batch, info.model_version) == (0, 0, 0, 0)  # LEMUR's: 0
    return info


def test_engine_info_of_a_1x_bundle(distilled_bundle):
    info = check_sd3_info(se.open_engine(distilled_bundle))
    assert (info.skip_first_block, info.skip_last_block, info.compensation, info.xslim) == (1, 2, "mlp", "none")
    assert [s.skip_range for s in info.steps] == [False, True]


def test_engine_info_of_a_cfg_bundle(cfg_bundle):
    info = check_sd3_info(se.open_engine(cfg_bundle))
    assert (info.skip_first_block, info.compensation, info.guidance_scale, info.num_steps) == (-1, "none", 4.5, 3)


def test_engine_info_reports_the_bundles_x_slim_policy(bundle_copy):
    from slimengine.export.xslim import parse_xslim_spec

    edit_manifest(bundle_copy, lambda m: m["program"].update(xslim=parse_xslim_spec("xslim:step=0.2").to_manifest()))
    assert check_sd3_info(se.open_engine(bundle_copy)).xslim == "online"


def test_engine_info_of_a_lemur_bundle(lemur_bundle):
    engine = se.open_engine(lemur_bundle)
    info, m = engine.info, engine.manifest
    c = m["config"]
    assert (info.family, info.precision, info.stage_count) == ("lemur", "fp32", len(m["stages"]))
    for key in ("embed_dim", "vocab_size", "num_segments", "max_text_len", "max_query_len", "image_size", "max_frames", "max_batch",
                "max_history"):
        assert getattr(info, key) == c[key], key
    assert info.model_version == m["program"]["model_version"] == 7
    assert (info.num_blocks, info.num_steps, info.steps, info.skip_first_block) == (0, 0, (), -1)
    lib, step = _native.lib(), _native.ProgramStep(struct_size=ctypes.sizeof(_native.ProgramStep))
    assert lib.slim_engine_program_step(engine._handle, 0, ctypes.byref(step)) == 1
    assert "family is 'lemur'" in lib.slim_last_error().decode()


def test_engine_info_of_a_plain_onnx_model(distilled_bundle):
    info = se.open_engine(distilled_bundle / "stages" / "final.onnx").info
    assert (info.family, info.precision, info.stage_count, info.num_steps, info.embed_dim) == ("onnx", "fp32", 1, 0, 0)


def test_program_step_index_out_of_range_is_refused(distilled_bundle):
    engine, lib = se.open_engine(distilled_bundle), _native.lib()
    step = _native.ProgramStep(struct_size=ctypes.sizeof(_native.ProgramStep))
    for index in (-1, engine.info.num_steps):
        assert lib.slim_engine_program_step(engine._handle, index, ctypes.byref(step)) == 1
        assert "index out of range" in lib.slim_last_error().decode()
    assert lib.slim_engine_get_info(None, ctypes.byref(_native.EngineInfo(struct_size=ctypes.sizeof(_native.EngineInfo)))) == 1
    assert lib.slim_engine_get_info(engine._handle, None) == 1


def test_engine_info_of_a_manifest_without_default_latent_size(bundle_copy):
    """default_latent_size is optional (0 in the info), checked when present; the Python binding then needs height and width."""
    edit_manifest(bundle_copy, lambda m: m["config"].pop("default_latent_size"))
    lib, handle = _native.lib(), ctypes.c_void_p()
    params = _native.params(_native.EngineParams)
    params.onnxruntime_library = _native.onnxruntime_library().encode()
    assert lib.slim_engine_open(str(bundle_copy).encode(), ctypes.byref(params), ctypes.byref(handle)) == 0, lib.slim_last_error()
    info = _native.EngineInfo(struct_size=ctypes.sizeof(_native.EngineInfo))
    assert lib.slim_engine_get_info(handle, ctypes.byref(info)) == 0
    assert (info.default_latent_size, info.max_latent_size) == (0, 32)
    lib.slim_engine_close(handle)


def test_the_binding_opens_a_bundle_without_default_latent_size_and_then_needs_height_and_width(bundle_copy, distilled_bundle):
    """The runtime owns the check of default_latent_size (optional): the binding used to refuse such a bundle at open.
    Without a stated default, generate asks for height and width, and with them gives what the original bundle gives."""
    edit_manifest(bundle_copy, lambda m: m["config"].pop("default_latent_size"))
    rng = np.random.default_rng(0)
    with se.open_engine(bundle_copy) as engine, se.open_engine(distilled_bundle) as original:
        c = engine.config
        text = rng.standard_normal((1, 5, c["joint_attention_dim"]), dtype=np.float32)
        pooled = rng.standard_normal((1, c["pooled_projection_dim"]), dtype=np.float32)
        assert engine.info.default_latent_size == 0
        with pytest.raises(ValueError, match="manifest states no default latent size .*pass height and width"):
            engine.session().generate(text, pooled)
        size = original.info.default_latent_size
        got = engine.session().generate(text, pooled, height=size, width=size, seed=4).latents
        assert np.array_equal(got, original.session().generate(text, pooled, seed=4).latents)
