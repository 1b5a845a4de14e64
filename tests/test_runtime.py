"""The C runtime (through the Python binding and raw ctypes) against the PyTorch reference sampler."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import slimengine as se
from slimengine.export.reference_sampler import reference_generate
from slimengine.noise import gaussian_noise

from .conftest import CApiCall, edit_manifest, export, make_checkpoint, random_inputs, reference_for, relative_error

TOLERANCE = 1e-4  # fp32 relative error, runtime vs PyTorch


def _reference(model, plan, text, pooled, latents, **kw):
    t = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    return reference_generate(model, plan, torch.from_numpy(text), torch.from_numpy(pooled), torch.from_numpy(latents), **t)


def test_1x_program_with_mlp_compensation_matches_pytorch(distilled_bundle, distilled_checkpoint):
    model, plan = reference_for(distilled_checkpoint)
    text, pooled = random_inputs(model, batch=2, text_len=7, seed=0)
    session = se.open_engine(distilled_bundle).session()
    for h, w in [(16, 16), (14, 10)]:  # an odd patch grid too
        result = session.generate(text, pooled, seed=11, height=h, width=w)
        ref = _reference(model, plan, text, pooled, gaussian_noise((2, 16, h, w), 11))
        err = relative_error(result.latents, ref.latents)
        print(f"1.x + MLP compensation, {h}x{w}: relative error {err:.2e}")
        assert err <= TOLERANCE
        assert result.stats["effective_nfe"] == ref.effective_nfe == 1.5
        assert [s["blocks_run"] for s in result.stats["per_step"]] == ref.blocks_run == [4, 2]
        assert [s["level"] for s in result.stats["per_step"]] == ["full", "cached_range"]
        assert result.stats["per_stage"]["compensate"]["calls"] == 1
        assert result.stats["per_stage"]["block_1"]["calls"] == 1 and result.stats["per_stage"]["block_0"]["calls"] == 2


def test_given_latents_replace_the_seeded_noise(distilled_bundle, distilled_checkpoint):
    model, plan = reference_for(distilled_checkpoint)
    text, pooled = random_inputs(model, batch=1, text_len=5, seed=1)
    latents = np.random.default_rng(3).standard_normal((1, 16, 12, 8), dtype=np.float32)
    result = se.open_engine(distilled_bundle).session().generate(text, pooled, latents=torch.from_numpy(latents))  # DLPack input
    err = relative_error(result.latents, _reference(model, plan, text, pooled, latents).latents)
    print(f"given latents: relative error {err:.2e}")
    assert err <= TOLERANCE


def test_cached_range_without_mlp_reuses_the_raw_delta(identity_bundle, plain_checkpoint):
    model, plan = reference_for(plain_checkpoint, {"cache_blocks": "1-2", "steps": 3})
    assert plan.compensation == "identity"
    text, pooled = random_inputs(model, batch=1, text_len=6, seed=2)
    result = se.open_engine(identity_bundle).session().generate(text, pooled, seed=4, height=12, width=12)
    ref = _reference(model, plan, text, pooled, gaussian_noise((1, 16, 12, 12), 4))
    err = relative_error(result.latents, ref.latents)
    print(f"1.x, identity compensation: relative error {err:.2e}")
    assert err <= TOLERANCE and result.stats["effective_nfe"] == ref.effective_nfe == 2.0


def test_plain_multistep_plan_with_cfg_matches_pytorch(cfg_bundle, plain_checkpoint):
    model, plan = reference_for(plain_checkpoint, {"steps": 3, "guidance_scale": 4.5})
    text, pooled = random_inputs(model, batch=2, text_len=5, seed=5)
    neg_text, neg_pooled = random_inputs(model, batch=2, text_len=5, seed=6)
    session = se.open_engine(cfg_bundle).session()
    for guidance in (None, 2.0):  # the bundle's default, then a per-request override
        result = session.generate(text, pooled, negative_prompt_embeds=neg_text, negative_pooled_embeds=neg_pooled,
                                  guidance_scale=guidance, seed=9, height=8, width=12)
        ref = _reference(model, plan, text, pooled, gaussian_noise((2, 16, 8, 12), 9), negative_prompt_embeds=neg_text,
                         negative_pooled_embeds=neg_pooled, guidance_scale=guidance)
        err = relative_error(result.latents, ref.latents)
        print(f"plain 3 steps, CFG {guidance or plan.guidance_scale}: relative error {err:.2e}")
        assert err <= TOLERANCE and result.stats["effective_nfe"] == 6.0


def test_original_and_diffusers_key_checkpoints_give_identical_outputs(tmp_path, plain_checkpoint, cfg_bundle):
    twin = make_checkpoint(tmp_path / "twin.pt", "--preset", "tiny", "--plain", "--seed", "2")  # same weights, diffusers keys
    twin_bundle = export(twin, tmp_path / "twin.engine", "--steps", "3", "--guidance-scale", "4.5")
    model, _ = reference_for(twin)
    text, pooled = random_inputs(model, batch=1, text_len=4, seed=7)
    outs = [se.open_engine(b).session().generate(text, pooled, negative_prompt_embeds=text * 0, negative_pooled_embeds=pooled * 0,
                                                 seed=1).latents for b in (cfg_bundle, twin_bundle)]
    assert np.array_equal(outs[0], outs[1])


def test_eight_threads_with_their_own_sessions_are_bit_identical(distilled_bundle, distilled_checkpoint):
    engine = se.open_engine(distilled_bundle)
    model, _ = reference_for(distilled_checkpoint)
    text, pooled = random_inputs(model, batch=1, text_len=7, seed=8)
    expected = engine.session().generate(text, pooled, seed=3).latents
    results, errors = [None] * 8, []

    def worker(i):
        try:
            session = engine.session()
            for _ in range(3):
                results[i] = session.generate(text, pooled, seed=3).latents
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(np.array_equal(r, expected) for r in results)


# ---- the C boundary, called through raw ctypes so that nothing in Python pre-validates ----


def test_bad_tensors_at_the_c_boundary_get_clear_errors(distilled_bundle):
    call = CApiCall(se.open_engine(distilled_bundle))
    assert call.generate() == ("SLIM_OK", "")
    good = call.out.copy()
    text = call.text
    nan_text = text.copy()
    nan_text[0, 2, 5] = np.nan
    cases = [
        (dict(prompt_embeds=call.tensor(text.astype(np.float16), dtype=1)), "SLIM_ERR_DTYPE", "prompt_embeds: dtype must be float32"),
        (dict(prompt_embeds=call.tensor(text, device=2)), "SLIM_ERR_DTYPE", "CPU memory"),
        (dict(prompt_embeds=call.tensor(text[:, :, :-1].copy())), "SLIM_ERR_SHAPE", "expected [B,L,48]"),
        (dict(prompt_embeds=call.tensor(text[0].copy())), "SLIM_ERR_SHAPE", "rank 2"),
        (dict(pooled_embeds=call.tensor(np.zeros((2, 24), np.float32))), "SLIM_ERR_SHAPE", "pooled_embeds: shape [2,24], expected [1,24]"),
        (dict(prompt_embeds=call.tensor(nan_text)), "SLIM_ERR_NUMERICS", "prompt_embeds contains NaN"),
        (dict(guidance_scale=3.0), "SLIM_ERR_INVALID_ARGUMENT", "needs negative_prompt_embeds"),
        (dict(struct_size=8), "SLIM_ERR_INVALID_ARGUMENT", "struct_size"),
        (dict(pooled_embeds=None), "SLIM_ERR_INVALID_ARGUMENT", "pooled_embeds is required"),
        (dict(latents=call.tensor(np.zeros((1, 16, 8, 10), np.float32))), "SLIM_ERR_SHAPE", "latents: shape [1,16,8,10]"),
        (dict(prompt_embeds=call.tensor(text, shape=(1, 1 << 20, 48))), "SLIM_ERR_SHAPE", "text length <= 8192"),
        (dict(prompt_embeds=call.tensor(text, shape=(1 << 31, 1 << 31, 48))), "SLIM_ERR_SHAPE", "too many elements"),
    ]
    for overrides, status, message in cases:
        got_status, got_message = call.generate(**overrides)
        assert got_status == status and message in got_message, (overrides, got_status, got_message)
    odd = np.zeros((1, 16, 9, 8), np.float32)
    assert call.generate(out=call.tensor(odd))[0] == "SLIM_ERR_SHAPE"
    huge = np.zeros((1, 16, 34, 34), np.float32)  # beyond the 16x16-patch position table
    status, message = call.generate(out=call.tensor(huge))
    assert status == "SLIM_ERR_SHAPE" and "up to 32" in message
    # The session is untouched by rejected calls.
    assert call.generate() == ("SLIM_OK", "") and np.array_equal(call.out, good)


def test_closing_an_engine_closes_its_sessions(distilled_bundle, distilled_checkpoint):
    model, _ = reference_for(distilled_checkpoint)
    text, pooled = random_inputs(model, batch=1, text_len=3, seed=0)
    with se.open_engine(distilled_bundle) as engine:
        session = engine.session()
        session.generate(text, pooled)
    with pytest.raises(se.SlimError, match="session is closed"):
        session.generate(text, pooled)
    with pytest.raises(se.SlimError, match="engine is closed"):
        engine.session()


def _open_error(path, **options) -> se.SlimError:
    with pytest.raises(se.SlimError) as info:
        se.open_engine(path, **options)
    return info.value


def test_a_file_modified_after_export_fails_the_checksum(bundle_copy):
    data = bundle_copy / "stages/block_2.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    err = _open_error(bundle_copy, verify="full")  # the default (fast) open reads no weights: test_bundle_integrity.py
    assert err.status == "SLIM_ERR_BUNDLE" and "checksum mismatch" in str(err) and "block_2.onnx.data" in str(err)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(format_version=7), "unsupported bundle format version 7"),
    (lambda m: m.update(family="flux"), "'flux' is not supported"),
    (lambda m: m["config"].update(num_layers=0), "config.num_layers must be an integer in [1, 1024]"),
    (lambda m: m["program"]["steps"][0].update(record_delta=False), "skips the cached range before any step recorded it"),
    (lambda m: m["program"].update(cache_blocks=[1, 3]), "program.cache_blocks.last"),
    (lambda m: m["stages"][1].update(file="../../etc/passwd"), "must be a path inside the bundle"),
    (lambda m: m["stages"].pop(2), "stage block_1 is missing"),
    (lambda m: m["stages"][0]["inputs"].reverse(), "does not have the inputs/outputs"),
    (lambda m: m["program"]["steps"][1].update(sigma="high"), "steps[1].sigma must be a finite number"),
    (lambda m: m.update(custom_op_library="/tmp/evil.so"), "custom_op_library must be null or \"libslimengine_ops.so\""),
    (lambda m: m.pop("files"), ".files is missing"),
])
def test_invalid_manifests_are_rejected_with_the_field_named(bundle_copy, edit, message):
    edit_manifest(bundle_copy, edit)  # re-signed, so the check reaches the field
    err = _open_error(bundle_copy)
    assert err.status == "SLIM_ERR_BUNDLE" and message in str(err), str(err)


def test_unreadable_bundles_fail_cleanly(tmp_path, bundle_copy):
    assert _open_error(tmp_path / "nothing.engine").status == "SLIM_ERR_IO"
    (bundle_copy / "manifest.json").write_text('{"format": "slimengine-bundle", "format_version": 1,')
    err = _open_error(bundle_copy)
    assert err.status == "SLIM_ERR_BUNDLE" and "json:" in str(err)


def test_a_missing_or_second_onnx_runtime_library_is_reported(distilled_bundle):
    # Whether or not an engine holds the process's ONNX Runtime now, another library path is refused.
    with pytest.raises(se.SlimError) as info:
        se.open_engine(distilled_bundle, onnxruntime_library="/nonexistent/libonnxruntime.so")
    assert info.value.status == "SLIM_ERR_BACKEND" and "/nonexistent/libonnxruntime.so" in str(info.value)
    engine = se.open_engine(distilled_bundle)
    with pytest.raises(se.SlimError, match="already loaded"):
        se.open_engine(distilled_bundle, onnxruntime_library="/nonexistent/libonnxruntime.so")
    engine.close()
