"""Bundle format 3: stages bound by role, the manifest digest, the file listing, file types and sizes, the fast
and full checks, `slimengine verify`, format 2 bundles (the legacy program keys) still read, and the refusal of format 1
(docs/bundle-format.md)."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import slimengine as se
from slimengine import _native
from slimengine.bundle import digest_line, loads_strict
from slimengine.export.bundle import sha256_file

from .conftest import edit_manifest

HANG_LIMIT_S = 120  # an open that takes this long is hung (on a FIFO, /dev/zero); the checks answer in seconds


def _open_error(path, **options) -> se.SlimError:
    with pytest.raises(se.SlimError) as info:
        se.open_engine(path, **options)
    return info.value


def _open_in_subprocess(path, verify="fast", cwd=None) -> subprocess.CompletedProcess:
    """Open in a child process, so that an open that hangs fails the test instead of hanging it."""
    code = ("import sys, slimengine as se\n"
            "try:\n"
            f"    se.open_engine(sys.argv[1], verify={verify!r}).close()\n"
            "except se.SlimError as e:\n"
            "    print(e.status, e, file=sys.stderr); sys.exit(3)\n")
    try:
        return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=HANG_LIMIT_S,
                              cwd=cwd)
    except subprocess.TimeoutExpired:
        pytest.fail(f"opening {path} hung for {HANG_LIMIT_S} s")


def _sign(bundle, text: bytes) -> None:
    """Write manifest bytes as they are (not re-serialised) with their digest."""
    (bundle / "manifest.json").write_bytes(text)
    (bundle / "manifest.sha256").write_bytes(digest_line(text))


def _stages(bundle) -> list[dict]:
    return json.loads((bundle / "manifest.json").read_text())["stages"]


# --- roles -----------------------------------------------------------------------------------------------------


def test_every_stage_states_its_role_and_block(distilled_bundle):
    stages = _stages(distilled_bundle)
    assert [(s["name"], s["role"], s.get("block")) for s in stages] == [
        ("embed", "embed", None), ("block_0", "block", 0), ("block_1", "block", 1), ("block_2", "block", 2), ("block_3", "block", 3),
        ("compensate", "compensate", None), ("final", "final", None)]


def test_stages_are_bound_by_role_not_by_name(bundle_copy, distilled_bundle):
    """Renamed stages (names that say nothing, in another order) run the same program: nothing reads meaning from a name."""
    def rename(m):
        m["stages"] = [dict(s, name=f"stage-{i}") for i, s in enumerate(reversed(m["stages"]))]

    edit_manifest(bundle_copy, rename)
    with se.open_engine(distilled_bundle) as engine:
        c = engine.config
        text = np.random.default_rng(0).standard_normal((1, 3, c["joint_attention_dim"]), dtype=np.float32)
        pooled = np.random.default_rng(1).standard_normal((1, c["pooled_projection_dim"]), dtype=np.float32)
        expected = engine.session().generate(text, pooled, seed=3, height=16, width=16)
    with se.open_engine(bundle_copy) as engine:
        assert engine.stage_names == [f"stage-{i}" for i in range(7)]
        session = engine.session()
        session.profiling = True
        got = session.generate(text, pooled, seed=3, height=16, width=16)
    assert np.array_equal(got.latents, expected.latents)
    block_of = {s["name"]: s.get("block", -1) for s in _stages(bundle_copy)}
    stage_events = [e for e in got.events if e["kind"] == "stage"]
    assert stage_events and all(e["block"] == block_of[e["stage"]] for e in stage_events)  # the profiler's block, from the role
    assert {e["block"] for e in stage_events} >= {0, 1, 2, 3, -1}


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["stages"][0].update(role="encoder"), "stages[0].role 'encoder' is not a stage role"),
    (lambda m: m["stages"][0].update(role="lemur_embed"), "stages[0].role 'lemur_embed' is not a role of a sd3 stage"),
    (lambda m: m["stages"][1].pop("block"), "stages[1].block is missing"),
    (lambda m: m["stages"][1].update(block=4), "stages[1].block must be an integer in [0, 3]"),
    (lambda m: m["stages"][0].update(block=0), "stages[0].block is only for the block and block_tokens roles"),
    (lambda m: m["stages"][2].update(block=0), "stage block_1 repeats the role of another stage"),
    (lambda m: m["stages"][6].update(role="embed"), "stage final does not have the inputs/outputs the SD3 program expects"),
    (lambda m: m["files"].update({"stages/./x": m["files"]["stages/final.onnx"]}), "must be a path inside the bundle, got 'stages/./x'"),
    (lambda m: m["files"].update({"stages//x": m["files"]["stages/final.onnx"]}), "must be a path inside the bundle"),
    (lambda m: m["files"]["stages/final.onnx"].update(size=-1), "files['stages/final.onnx'].size must be an integer"),
    (lambda m: m["files"]["stages/final.onnx"].update(sha256="AB" * 32), "must be a lower-case sha256 hex digest"),
])
def test_roles_and_the_file_listing_are_validated(bundle_copy, edit, message):
    edit_manifest(bundle_copy, edit)
    err = _open_error(bundle_copy)
    assert err.status == "SLIM_ERR_BUNDLE" and message in str(err), str(err)


# --- the manifest's digest -------------------------------------------------------------------------------------


def test_an_unsigned_manifest_edit_is_refused_by_the_digest(bundle_copy):
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["program"]["steps"][0]["timestep"] = 900.0  # a changed timestep
    path.write_text(json.dumps(manifest, indent=1))
    err = _open_error(bundle_copy)
    assert err.status == "SLIM_ERR_BUNDLE" and "does not match its digest in manifest.sha256" in str(err), str(err)
    assert "re-export" in str(err)


def test_swapped_block_graphs_are_refused_by_the_default_open(tmp_path, distilled_bundle):
    # In the manifest (block 1's stage reading block 2's graph): the digest.
    swapped = tmp_path / "manifest.engine"
    shutil.copytree(distilled_bundle, swapped)
    text = (swapped / "manifest.json").read_text()
    text = text.replace('"stages/block_1.onnx"', '"@1"').replace('"stages/block_2.onnx"', '"stages/block_1.onnx"').replace('"@1"', '"stages/block_2.onnx"')
    (swapped / "manifest.json").write_text(text)
    err = _open_error(swapped)
    assert err.status == "SLIM_ERR_BUNDLE" and "does not match its digest" in str(err), str(err)
    # On disk (the files renamed into each other's place): the stage graphs' sha256, which the fast check includes.
    on_disk = tmp_path / "disk.engine"
    shutil.copytree(distilled_bundle, on_disk)
    a, b = on_disk / "stages/block_1.onnx", on_disk / "stages/block_2.onnx"
    a.rename(on_disk / "tmp")
    b.rename(a)
    (on_disk / "tmp").rename(b)
    err = _open_error(on_disk)
    assert err.status == "SLIM_ERR_BUNDLE" and ("stages/block_1.onnx " in str(err) or "stages/block_2.onnx " in str(err)), str(err)


def test_a_missing_or_malformed_digest_is_refused(bundle_copy):
    (bundle_copy / "manifest.sha256").write_text("not a digest\n")
    err = _open_error(bundle_copy)
    assert err.status == "SLIM_ERR_BUNDLE" and "manifest.sha256 must be one line '<sha256 hex>  manifest.json'" in str(err), str(err)
    (bundle_copy / "manifest.sha256").unlink()
    err = _open_error(bundle_copy)
    assert err.status == "SLIM_ERR_BUNDLE" and "manifest.sha256" in str(err) and "re-export" in str(err), str(err)


def test_a_format_1_bundle_is_told_to_re_export(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format_version"] = 1  # as format 1 wrote it: no digest file, files as {path: sha256}
    manifest["files"] = {k: v["sha256"] for k, v in manifest["files"].items()}
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    (bundle_copy / "manifest.sha256").unlink()
    err = _open_error(bundle_copy)
    assert err.status == "SLIM_ERR_BUNDLE", str(err)
    assert "this bundle is format 1, which this runtime no longer reads" in str(err)
    assert "re-export it: export-engine CHECKPOINT -o NAME.engine --force" in str(err) and "\n" not in str(err)


def as_format_2(manifest: dict) -> None:
    """A format 3 manifest as format 2 spelt it (docs/bundle-format.md, "Legacy spellings"): program.cache_blocks,
    program.steps[].skip_cached_blocks and program.cache for skip_blocks, skip_range and xslim."""
    manifest["format_version"] = 2
    program = manifest["program"]
    program["cache_blocks"] = program.pop("skip_blocks")
    program["cache"] = program.pop("xslim")
    for step in program["steps"]:
        step["skip_cached_blocks"] = step.pop("skip_range")


def test_a_format_2_bundle_opens_and_runs_bit_identically(tmp_path, distilled_xslim_bundle):
    """A bundle exported before format 3 (its program keys spelt the old way) opens, verifies and generates the same
    bits as the same bundle in format 3: here a skipped range with MLP compensation and an X-Slim schedule of every
    level, on 6 steps with CFG."""
    bundle, _ = distilled_xslim_bundle
    legacy = tmp_path / "format-2.engine"
    shutil.copytree(bundle, legacy)
    manifest = edit_manifest(legacy, as_format_2)
    assert manifest["program"]["cache_blocks"] == [1, 2] and manifest["program"]["cache"]["mode"] == "schedule"
    se.verify_bundle(legacy, verify="full")
    with se.open_engine(bundle) as new, se.open_engine(legacy) as old:
        assert old.info == new.info and (old.info.skip_first_block, old.info.xslim) == (1, "schedule")
        c = new.config
        rng = np.random.default_rng(5)
        text = rng.standard_normal((2, 2, 6, c["joint_attention_dim"]), dtype=np.float32)
        pooled = rng.standard_normal((2, 2, c["pooled_projection_dim"]), dtype=np.float32)
        inputs = dict(negative_prompt_embeds=text[1], negative_pooled_embeds=pooled[1], seed=3)
        want = new.session().generate(text[0], pooled[0], **inputs)
        got = old.session().generate(text[0], pooled[0], **inputs)
        assert [s["level"] for s in got.stats["per_step"]] == [s["level"] for s in want.stats["per_step"]]
        assert {s["level"] for s in got.stats["per_step"]} >= {"skipped_range", "reused", "block_refresh", "token_refresh"}
        assert np.array_equal(got.latents, want.latents)


@pytest.mark.parametrize("version,edit,message", [
    (3, lambda p: p.update(cache_blocks=p.pop("skip_blocks")), "program.cache_blocks is the format 2 spelling; a format 3 manifest "
                                                               "names it skip_blocks"),
    (3, lambda p: p["steps"][1].update(skip_cached_blocks=True), "program.steps[1].skip_cached_blocks is the format 2 spelling; "
                                                                 "a format 3 manifest names it skip_range"),
    (3, lambda p: p.update(cache=None), "program.cache is the format 2 spelling; a format 3 manifest names it xslim"),
    (3, lambda p: p.update(step_cache=None), "program.step_cache is the format 2 spelling; a format 3 manifest names it xslim"),
    (2, lambda p: p.update(skip_blocks=[1, 2]), "program.skip_blocks is the format 3 spelling; a format 2 manifest names it cache_blocks"),
    (2, lambda p: p.update(xslim=None), "program.xslim is the format 3 spelling; a format 2 manifest names it cache"),
], ids=["3-cache_blocks", "3-skip_cached_blocks", "3-cache", "3-step_cache", "2-skip_blocks", "2-xslim"])
def test_a_manifest_spells_its_program_keys_one_way(bundle_copy, version, edit, message):
    """Each format has one spelling of the renamed program keys: the other one is refused by name, not ignored."""
    def change(m):
        if version == 2:
            as_format_2(m)
        edit(m["program"])
    edit_manifest(bundle_copy, change)
    err = _open_error(bundle_copy)
    assert err.status == "SLIM_ERR_BUNDLE" and message in str(err), str(err)


def test_duplicate_keys_are_refused_in_c_and_in_python(bundle_copy):
    text = (bundle_copy / "manifest.json").read_bytes()
    duplicated = text.replace(b'"precision": "fp32"', b'"precision": "fp32", "precision": "fp16"', 1)
    assert duplicated != text
    _sign(bundle_copy, duplicated)
    err = _open_error(bundle_copy)
    assert err.status == "SLIM_ERR_BUNDLE" and 'json: duplicate key "precision"' in str(err), str(err)
    with pytest.raises(ValueError, match="duplicate key 'precision'"):
        loads_strict(duplicated)
    with pytest.raises(ValueError, match="duplicate key 'a'"):
        loads_strict('{"b": {"a": 1, "a": 2}}')


def test_invalid_utf8_in_the_manifest_is_refused(bundle_copy):
    text = (bundle_copy / "manifest.json").read_bytes()
    _sign(bundle_copy, text.replace(b'"family": "sd3"', b'"family": "sd3", "note": "caf\xe9"', 1))  # Latin-1, not UTF-8
    err = _open_error(bundle_copy)
    assert err.status == "SLIM_ERR_BUNDLE" and "json: invalid UTF-8" in str(err), str(err)
    with pytest.raises(ValueError):
        loads_strict(b'{"note": "caf\xe9"}')


def test_a_manifest_of_100k_stages_is_read_in_linear_time(tmp_path):
    """The manifest's checks are linear (the stage names' uniqueness, each stage's file in the listing): 100k stages
    are read and refused for their missing files in seconds (32 s before)."""
    bundle = tmp_path / "big.engine"
    bundle.mkdir()
    io = [{"name": n, "dtype": "float32", "shape": ["batch"]} for n in ("img", "txt", "temb")]
    stages = [{"name": f"s{i}", "role": "block", "block": i % 4, "file": f"stages/s{i}.onnx", "inputs": io, "outputs": io[:2]}
              for i in range(100_000)]
    config = {"num_layers": 4, "num_attention_heads": 2, "attention_head_dim": 8, "inner_dim": 16, "in_channels": 4, "out_channels": 4,
              "patch_size": 2, "joint_attention_dim": 8, "caption_projection_dim": 16, "pooled_projection_dim": 8, "max_latent_size": 64}
    manifest = {"format": "slimengine-bundle", "format_version": 3, "family": "sd3", "precision": "fp32", "custom_op_library": None,
                "config": config, "stages": stages,
                "program": {"sampler": "flow_match_euler", "guidance_scale": 1.0, "skip_blocks": None,
                            "steps": [{"sigma": 1.0, "sigma_next": 0.0, "timestep": 1000.0, "record_delta": False, "skip_range": False}]},
                "files": {s["file"]: {"sha256": "0" * 64, "size": 1} for s in stages}}
    _sign(bundle, json.dumps(manifest).encode())
    start = time.perf_counter()
    err = _open_error(bundle)
    seconds = time.perf_counter() - start
    assert err.status == "SLIM_ERR_BUNDLE" and "stages/s0.onnx is listed in the manifest but missing" in str(err), str(err)
    assert seconds < 10, f"{seconds:.1f} s"


# --- files on disk ---------------------------------------------------------------------------------------------


def test_a_symlinked_stage_is_refused_even_one_pointing_inside(tmp_path, bundle_copy):
    outside = tmp_path / "outside.onnx"
    shutil.copy(bundle_copy / "stages/final.onnx", outside)
    (bundle_copy / "stages/final.onnx").unlink()
    (bundle_copy / "stages/final.onnx").symlink_to(outside)  # the same bytes, from outside
    err = _open_error(bundle_copy)
    assert err.status == "SLIM_ERR_BUNDLE" and "stages/final.onnx is not a regular file (a symbolic link)" in str(err), str(err)
    (bundle_copy / "stages/final.onnx").unlink()
    shutil.copy(outside, bundle_copy / "stages/final.onnx")
    se.verify_bundle(bundle_copy)  # intact again
    data = bundle_copy / "stages/block_1.onnx.data"
    data.unlink()
    data.symlink_to("block_2.onnx.data")  # inside the bundle
    err = _open_error(bundle_copy)
    assert err.status == "SLIM_ERR_BUNDLE" and "stages/block_1.onnx.data is not a regular file (a symbolic link)" in str(err), str(err)


def test_a_symlinked_stages_folder_is_refused(tmp_path, bundle_copy):
    shutil.move(bundle_copy / "stages", tmp_path / "elsewhere")
    (bundle_copy / "stages").symlink_to(tmp_path / "elsewhere")
    err = _open_error(bundle_copy)
    assert err.status == "SLIM_ERR_BUNDLE" and "/stages is not a regular file (a symbolic link)" in str(err), str(err)


def test_the_bundle_path_itself_may_be_a_symlink(tmp_path, distilled_bundle):
    link = tmp_path / "link.engine"
    link.symlink_to(distilled_bundle)
    se.verify_bundle(link, verify="fast")


@pytest.mark.parametrize("target", ["stages/final.onnx.data", "manifest.json"])
def test_a_fifo_is_refused_without_hanging(bundle_copy, target):
    (bundle_copy / target).unlink()
    os.mkfifo(bundle_copy / target)
    proc = _open_in_subprocess(bundle_copy)
    assert proc.returncode == 3 and "SLIM_ERR_BUNDLE" in proc.stderr and f"{target} is not a regular file (a FIFO)" in proc.stderr, proc.stderr


def test_a_stage_linked_to_dev_zero_is_refused_without_hanging(bundle_copy):
    (bundle_copy / "stages/block_0.onnx.data").unlink()
    (bundle_copy / "stages/block_0.onnx.data").symlink_to("/dev/zero")
    for verify in ("fast", "full"):
        proc = _open_in_subprocess(bundle_copy, verify)
        assert proc.returncode == 3 and "block_0.onnx.data is not a regular file (a symbolic link)" in proc.stderr, proc.stderr


def test_an_unlisted_file_is_refused_naming_it(bundle_copy):
    (bundle_copy / "stages/extra.onnx.data").write_bytes(b"\0" * 16)
    err = _open_error(bundle_copy)
    assert err.status == "SLIM_ERR_BUNDLE" and "stages/extra.onnx.data is not listed in the manifest" in str(err), str(err)
    (bundle_copy / "stages/extra.onnx.data").unlink()
    (bundle_copy / "notes.txt").write_text("hi")
    err = _open_error(bundle_copy)
    assert err.status == "SLIM_ERR_BUNDLE" and "notes.txt is not listed in the manifest" in str(err), str(err)


def test_a_missing_file_is_refused_naming_it(bundle_copy):
    (bundle_copy / "stages/compensate.onnx.data").unlink()
    err = _open_error(bundle_copy)
    assert err.status == "SLIM_ERR_BUNDLE" and "stages/compensate.onnx.data is listed in the manifest but missing" in str(err), str(err)


@pytest.mark.parametrize("verify", ["fast", "full"])
def test_a_size_mismatch_is_refused_before_any_file_is_read(bundle_copy, verify):
    data = bundle_copy / "stages/block_1.onnx.data"
    listed = data.stat().st_size
    os.truncate(data, 1 << 40)  # a sparse terabyte: reading it before the size check would take hours
    start = time.perf_counter()
    err = _open_error(bundle_copy, verify=verify)
    assert time.perf_counter() - start < 60
    assert err.status == "SLIM_ERR_BUNDLE" and f"stages/block_1.onnx.data is {1 << 40} bytes but the manifest lists {listed}" in str(err)
    os.truncate(data, listed - 1)  # cut short
    err = _open_error(bundle_copy, verify=verify)
    assert err.status == "SLIM_ERR_BUNDLE" and f"is {listed - 1} bytes but the manifest lists {listed}" in str(err), str(err)


def test_full_verify_finds_a_flipped_weight_byte_that_the_fast_open_does_not_read(bundle_copy):
    data = bundle_copy / "stages/block_2.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    se.open_engine(bundle_copy).close()  # fast: sizes and graphs are intact, the weights are not read
    se.verify_bundle(bundle_copy, verify="fast")
    err = _open_error(bundle_copy, verify="full")
    assert err.status == "SLIM_ERR_BUNDLE" and "checksum mismatch for" in str(err) and "stages/block_2.onnx.data" in str(err)
    with pytest.raises(se.SlimError, match="checksum mismatch for .*stages/block_2.onnx.data"):
        se.verify_bundle(bundle_copy)
    with pytest.raises(ValueError, match='verify must be "fast" or "full"'):
        se.open_engine(bundle_copy, verify="none")


def test_verify_levels_in_the_c_abi(distilled_bundle):
    lib = _native.lib()
    params = _native.params(_native.EngineParams)
    assert params.verify == 0  # SLIM_VERIFY_FAST
    params.verify = 2
    handle = ctypes.c_void_p()
    assert lib.slim_status_name(lib.slim_engine_open(str(distilled_bundle).encode(), ctypes.byref(params), ctypes.byref(handle))) == \
        b"SLIM_ERR_INVALID_ARGUMENT"
    assert b"verify must be SLIM_VERIFY_FAST (0) or SLIM_VERIFY_FULL (1), got 2" in lib.slim_last_error()
    seen = []
    progress = _native.VerifyProgress(lambda user, file, done, total: seen.append((file, done, total)) or 0)
    assert lib.slim_bundle_verify(str(distilled_bundle).encode(), 1, progress, None) == 0
    sizes = {k: v["size"] for k, v in json.loads((distilled_bundle / "manifest.json").read_text())["files"].items()}
    assert {f.decode() for f, _, _ in seen} == set(sizes) and seen[-1][1] == seen[-1][2] == sum(sizes.values())
    stop = _native.VerifyProgress(lambda user, file, done, total: 1)
    assert lib.slim_status_name(lib.slim_bundle_verify(str(distilled_bundle).encode(), 1, stop, None)) == b"SLIM_ERR_INVALID_ARGUMENT"
    assert b"stopped by the progress callback" in lib.slim_last_error()


# --- slimengine verify -----------------------------------------------------------------------------------------


def _slimengine(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimengine.cli", *args], capture_output=True, text=True, timeout=HANG_LIMIT_S)


def test_slimengine_verify_exit_codes(bundle_copy, tmp_path):
    ok = _slimengine("verify", str(bundle_copy))
    assert ok.returncode == 0 and ok.stdout.strip() == f"{bundle_copy}: ok (full check)", ok.stderr
    data = bundle_copy / "stages/final.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0x80
    data.write_bytes(bytes(raw))
    bad = _slimengine("verify", str(bundle_copy))
    assert bad.returncode == 1 and "checksum mismatch for" in bad.stderr and "stages/final.onnx.data" in bad.stderr
    assert "Traceback" not in bad.stderr
    fast = _slimengine("verify", "--fast", "-q", str(bundle_copy))
    assert fast.returncode == 0 and fast.stdout == ""
    (bundle_copy / "stray").write_text("x")
    assert _slimengine("verify", "--fast", str(bundle_copy)).returncode == 1
    for args in ([], ["verify"], ["verify", str(tmp_path / "missing.engine")], ["frobnicate", str(bundle_copy)]):
        usage = _slimengine(*args)
        assert usage.returncode == 2 and "Traceback" not in usage.stderr, (args, usage.stderr)
    helped = _slimengine("verify", "--help")
    assert helped.returncode == 0 and "Exit 0 when intact, 1 when not" in helped.stdout
    assert shutil.which("slimengine", path=os.path.dirname(sys.executable)), "the slimengine console script is installed"


# --- external data outside the bundle's table ---------------------------------------------------------------------


def _with_external_data_outside_the_table(bundle, kind: str, location: str) -> None:
    """Give the bundle's first stage graph an initializer stored externally at `location` (a name other than the
    stage's weight file) where ONNX Runtime does not look it up in the in-memory table: in an If branch ("subgraph")
    or as the values of a sparse initializer ("sparse"); add it to the stage's output (as zero) and re-sign."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rel = _stages(bundle)[0]["file"]
    graph = onnx.load(str(bundle / rel), load_external_data=False)
    out = graph.graph.output[0]
    producer = next(n for n in graph.graph.node if out.name in n.output)
    producer.output[list(producer.output).index(out.name)] = out.name + "_pre"
    dtype = out.type.tensor_type.elem_type
    stored = TensorProto(name="stored", data_type=dtype, dims=[1], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        entry = stored.external_data.add()
        entry.key, entry.value = key, value
    if kind == "subgraph":
        then = helper.make_graph([helper.make_node("Sub", ["stored", "stored"], ["z"])], "then", [],
                                 [helper.make_tensor_value_info("z", dtype, [1])], initializer=[stored])
        zero = helper.make_tensor("zero_value", dtype, [1], [0])
        other = helper.make_graph([helper.make_node("Constant", [], ["z2"], value=zero)], "else", [],
                                  [helper.make_tensor_value_info("z2", dtype, [1])])
        graph.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
        graph.graph.node.extend([helper.make_node("If", ["cond"], ["zero"], then_branch=then, else_branch=other),
                                 helper.make_node("Add", [out.name + "_pre", "zero"], [out.name])])
    else:
        indices = numpy_helper.from_array(np.array([0], np.int64), "stored_indices")
        graph.graph.sparse_initializer.append(helper.make_sparse_tensor(stored, indices, [1]))
        graph.graph.node.extend([helper.make_node("Sub", ["stored", "stored"], ["zero"]),
                                 helper.make_node("Add", [out.name + "_pre", "zero"], [out.name])])
    (bundle / rel).write_bytes(graph.SerializeToString())

    def resize(manifest):
        manifest["files"][rel] = {"sha256": sha256_file(bundle / rel), "size": (bundle / rel).stat().st_size}

    edit_manifest(bundle, resize)


@pytest.mark.parametrize("kind", ["subgraph", "sparse"])
def test_open_never_reads_external_data_from_the_working_directory(bundle_copy, tmp_path, kind):
    """ONNX Runtime looks up the external data of an If/Loop/Scan branch's initializers and of sparse initializers
    outside the in-memory weights table, relative to the process's working directory: a file there became a weight,
    and whether the open succeeded depended on the caller's cwd. Now every such lookup is refused, file or not."""
    _with_external_data_outside_the_table(bundle_copy, kind, "outside.bin")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for present in (True, False):
        if present:
            (cwd / "outside.bin").write_bytes(np.zeros(1, np.float32).tobytes())
        else:
            (cwd / "outside.bin").unlink()
        proc = _open_in_subprocess(bundle_copy, cwd=cwd)
        assert proc.returncode == 3 and "outside.bin" in proc.stderr, (present, proc.returncode, proc.stderr[-2000:])


# --- an open engine is immune to later changes of its files ------------------------------------------------------

_CHANGE_AFTER_OPEN = """
import glob, os, sys
import numpy as np
import slimengine as se
bundle, change = sys.argv[1], sys.argv[2]
engine = se.open_engine(bundle)
session, c = engine.session(), engine.config
rng = np.random.default_rng(0)
text = rng.standard_normal((1, 8, c["joint_attention_dim"]), dtype=np.float32)
pooled = rng.standard_normal((1, c["pooled_projection_dim"]), dtype=np.float32)
def generate():
    return session.generate(prompt_embeds=text, pooled_embeds=pooled, seed=3, height=32, width=32).latents
before = generate()
for path in sorted(glob.glob(os.path.join(bundle, "stages", "*"))):
    if change == "truncate":
        os.truncate(path, 0)
    else:  # rewritten in place: same size, other bytes (what an mmap of the file sees)
        with open(path, "r+b") as f:
            f.write(rng.standard_normal(os.path.getsize(path) // 4 + 1).astype(np.float32).tobytes()[: os.path.getsize(path)])
try:
    after = generate()
except se.SlimError as e:
    print("failed cleanly:", e.status, e); sys.exit(3)
print("same" if np.array_equal(before, after) else "changed")
"""


@pytest.mark.parametrize("change", ["truncate", "rewrite"])
def test_an_open_engine_answers_as_before_when_its_files_change(bundle_copy, change):
    """Weights were mapped from the bundle's files by ONNX Runtime after open: a truncated weight file killed the
    process with SIGBUS, one rewritten in place silently changed the output. The engine reads every file it uses into
    its own memory at open: it answers exactly as before."""
    proc = subprocess.run([sys.executable, "-c", _CHANGE_AFTER_OPEN, str(bundle_copy), change], capture_output=True, text=True,
                          timeout=HANG_LIMIT_S)
    assert proc.returncode == 0 and proc.stdout.strip() == "same", (proc.returncode, proc.stdout, proc.stderr[-2000:])


def test_a_tokenizer_changed_after_open_is_not_read(tmp_path, sd3_pipeline_bundle):
    """Tokenizer graphs were read from the bundle at the first tokenize, after open (and after its checks)."""
    bundle = tmp_path / "copy.engine"
    shutil.copytree(sd3_pipeline_bundle, bundle)
    with se.open_engine(bundle) as engine:
        for path in (bundle / "tokenizers").iterdir():
            os.truncate(path, 0)
        fresh = se.open_engine(sd3_pipeline_bundle)
        for role in engine.tokenizer_roles:
            assert np.array_equal(engine.tokenize(role, "a red circle"), fresh.tokenize(role, "a red circle"))
        fresh.close()


_OPEN_PEAK = """
import sys
import slimengine as se
engine = se.open_engine(sys.argv[1])
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["VmHWM"].split()[0]) * 1024, int(status["VmRSS"].split()[0]) * 1024)
"""


def test_an_open_holds_one_stage_weights_file_at_a_time(tmp_path, distilled_bundle):
    """Every stage's weights read at open stayed in memory until the open ended (`model = StageModel{}` kept the
    string's buffer): the peak RSS of an open exceeded its end by the whole bundle (3.9 GiB for SD3-Medium fp16). The
    stages' weights now take turns in one buffer. Each weights file here is padded by PAD bytes the graphs never read."""
    pad = 32 << 20
    bundle = tmp_path / "padded.engine"
    shutil.copytree(distilled_bundle, bundle)
    weights = sorted((bundle / "stages").glob("*.onnx.data"))
    assert len(weights) >= 5
    for path in weights:
        with open(path, "ab") as f:
            f.write(np.random.default_rng(0).bytes(pad))  # random: pages the kernel cannot share

    def resize(manifest):
        for rel in manifest["files"]:
            manifest["files"][rel] = {"sha256": sha256_file(bundle / rel), "size": (bundle / rel).stat().st_size}

    edit_manifest(bundle, resize)
    proc = subprocess.run([sys.executable, "-c", _OPEN_PEAK, str(bundle)], capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak, end = map(int, proc.stdout.split())
    # One file's buffer (and ONNX Runtime's transient copy of one stage), not one per stage.
    assert peak - end < 3 * pad, f"peak RSS {peak / 2**20:.0f} MiB, {(peak - end) / 2**20:.0f} MiB over the end of the open"
