"""Export: bundle layout, manifest, ONNX graphs, precisions, --verify, atomic writes."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import onnx
import pytest
import torch

import slimengine as se
from slimengine.export.checkpoint import load_checkpoint
from slimengine.export.reference_sampler import reference_generate
from slimengine.export.sampling_plan import make_plan
from slimengine.export.sd3_export import export_sd3
from slimengine.noise import seeded_latents

from .conftest import make_checkpoint, random_inputs, reference_for, relative_error, run_cli


def test_bundle_has_a_complete_manifest_and_checksums(distilled_bundle, distilled_checkpoint):
    manifest = json.loads((distilled_bundle / "manifest.json").read_text())
    assert manifest["format"] == "slimengine-bundle" and manifest["format_version"] == 3
    assert manifest["family"] == "sd3" and manifest["precision"] == "fp32"
    assert manifest["source"]["sha256"] == hashlib.sha256(distilled_checkpoint.read_bytes()).hexdigest()
    names = [s["name"] for s in manifest["stages"]]
    assert names == ["embed", "block_0", "block_1", "block_2", "block_3", "compensate", "final"]
    program = manifest["program"]
    assert program["skip_blocks"] == [1, 2] and program["compensation"] == "mlp"
    assert [s["record_delta"] for s in program["steps"]] == [True, False]
    assert [s["skip_range"] for s in program["steps"]] == [False, True]
    assert program["effective_nfe"] == 1.5
    on_disk = {str(p.relative_to(distilled_bundle)) for p in distilled_bundle.rglob("*") if p.is_file()} - {"manifest.json", "manifest.sha256"}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        data = (distilled_bundle / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, name
    assert not list(distilled_bundle.parent.glob(".distilled.engine.tmp*"))


def test_stage_graphs_use_opset_23_attention_and_dynamic_shapes(distilled_bundle):
    block = onnx.load(str(distilled_bundle / "stages/block_1.onnx"))
    assert {o.domain: o.version for o in block.opset_import}[""] == 23
    assert "Attention" in {n.op_type for n in block.graph.node}
    weights_outside = onnx.load(str(distilled_bundle / "stages/block_1.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in weights_outside.graph.initializer)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in block.graph.input}
    assert dims["img"][:2] == ["batch", "tokens"] and dims["txt"][:2] == ["batch", "text"]
    embed = onnx.load(str(distilled_bundle / "stages/embed.onnx"), load_external_data=False)
    latents = [d.dim_param or d.dim_value for d in embed.graph.input[0].type.tensor_type.shape.dim]
    assert latents[0] == "batch" and all(isinstance(d, str) for d in latents[2:])


@pytest.mark.parametrize("precision,onnx_type", [("fp16", onnx.TensorProto.FLOAT16), ("bf16", onnx.TensorProto.BFLOAT16)])
def test_reduced_precision_bundles_keep_float32_boundaries(tmp_path, distilled_checkpoint, precision, onnx_type):
    bundle = tmp_path / f"{precision}.engine"
    run_cli("export-engine", str(distilled_checkpoint), "-o", str(bundle), "-q", "--precision", precision)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["precision"] == precision
    block = onnx.load(str(bundle / "stages/block_0.onnx"))
    onnx.checker.check_model(block)
    weights = [t for t in block.graph.initializer if len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 32 * 32]
    assert weights and all(t.data_type == onnx_type for t in weights)
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in block.graph.input)
    if precision == "fp16":  # ONNX Runtime's CPU provider runs fp16 graphs (not bf16 ones): check the result
        model, plan = reference_for(distilled_checkpoint)
        text, pooled = random_inputs(model, batch=1, text_len=4, seed=0)
        got = se.open_engine(bundle).session().generate(text, pooled, seed=2, height=16, width=16).latents
        ref = reference_generate(model, plan, torch.from_numpy(text), torch.from_numpy(pooled), torch.from_numpy(seeded_latents(got.shape, 2)))
        err = relative_error(got, ref.latents)
        print(f"fp16 bundle vs fp32 PyTorch: relative error {err:.2e}")
        assert err <= 1e-2


def test_verify_runs_every_stage_in_onnx_runtime(distilled_bundle):
    log = distilled_bundle.with_suffix(".log").read_text()  # the fixture exported with --verify
    errors = dict(re.findall(r"verify\s+(\w+): max \|ORT - PyTorch\| = (\S+)", log))
    assert set(errors) == {"embed", "block_0", "block_1", "block_2", "block_3", "compensate", "final"}, log
    assert all(float(e) < 1e-4 for e in errors.values()), errors


def test_a_failed_export_leaves_nothing_behind(tmp_path, distilled_checkpoint):
    ck = load_checkpoint(distilled_checkpoint)
    plan = make_plan(ck.config.num_layers, True, ck.metadata)
    calls = []

    def interrupt(stage):
        calls.append(stage)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_sd3(ck, plan, tmp_path / "x.engine", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_bundle_is_replaced_only_with_force(tmp_path, distilled_checkpoint, distilled_bundle):
    out = tmp_path / "b.engine"
    shutil.copytree(distilled_bundle, out)
    before = (out / "manifest.json").read_text()
    proc = run_cli("export-engine", str(distilled_checkpoint), "-o", str(out), "-q", "--steps", "3", check=False)
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert (out / "manifest.json").read_text() == before
    run_cli("export-engine", str(distilled_checkpoint), "-o", str(out), "-q", "--steps", "3", "--force")
    assert len(json.loads((out / "manifest.json").read_text())["program"]["steps"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.engine"]


def test_cli_rejects_bad_flags_with_usage_errors(tmp_path):
    ck = make_checkpoint(tmp_path / "c.pt", "--preset", "tiny")
    for flags, message in [(["--skip-blocks", "1-3"], "must lie within"), (["--steps", "0"], "at least 1"),
                           (["--skip-blocks", "x"], "form A-B"), (["--precision", "fp8"], "invalid choice"),
                           (["--shift", "0"], "must be positive"), (["--guidance-scale", "-1"], "negative")]:
        proc = run_cli("export-engine", str(ck), "-o", str(tmp_path / "o.engine"), *flags, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (flags, proc.stderr)
        assert not (tmp_path / "o.engine").exists()


def _on_disk(bundle):
    return {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} - {"manifest.json", "manifest.sha256"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_ends_an_export_with_130_and_removes_its_temporary(tmp_path, lemur_checkpoint, sig):
    """Break-it: SIGTERM (what `timeout` and service managers send) left `.X.engine.tmp-PID/` with half the stages, and
    Ctrl-C before the export had begun (while torch was being imported) gave a traceback. Both phases, both signals."""
    for phase in ("importing", "writing"):
        out = tmp_path / f"{phase}.engine"
        # Python ignores SIGINT in a child started from a background job: restore the default so Ctrl-C reaches it
        proc = subprocess.Popen([sys.executable, "-c", "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                                 "sys.argv = sys.argv[1:]; runpy.run_module('slimengine.export.cli', run_name='__main__')",
                                 "export-engine", str(lemur_checkpoint), "-o", str(out), "--precision", "int8", "-q"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        tmp = tmp_path / f".{out.name}.tmp-{proc.pid}"

        def reached(phase=phase, tmp=tmp, pid=proc.pid) -> bool:
            """importing: torch's library is being mapped (main's heavy imports); writing: stages/ exists."""
            if phase == "writing":
                return (tmp / "stages").exists()
            try:
                with open(f"/proc/{pid}/maps") as maps:
                    return "libtorch" in maps.read()
            except OSError:
                return False

        deadline = time.monotonic() + 120
        while not reached() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and f"export-engine: error: interrupted; {out} was not written" in err, (phase, err)
        assert "Traceback" not in err and not out.exists() and not tmp.exists(), (phase, err)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_export_leaves_a_temporary_that_the_next_export_removes(tmp_path, lemur_checkpoint):
    out = tmp_path / "k.engine"
    proc = subprocess.Popen([sys.executable, "-m", "slimengine.export.cli", str(lemur_checkpoint), "-o", str(out), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = tmp_path / f".k.engine.tmp-{proc.pid}"
    deadline = time.monotonic() + 120
    while not (tmp / "stages").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # mid-export: no chance to clean up
    proc.wait()
    assert (tmp / "stages").is_dir() and not out.exists(), "the export was not killed while writing its temporary"
    again = run_cli("export-engine", str(lemur_checkpoint), "-o", str(out), "-q")
    assert f"removed stale temporary {tmp} of an interrupted export" in again.stderr, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.engine"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == _on_disk(out) and {"stages/embed.onnx", "stages/score.onnx"} <= _on_disk(out)
    with se.open_engine(out, verify="full"):  # checks every file's sha256
        pass


def test_only_temporaries_of_dead_exports_are_removed(tmp_path):
    from slimengine.export.bundle import LOCK, write_bundle

    dead = [int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
            for _ in range(2)]
    live = [subprocess.Popen(["sleep", "600"]) for _ in range(2)]

    def temporary(pid, lock):
        path = tmp_path / f".b.engine.tmp-{pid}"
        (path / "stages").mkdir(parents=True)
        (path / "stages" / "x.onnx").write_bytes(b"partial")
        if lock:
            (path / LOCK).touch()
        return path

    try:
        held = temporary(dead[0], lock=True)  # lock held: a live export, whatever its PID says
        fd = os.open(held / LOCK, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        starting = temporary(live[0].pid, lock=False)  # no lock and a live PID: an export starting or publishing
        reused = temporary(live[1].pid, lock=True)  # lock free: its export died, and the PID is now another process's
        killed = temporary(dead[1], lock=False)  # no lock and a dead PID: killed before it locked (or an older exporter)
        reports = []

        def fill(directory):
            (directory / "a.txt").write_text("a")
            return {"format": "test"}

        try:
            manifest = write_bundle(tmp_path / "b.engine", fill, report=reports.append)
        finally:
            os.close(fd)
        assert held.is_dir() and starting.is_dir() and not reused.exists() and not killed.exists()
        assert sorted(reports) == sorted(f"removed stale temporary {p} of an interrupted export" for p in (reused, killed))
        assert manifest["files"] == {"a.txt": {"sha256": hashlib.sha256(b"a").hexdigest(), "size": 1}}  # the lock file is not part of the bundle
        assert _on_disk(tmp_path / "b.engine") == {"a.txt"}
    finally:
        for p in live:
            p.kill()
            p.wait()


def test_a_running_export_keeps_its_temporary_while_another_export_cleans_up(tmp_path, lemur_checkpoint):
    from slimengine.export.bundle import LOCK, remove_stale_temporaries

    out = tmp_path / "c.engine"
    first = subprocess.Popen([sys.executable, "-m", "slimengine.export.cli", str(lemur_checkpoint), "-o", str(out), "-q"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tmp = tmp_path / f".c.engine.tmp-{first.pid}"
    deadline = time.monotonic() + 120
    while not (tmp / LOCK).exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.poll() is None and (tmp / LOCK).exists()  # the export is in the middle of writing its stages
    assert remove_stale_temporaries(out) == [] and tmp.is_dir()  # what the next export does first
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.engine"]
    with se.open_engine(out):
        pass


CONCURRENT_WRITER = """
import os, sys, time
from pathlib import Path
from slimengine.export.bundle import write_bundle
destination, name, go, force = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "force"
def fill(directory):
    (directory / "who.txt").write_text(name)
    (directory.parent / f"{name}.ready").touch()
    while not go.exists():
        time.sleep(0.005)
    return {"format": "test"}
try:
    for _ in range(int(sys.argv[5])):
        write_bundle(destination, fill, force=force)
    print("published")
except FileExistsError as e:
    print("refused:", e)
"""


def test_two_exports_to_one_path_without_force_publish_one_and_refuse_the_other(tmp_path):
    """Both started before either published (the up-front existence check passed for both): the second to
    publish used to replace the first's bundle silently, and both reported success."""
    destination, go = tmp_path / "out" / "b.engine", tmp_path / "go"
    destination.parent.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, str(destination), name, str(go), "no", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    deadline = time.monotonic() + 60
    while not all((destination.parent / f"{n}.ready").exists() for n in "ab") and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs[0] == "published" and outs[1].startswith(f"refused: {destination} already exists (another export to it finished"), outs
    assert (destination / "who.txt").read_text() in "ab"
    assert sorted(p.name for p in destination.parent.iterdir()) == ["a.ready", "b.engine", "b.ready"]  # no temporary left


def test_replacing_a_bundle_with_force_never_leaves_the_path_missing(tmp_path):
    """--force swapped bundles with two renames: between them the destination did not exist (a reader failed
    to open it, and a kill -9 there left only a hidden .old copy). Now one exchange: always the old or the new."""
    destination, go = tmp_path / "out" / "b.engine", tmp_path / "go"
    destination.parent.mkdir()
    go.touch()
    writers = [subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, str(destination), name, str(go), "force", "150"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    while not destination.exists():
        time.sleep(0.001)
    missing = checks = 0
    while any(w.poll() is None for w in writers):
        checks += 1
        missing += not os.path.exists(destination / "manifest.json")
    results = [w.communicate(timeout=60) for w in writers]
    assert [out.strip() for out, _ in results] == ["published", "published"], results
    assert missing == 0 and checks > 1000, (missing, checks)
    assert sorted(p.name for p in destination.parent.iterdir()) == ["a.ready", "b.engine", "b.ready"]
