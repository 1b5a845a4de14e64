"""The C runtime (through the Python binding and raw ctypes) against the PyTorch reference sampler."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

import slimengine as se
from slimengine.export.bundle import digest_line
from slimengine.export.reference_sampler import reference_generate
from slimengine.noise import seeded_latents

from .conftest import CApiCall, edit_manifest, export, make_checkpoint, random_inputs, reference_for, relative_error, run_python

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
        ref = _reference(model, plan, text, pooled, seeded_latents((2, 16, h, w), 11))
        err = relative_error(result.latents, ref.latents)
        print(f"1.x + MLP compensation, {h}x{w}: relative error {err:.2e}")
        assert err <= TOLERANCE
        assert result.stats["effective_nfe"] == ref.effective_nfe == 1.5
        assert [s["blocks_run"] for s in result.stats["per_step"]] == ref.blocks_run == [4, 2]
        assert [s["level"] for s in result.stats["per_step"]] == ["full", "skipped_range"]
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


def test_skipped_range_without_mlp_reuses_the_raw_delta(identity_bundle, plain_checkpoint):
    model, plan = reference_for(plain_checkpoint, {"skip_blocks": "1-2", "steps": 3})
    assert plan.compensation == "identity"
    text, pooled = random_inputs(model, batch=1, text_len=6, seed=2)
    result = se.open_engine(identity_bundle).session().generate(text, pooled, seed=4, height=12, width=12)
    ref = _reference(model, plan, text, pooled, seeded_latents((1, 16, 12, 12), 4))
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
        ref = _reference(model, plan, text, pooled, seeded_latents((2, 16, 8, 12), 9), negative_prompt_embeds=neg_text,
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
    (lambda m: m["program"]["steps"][0].update(record_delta=False), "skips the range before any step recorded it"),
    (lambda m: m["program"].update(skip_blocks=[1, 3]), "program.skip_blocks.last"),
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


# Found by tests/test_fuzz.py: manifest text the C parser took but the Python binding could not read (or
# that held a string C cannot carry), now refused by the C parser with the offset named.
@pytest.mark.parametrize("old,new,message", [
    (b'"name": "slimengine"', b'"name": "slim\xc3\x28engine"', "invalid UTF-8 in string"),
    (b'"name": "slimengine"', b'"name": "slim\xed\xa0\x80engine"', "invalid UTF-8 in string"),  # an encoded surrogate
    (b'"name": "slimengine"', b'"name": "slim\\udc00engine"', "unpaired surrogate"),
    (b'"name": "slimengine"', b'"name": "slim\\u0000engine"', "\\u0000 in a string"),
    (b'"name": "slimengine"', b'"name": "slim\\u12G4engine"', "bad \\u escape"),
    (b'"sample_size": 128', b'"sample_size": 128.', "bad number"),
    (b'"sample_size": 128', b'"sample_size": 0128', "number with a leading zero"),
    (b'"sample_size": 128', b'"sample_size": 1e999', "bad number"),
])
def test_manifest_text_outside_strict_json_is_rejected(bundle_copy, old, new, message):
    path = bundle_copy / "manifest.json"
    raw = path.read_bytes()
    assert old in raw
    path.write_bytes(raw.replace(old, new, 1))
    err = _open_error(bundle_copy)
    assert err.status == "SLIM_ERR_BUNDLE" and "json: " + message in str(err), str(err)


def test_unicode_escapes_decode_to_utf8_including_surrogate_pairs(bundle_copy):
    path = bundle_copy / "manifest.json"
    path.write_text(path.read_text().replace('"family": "sd3"', '"family": "sd\\u0033\\ud83d\\ude00"', 1))
    (bundle_copy / "manifest.sha256").write_bytes(digest_line(path.read_bytes()))  # signed: the parser, not the digest, decides
    err = _open_error(bundle_copy)  # the family is named in the error as decoded: U+1F600 as 4 UTF-8 bytes, not 6
    assert err.status == "SLIM_ERR_BUNDLE" and "'sd3\U0001F600' is not supported" in str(err), str(err)


def test_a_xslim_policy_with_a_bad_escape_is_an_invalid_argument_not_internal(distilled_bundle):
    call = CApiCall(se.open_engine(distilled_bundle))
    for policy in (b'{"kind": "x\\uZZZZ"}', b'{"kind": "x\\u-001"}', b'{"kind": "x\\u 12"}', b'{"k\xff": 1}'):
        status, message = call.generate(xslim_policy=policy)
        assert status == "SLIM_ERR_INVALID_ARGUMENT" and "xslim_policy: json: " in message, (policy, status, message)
    status, message = call.generate(xslim_policy=b'{"kind": "\\u0078slim"}')  # "xslim": the next field is what is missing
    assert status == "SLIM_ERR_INVALID_ARGUMENT" and "xslim_policy.sample_ratio is missing" in message, message


# Found by tests/test_fuzz.py: opening a bundle whose file is a FIFO (or a link to /dev/zero) waited, or
# read, forever. Each open runs in a child process so that the old behaviour fails the test instead of hanging it.
@pytest.mark.parametrize("name,kind,verify", [
    ("manifest.json", "fifo", "full"),
    ("manifest.json", "directory", "fast"),
    ("stages/final.onnx", "fifo", "fast"),  # no checksum pass first: ONNX Runtime itself opened the FIFO
    ("stages/final.onnx", "fifo", "full"),
    ("stages/block_1.onnx.data", "/dev/zero", "full"),  # the checksum pass read it forever
    ("stages/embed.onnx", "/dev/zero", "fast"),
])
def test_bundle_files_that_are_not_regular_files_fail_instead_of_hanging(bundle_copy, name, kind, verify):
    target = bundle_copy / name
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    else:
        target.symlink_to(kind)
    proc = run_python(f"import slimengine as se\ntry:\n    se.open_engine({str(bundle_copy)!r}, verify={verify!r})\n"
                      "except se.SlimError as e:\n    print(e.status, e)", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("SLIM_ERR_BUNDLE") and f"{name} is not a regular file" in proc.stdout, proc.stdout


def test_a_message_that_is_not_utf8_still_raises_slim_error(tmp_path):
    """Messages may quote bytes that are not UTF-8 (a damaged ONNX file's, here a path's): SlimError all the same."""
    path = tmp_path / os.fsdecode(b"caf\xe9.bank")
    with pytest.raises(se.SlimError) as info:
        se.MemoryBank(path, 4, read_only=True)
    assert info.value.status == "SLIM_ERR_IO" and "caf\ufffd.bank: does not exist" in str(info.value)


def test_a_missing_or_second_onnx_runtime_library_is_reported(distilled_bundle):
    # Whether or not an engine holds the process's ONNX Runtime now, another library path is refused.
    with pytest.raises(se.SlimError) as info:
        se.open_engine(distilled_bundle, onnxruntime_library="/nonexistent/libonnxruntime.so")
    assert info.value.status == "SLIM_ERR_BACKEND" and "/nonexistent/libonnxruntime.so" in str(info.value)
    engine = se.open_engine(distilled_bundle)
    with pytest.raises(se.SlimError, match="already loaded"):
        se.open_engine(distilled_bundle, onnxruntime_library="/nonexistent/libonnxruntime.so")
    engine.close()


def test_each_row_is_the_row_generated_alone_with_its_own_seed(distilled_bundle, distilled_checkpoint, sd3_pipeline_bundle):
    """Per-row seeds (slim_generate_params.seeds; Python seed=[...]): row b of a batch is bit for bit that row generated
    alone with seeds[b], on the embeddings path and the prompt path; one seed means seed + row; the noise is
    slimengine.noise's (docs/runtime-loop.md, "Noise")."""
    model, plan = reference_for(distilled_checkpoint)
    text, pooled = random_inputs(model, batch=3, text_len=5, seed=2)
    session = se.open_engine(distilled_bundle).session()
    seeds = [11, 2**64 - 1, 11]
    batch = session.generate(text, pooled, seed=seeds, height=8, width=8).latents
    for b, seed in enumerate(seeds):
        assert np.array_equal(batch[b], session.generate(text[b:b + 1], pooled[b:b + 1], seed=seed, height=8, width=8).latents[0])
    assert not np.array_equal(batch[0], batch[2])  # the same seed, another prompt
    one = session.generate(text, pooled, seed=2**64 - 2, height=8, width=8).latents  # rows from 2^64-2, 2^64-1, then 0
    assert np.array_equal(one, session.generate(text, pooled, seed=[2**64 - 2, 2**64 - 1, 0], height=8, width=8).latents)
    assert np.array_equal(one, session.generate(text, pooled, latents=seeded_latents((3, 16, 8, 8), 2**64 - 2), height=8,
                                                width=8).latents)
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        session.generate(text, pooled, seed=[1, 2], height=8, width=8)
    assert np.array_equal(session.generate(text, pooled, seed=np.array(2**64 - 2, np.uint64), height=8, width=8).latents, one)
    assert np.array_equal(session.generate(text, pooled, seed=np.array([2**64 - 2, 2**64 - 1, 0], np.uint64), height=8,
                                           width=8).latents, one)
    # Found by the break-it pass: any iterable was taken, a set in hash order, a dict's keys, bytes as small numbers.
    for bad in ({1, 2, 3}, {1: 0, 2: 0, 3: 0}, b"\x01\x02\x03", (s for s in [1, 2, 3]), True, 1.0, "1"):
        with pytest.raises(TypeError, match="seed must be an int or a list, tuple or 1-d array"):
            session.generate(text, pooled, seed=bad, height=8, width=8)

    prompts = ["a red circle", "a blue square"]
    prompt_session = se.open_engine(sd3_pipeline_bundle).session()
    images = prompt_session.generate(prompt=prompts, seed=[5, 40], height=64, width=64).image
    for b, seed in enumerate([5, 40]):
        assert np.array_equal(images[b], prompt_session.generate(prompt=[prompts[b]], seed=seed, height=64, width=64).image[0])
