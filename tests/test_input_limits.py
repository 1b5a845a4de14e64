"""Integers and sizes at the boundary: refused with a clear error, never truncated or allocated blindly."""

from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest

import slimengine as se
from slimengine import _native
from tests.conftest import bank_address

from .conftest import edit_manifest


@pytest.fixture(scope="module")
def sd3(distilled_bundle):
    with se.open_engine(distilled_bundle) as engine:
        c = engine.config
        text = np.zeros((1, 3, c["joint_attention_dim"]), np.float32)
        pooled = np.zeros((1, c["pooled_projection_dim"]), np.float32)
        yield engine.session(), text, pooled


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(num_steps=2**32 + 2), ValueError, "num_steps must be in [1, 10000], got 4294967298"),
    (dict(num_steps=0), ValueError, "num_steps must be in [1,"),
    (dict(num_steps=2.0), TypeError, "num_steps must be an integer"),
    (dict(seed=2**64 + 3), ValueError, "seed must be in [0, 18446744073709551615]"),
    (dict(seed=-1), ValueError, "seed must be in [0,"),
    (dict(height=1 << 20), ValueError, "height must be a multiple of 2 up to 32 (latent pixels), got 1048576"),
    (dict(height=0), ValueError, "height must be in [1,"),
    (dict(width=-8), ValueError, "width must be in [1,"),
    (dict(width=7), ValueError, "width must be a multiple of 2"),
    (dict(height=True), TypeError, "height must be an integer"),
])
def test_generate_refuses_out_of_range_integers_and_sizes(sd3, kwargs, error, message):
    session, text, pooled = sd3
    with pytest.raises(error, match=re.escape(message)):
        session.generate(text, pooled, **kwargs)


def test_the_largest_valid_values_still_run(sd3):
    session, text, pooled = sd3
    a = session.generate(text, pooled, seed=2**64 - 1, height=32, width=2).latents
    b = session.generate(text, pooled, seed=2**64 - 1, height=32, width=2).latents
    assert a.shape == (1, 16, 32, 2) and np.array_equal(a, b)
    assert not np.array_equal(a, session.generate(text, pooled, seed=2**63, height=32, width=2).latents)


def test_a_batch_over_the_limit_is_refused_before_the_output_is_allocated(sd3):
    session, text, pooled = sd3
    big = np.broadcast_to(text, (5000, *text.shape[1:]))  # no memory behind it
    with pytest.raises(ValueError, match="batch 5000 is over the runtime's limit of 4096"):
        session.generate(big, np.broadcast_to(pooled, (5000, pooled.shape[1])), height=32, width=32)


def test_bank_refuses_model_versions_and_ids_outside_their_c_types(tmp_path):
    with se.MemoryBank(tmp_path / "b.slimbank", dim=4) as bank:
        row = np.ones((1, 4), np.float32)
        for version in (-1, 2**32):
            with pytest.raises(ValueError, match=r"model_version must be in \[0, 4294967295\]"):
                bank.upsert([1], row, model_version=version)
        bank.upsert([1], row, model_version=2**32 - 1)
        assert bank.lookup([1]).model_versions[0] == 2**32 - 1
        for ids in (np.array([2**64 - 1], np.uint64), [2**64 - 1]):
            with pytest.raises(ValueError, match="outside int64's range"):
                bank.upsert(ids, row)
            with pytest.raises(ValueError, match="outside int64's range"):
                bank.lookup(ids)
        with pytest.raises(TypeError, match="integer type"):
            bank.lookup([2**70])
        assert len(bank) == 1
        with pytest.raises(ValueError, match="at most 16777216 per call"):
            bank.lookup(np.broadcast_to(np.int64(1), (1 << 24) + 1))


def test_embed_model_version_is_range_checked_in_python_and_in_c(lemur_bundle, tmp_path):
    with se.open_engine(lemur_bundle) as engine, se.MemoryBank(tmp_path / "b.slimbank", dim=engine.config["embed_dim"]) as bank:
        c = engine.config
        session = engine.session()
        text = np.ones((1, 4), np.int64)
        frames = np.zeros((1, 1, 3, c["image_size"], c["image_size"]), np.float32)
        with pytest.raises(ValueError, match="model_version must be in"):
            session.embed(text, frames, bank=bank, document_ids=[5], model_version=-1)
        # The C boundary: -1 means the bundle's version; other negatives and values past uint32 are refused.
        lib = _native.lib()
        keep = []

        def tensor(arr):
            dims = (ctypes.c_int64 * arr.ndim)(*arr.shape)
            t = _native.SlimTensor(arr.ctypes.data, {np.dtype(np.int64): 3, np.dtype(np.float32): 0}[arr.dtype], 1, 0, arr.ndim,
                                   dims, None)
            keep.extend([arr, dims, t])
            return ctypes.pointer(t)

        out = np.zeros((1, c["embed_dim"]), np.float32)
        for version, status in [(-2, "SLIM_ERR_INVALID_ARGUMENT"), (2**32, "SLIM_ERR_INVALID_ARGUMENT"), (-1, "SLIM_OK")]:
            p = _native.params(_native.EmbedParams)
            p.text_ids, p.frames, p.bank = tensor(text), tensor(frames), bank_address(bank)
            p.document_ids, p.model_version = tensor(np.array([5], np.int64)), version
            code = lib.slim_embed(session._handle, ctypes.byref(p), tensor(out), None)
            assert lib.slim_status_name(code).decode() == status, (version, lib.slim_last_error())
        assert bank.lookup([5]).model_versions[0] == engine.manifest["program"]["model_version"] == 7


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(guidance_scale=-5.0), ValueError, "guidance_scale must be a finite number >= 0, got -5.0"),  # was: silently the bundle's
    (dict(guidance_scale=True), TypeError, "guidance_scale must be a real number, got True"),  # was: 1.0
    (dict(guidance_scale=10**400), ValueError, "guidance_scale must be a finite number"),  # was: OverflowError
    (dict(guidance_scale=np.float64("nan")), ValueError, "guidance_scale must be a finite number >= 0, got nan"),
    (dict(xslim_threshold=-1.0), ValueError, "xslim_threshold must be a finite number >= 0"),  # was: the bundle's
    (dict(shift=float("nan")), ValueError, "shift must be a finite number > 0, got nan"),  # was: ignored without num_steps
    (dict(shift=0), ValueError, "shift must be a finite number > 0, got 0.0"),
    (dict(shift="3"), TypeError, "shift must be a real number"),
])
def test_generate_refuses_float_options_it_would_silently_change(sd3, kwargs, error, message):
    session, text, pooled = sd3
    with pytest.raises(error, match=re.escape(message)):
        session.generate(text, pooled, **kwargs)


def test_the_float_options_accept_python_and_numpy_numbers(sd3):
    session, text, pooled = sd3
    a = session.generate(text, pooled, guidance_scale=np.float32(1), xslim_threshold=0, num_steps=2, shift=np.int8(3)).latents
    assert np.array_equal(a, session.generate(text, pooled, guidance_scale=1.0, xslim_threshold=0.0, num_steps=2, shift=3.0).latents)


def test_paths_and_handles_of_the_wrong_type_are_type_errors_that_create_nothing(tmp_path, monkeypatch, lemur_bundle):
    monkeypatch.chdir(tmp_path)
    for path in (None, 5):  # MemoryBank(None, dim=8) created ./None, kept it open (writer lock held), then raised
        with pytest.raises(TypeError, match=r"path must be a path \(str, bytes or os.PathLike\)"):
            se.MemoryBank(path, dim=8)
        with pytest.raises(TypeError, match=r"path must be a path"):
            se.open_engine(path)
    assert list(tmp_path.iterdir()) == []
    with se.MemoryBank(str(tmp_path / "b.slimbank").encode(), dim=8) as bank:  # bytes paths work (they read as str(b"...") before)
        assert bank.path == tmp_path / "b.slimbank"
    for options, message in [(dict(device=None), "device must be 'cpu', 'cuda' or 'cuda:N', got None"),
                             (dict(device=0), "device must be"), (dict(onnxruntime_library=5), "onnxruntime_library must be a path")]:
        with pytest.raises(TypeError, match=re.escape(message)):
            se.open_engine(lemur_bundle, **options)
    with se.open_engine(lemur_bundle) as engine, se.MemoryBank(tmp_path / "l.slimbank", dim=engine.config["embed_dim"]) as bank:
        c, session = engine.config, engine.session()
        text, frames = np.ones((1, 4), np.int64), np.zeros((1, 1, 3, c["image_size"], c["image_size"]), np.float32)
        history, query = np.array([[-1]]), np.ones((1, 4), np.int64)
        for call, message in [(lambda: session.embed(text, frames, bank="b.slimbank", document_ids=[1]), "bank must be a MemoryBank or None"),
                              (lambda: session.embed(text, None), "frames is required"),
                              (lambda: session.score(None, history, query), "bank must be a MemoryBank"),
                              (lambda: session.run_stage(None, {}, {}), "stage must be a stage name (str), got None"),
                              (lambda: session.run_stage(engine.stage_names[0], [text], {}), "inputs must be a dict"),
                              (lambda: session.run_stage(engine.stage_names[0], {0: text}, {}), "inputs must be a dict of tensor name")]:
            with pytest.raises(TypeError, match=re.escape(message)):  # these were AttributeErrors
                call()
        assert session.score(bank, history, query).scores.shape == (1,)


@pytest.mark.parametrize("size", [-8, 0, 3, 1 << 20, "32", True])
def test_a_bundle_whose_default_latent_size_does_not_fit_is_refused_at_open(bundle_copy, size):
    """The Python binding sizes the output from the manifest's default_latent_size: -8 was numpy's "negative
    dimensions" at generate time, 3 a shape error at every call, 1 << 20 a MemoryError."""
    edit_manifest(bundle_copy, lambda m: m["config"].__setitem__("default_latent_size", size))
    with pytest.raises(se.SlimError, match=r"default_latent_size must be a multiple of patch_size \(2\) in \[1, 32\]") as e:
        se.open_engine(bundle_copy)
    assert e.value.status == "SLIM_ERR_BUNDLE"
