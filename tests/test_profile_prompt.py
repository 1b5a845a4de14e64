"""Profiling prompt to image: ImageResult.spans on the runtime events' clock, and profile-engine --prompt's table,
report, trace and plot with the pipeline stages (tokenize, clip_l, clip_g, t5, the steps, vae_decode)."""

from __future__ import annotations

import json
import struct

import pytest

import slimengine as se
from tests.conftest import export, run_cli
from tests.pipeline_files import make_sd3_pipeline

ITERS, STEPS = 3, 4
PHASES = ("tokenize", "clip_l", "clip_g", "t5", "vae_decode")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = make_sd3_pipeline(tmp_path_factory.mktemp("profile-prompt") / "sd3")
    return export(folder, folder.parent / "sd3.engine", "--max-sequence-length", "16", "--steps", str(STEPS))


def _inside(inner, outer) -> bool:
    return outer["start_ns"] <= inner["start_ns"] <= inner["end_ns"] <= outer["end_ns"]


def test_spans_sum_to_stage_ms_and_share_the_events_clock(bundle):
    with se.Engine(bundle) as engine:
        session = engine.session()
        session.profiling = True
        result = session.generate(prompt="a red circle", negative_prompt="blurry", guidance_scale=4.0)
        spans = result.spans
        for phase in PHASES:
            mine = [s for s in spans if s["stage"] == phase]
            assert mine, phase
            assert sum(s["end_ns"] - s["start_ns"] for s in mine) / 1e6 == pytest.approx(result.stats["stage_ms"][phase], rel=1e-9)
        # 2 prompts (CFG) x 3 tokenizers, an encoder call per prompt, one decode
        assert [s["stage"] for s in spans].count("tokenize") == 6 and [s["stage"] for s in spans].count("clip_l") == 2
        generation = next(e for e in result.events if e["kind"] == "generation")
        encode, decode = [s for s in spans if s["stage"] != "vae_decode"], [s for s in spans if s["stage"] == "vae_decode"]
        # The same clock: the encoders end before the runtime's sampling call starts, the decode starts after it ends.
        assert max(s["end_ns"] for s in encode) <= generation["start_ns"] and generation["end_ns"] <= decode[0]["start_ns"]
        assert decode[0]["start_ns"] - generation["end_ns"] < 1e9 and generation["start_ns"] - encode[-1]["end_ns"] < 1e9
        again = session.generate(prompt="a red circle", negative_prompt="blurry", guidance_scale=4.0)  # cache hits: no encoder spans
        assert [s["stage"] for s in again.spans] == ["vae_decode"] and again.stats["stage_ms"]["clip_l"] == 0.0
        session.close()


@pytest.fixture(scope="module")
def profiled(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile-prompt-out")
    paths = {"json": out / "report.json", "trace": out / "trace.json", "plot": out / "plot.png"}
    proc = run_cli("profile-engine", str(bundle), "--prompt", "a red circle", "--negative", "blurry", "--iters", str(ITERS),
                   "--warmup", "1", "--no-baseline", "-q", *(arg for kind, path in paths.items() for arg in (f"--{kind}", str(path))))
    return proc, paths


def test_table_shows_the_pipeline_stages(profiled):
    proc, _ = profiled
    print(proc.stdout)
    lines = proc.stdout.splitlines()
    assert "prompt 'a red circle', negative 'blurry', image 64x64 px" in proc.stdout
    for row in ("prompt to image", "  tokenize", "  clip_l", "  clip_g", "  t5", "  steps (generation)", "  vae_decode",
                "generation ", "step 0 (full)", f"step {STEPS - 1} (full)", "block 1"):
        assert any(line.startswith(row) for line in lines), row
    assert any(line.startswith("  clip_l") and line.split()[1] == str(2 * ITERS) for line in lines)  # a prompt and its negative


def test_report_and_trace_agree(profiled):
    _, paths = profiled
    report = json.loads(paths["json"].read_text())
    prompt = report["prompt"]
    assert list(prompt["phases"]) == ["tokenize", "clip_l", "clip_g", "t5", "steps", "vae_decode"]
    assert prompt["image"]["count"] == ITERS and prompt["image_size"] == [64, 64]
    shares = sum(st["share"] for st in prompt["phases"].values()) + prompt["other_host"]["share"]
    assert shares == pytest.approx(1.0)
    assert prompt["phases"]["steps"]["per_generation_ms"] == pytest.approx(report["generation"]["mean"], rel=1e-9)

    trace = json.loads(paths["trace"].read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]

    def inside(inner, outer, eps=1e-3):  # microseconds, ns resolution
        return outer["ts"] - eps <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"] + eps

    calls = [e for e in events if e["cat"] == "image"]
    assert [c["name"] for c in calls] == ["prompt to image"] * ITERS
    for call in calls:
        children = [e for e in events if e is not call and inside(e, call)]
        names = [e["name"] for e in children if e["cat"] == "pipeline"]
        assert sorted(set(names)) == sorted(PHASES) and names.count("clip_l") == 2
        generation = [e for e in children if e["cat"] == "generation"]
        assert len(generation) == 1 and len([e for e in children if e["cat"] == "step"]) == STEPS
        decode = next(e for e in children if e["name"] == "vae_decode")
        assert all(e["ts"] + e["dur"] <= generation[0]["ts"] + 1e-3 for e in children if e["cat"] == "pipeline" and e is not decode)
        assert decode["ts"] >= generation[0]["ts"] + generation[0]["dur"] - 1e-3
    for phase in PHASES:  # the trace's durations are the report's
        total_us = sum(e["dur"] for e in events if e["cat"] == "pipeline" and e["name"] == phase)
        assert total_us / 1e3 / ITERS == pytest.approx(prompt["phases"][phase]["per_generation_ms"], rel=1e-6), phase
    assert sum(c["dur"] for c in calls) / 1e3 / ITERS == pytest.approx(prompt["image"]["mean"], rel=1e-6)

    data = paths["plot"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (1200, 1400)


def test_compare_has_the_phase_rows(profiled):
    report = str(profiled[1]["json"])
    proc = run_cli("profile-engine", "--compare", report, report)
    for row in ("prompt to image mean ms", "phase clip_l ms/image", "phase vae_decode ms/image"):
        assert row in proc.stdout, row


def test_prompt_needs_pipeline_stages(identity_bundle, bundle):
    cases = [
        ([str(identity_bundle), "--prompt", "a cat"], "has no pipeline stages"),
        ([str(bundle), "--negative", "blurry"], "--negative goes with --prompt"),
        ([str(bundle), "--prompt", "a cat", "--text-len", "8"], "--text-len and --prompt"),
    ]
    for args, message in cases:
        proc = run_cli("profile-engine", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.returncode, proc.stderr)
        assert proc.stderr.startswith("profile-engine: error:") and proc.stderr.count("\n") == 1, proc.stderr
