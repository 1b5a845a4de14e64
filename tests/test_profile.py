"""Profiling: the runtime's event records, the plain-plan override, and profile-engine's report, trace and plot."""

from __future__ import annotations

import ctypes
import json
import shutil
import struct

import numpy as np
import pytest

import slimengine as se
from slimengine.export.sampling_plan import scheduler_sigmas

from .conftest import CApiCall, run_cli

ITERS = 3


def _inputs(engine, batch=1, text_len=8):
    c = engine.config
    rng = np.random.default_rng(0)
    text = rng.standard_normal((batch, text_len, c["joint_attention_dim"]), dtype=np.float32)
    pooled = rng.standard_normal((batch, c["pooled_projection_dim"]), dtype=np.float32)
    return text, pooled, dict(negative_prompt_embeds=np.zeros_like(text), negative_pooled_embeds=np.zeros_like(pooled), seed=0)


def _inside(inner, outer) -> bool:
    return outer["start_ns"] <= inner["start_ns"] <= inner["end_ns"] <= outer["end_ns"]


def _ns(e) -> int:
    return e["end_ns"] - e["start_ns"]


def test_profiling_is_off_by_default_and_records_nested_events_that_add_up(cfg_bundle):
    engine = se.open_engine(cfg_bundle)
    session = engine.session()
    text, pooled, kwargs = _inputs(engine)
    assert session.generate(text, pooled, **kwargs).events == []
    session.profiling = True
    stage_share, step_share = [], []
    for _ in range(5):
        result = session.generate(text, pooled, **kwargs)
        kinds = [e["kind"] for e in result.events]
        assert kinds.count("generation") == kinds.count("prepare") == 1 and kinds[-1] == "generation"
        generation = result.events[-1]
        prepare = next(e for e in result.events if e["kind"] == "prepare")
        steps = [e for e in result.events if e["kind"] == "step"]
        stages = [e for e in result.events if e["kind"] == "stage"]
        assert [s["step"] for s in steps] == [0, 1, 2] and len(stages) == result.stats["stage_calls"]
        assert [s["level"] for s in steps] == [s["level"] for s in result.stats["per_step"]] == ["full"] * 3
        assert _inside(prepare, generation) and prepare["end_ns"] <= steps[0]["start_ns"]
        for before, after in zip(steps, steps[1:]):
            assert before["end_ns"] <= after["start_ns"]
        for step, per_step in zip(steps, result.stats["per_step"]):
            assert _inside(step, generation)
            assert _ns(step) / 1e6 == pytest.approx(per_step["ms"], rel=1e-9)  # the same clock reads as the stats
            mine = [e for e in stages if e["step"] == step["step"]]
            assert [e["stage"] for e in mine] == ["embed", "block_0", "block_1", "block_2", "block_3", "final"]
            assert [e["block"] for e in mine] == [-1, 0, 1, 2, 3, -1]
            assert all(_inside(e, step) for e in mine)
        for name, per_stage in result.stats["per_stage"].items():
            assert sum(_ns(e) for e in stages if e["stage"] == name) / 1e6 == pytest.approx(per_stage["ms"], rel=1e-9)
        assert all(e["device_ns"] is None for e in result.events)  # CPU: not measured, not faked
        stage_share.append(sum(map(_ns, stages)) / sum(map(_ns, steps)))
        step_share.append((_ns(prepare) + sum(map(_ns, steps))) / _ns(generation))
    print(f"stage time / step time {np.median(stage_share):.4f}; (prepare + steps) / generation {np.median(step_share):.4f}")
    assert max(stage_share) <= 1 and max(step_share) <= 1
    assert np.median(stage_share) >= 0.95 and np.median(step_share) >= 0.95  # median: robust to one preempted run
    session.profiling = False
    assert session.generate(text, pooled, **kwargs).events == []


def test_reused_steps_are_recorded_with_their_level_and_run_no_block(cfg_bundle):
    engine = se.open_engine(cfg_bundle)
    session = engine.session()
    session.profiling = True
    text, pooled, kwargs = _inputs(engine)
    result = session.generate(text, pooled, num_steps=6, xslim_threshold=1e9, **kwargs)
    levels = [e["level"] for e in result.events if e["kind"] == "step"]
    assert levels == ["full", "full", "reused", "reused", "reused", "full"]  # warm-up 2, the last step always computes
    for step, level in enumerate(levels):
        names = [e["stage"] for e in result.events if e["kind"] == "stage" and e["step"] == step]
        assert names == (["embed", "final"] if level == "reused" else ["embed", "block_0", "block_1", "block_2", "block_3", "final"])
    assert result.stats["effective_nfe"] == 2 * 3


def test_plain_plan_override_has_the_python_sigmas_and_equals_the_plain_bundle(identity_bundle, cfg_bundle):
    """identity_bundle and cfg_bundle hold the same weights: overridden to 3 plain steps, the 1.x bundle
    must give the plain bundle's latents bit for bit."""
    engine = se.open_engine(identity_bundle)
    session = engine.session()
    text, pooled, kwargs = _inputs(engine)
    kwargs["guidance_scale"] = 4.5
    plain = se.open_engine(cfg_bundle).session().generate(text, pooled, **kwargs)
    overridden = session.generate(text, pooled, num_steps=3, **kwargs)
    assert np.array_equal(overridden.latents, plain.latents)
    assert [s["level"] for s in overridden.stats["per_step"]] == ["full"] * 3 and overridden.stats["effective_nfe"] == 6
    for steps, shift in [(28, 3.0), (1, 3.0), (7, 1.0), (13, 2.5)]:
        per_step = session.generate(text, pooled, num_steps=steps, shift=shift, **kwargs).stats["per_step"]
        sigmas = [s["sigma"] for s in per_step] + [per_step[-1]["sigma_next"]]
        assert sigmas == list(scheduler_sigmas(steps, shift)), (steps, shift)
    assert session.generate(text, pooled, **kwargs).stats["effective_nfe"] == 2 * 2  # the bundle's 1.x program again


def test_bad_plan_overrides_and_event_reads_are_refused(identity_bundle):
    call = CApiCall(se.open_engine(identity_bundle))
    for overrides, message in [(dict(num_steps=-1), "num_steps must be 0"), (dict(num_steps=10001), "num_steps must be 0"),
                               (dict(num_steps=3, shift=-1.0), "shift must be 0 (the pipeline's scheduler shift, else 3) or a positive"),
                               (dict(num_steps=3, shift=float("nan")), "shift must be 0")]:
        status, text = call.generate(**overrides)
        assert status == "SLIM_ERR_INVALID_ARGUMENT" and message in text, (overrides, status, text)
    # shift 0 (the default since ABI 1.0) is the pipeline's scheduler shift, else 3.0: this bundle has no pipeline
    default, three = call.out.copy(), call.out.copy()
    assert call.generate(num_steps=3, shift=0.0, out=call.tensor(default)) == ("SLIM_OK", "")
    assert call.generate(num_steps=3, shift=3.0, out=call.tensor(three)) == ("SLIM_OK", "")
    assert np.array_equal(default, three)
    lib, handle = call.lib, call.session._handle
    event = se._native.Event(struct_size=ctypes.sizeof(se._native.Event))
    assert lib.slim_session_event_count(handle) == 0  # profiling off
    assert lib.slim_status_name(lib.slim_session_event(handle, 0, ctypes.byref(event))).decode() == "SLIM_ERR_INVALID_ARGUMENT"
    assert lib.slim_session_set_profiling(handle, 1) == 0 and call.generate() == ("SLIM_OK", "")
    # generation + prepare + 3 steps + stage calls (embed, 4 blocks, final; then embed, blocks 0 and 3, final twice)
    assert lib.slim_session_event_count(handle) == 1 + 1 + 3 + 6 + 4 + 4
    assert lib.slim_session_event(handle, 18, ctypes.byref(event)) == 0 and event.kind == 0 and event.step == -1
    small = se._native.Event(struct_size=8)
    assert lib.slim_session_event(handle, 0, ctypes.byref(small)) != 0 and "struct_size" in lib.slim_last_error().decode()
    assert lib.slim_session_set_profiling(None, 1) != 0


# ---- profile-engine ----


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, identity_bundle):
    """One profile-engine run over the 1.x (identity) bundle, with every output."""
    out = tmp_path_factory.mktemp("profile")
    paths = {"json": out / "report.json", "trace": out / "trace.json", "plot": out / "plot.png"}
    proc = run_cli("profile-engine", str(identity_bundle), "--iters", str(ITERS), "--warmup", "1", "--text-len", "8", "-q",
                   *(arg for kind, path in paths.items() for arg in (f"--{kind}", str(path))))
    return proc, paths


def test_profile_engine_prints_a_table_with_the_measured_baseline_speedup(profiled):
    proc, _ = profiled
    print(proc.stdout)
    for row in ("generation ", "step 0 (full)", "step 2 (skipped_range)", "stage embed", "stage final", "block 3", "prepare",
                "other host work", "effective NFE 2.00", "effective NFE 56.00", "speedup over the baseline:"):
        assert row in proc.stdout, row
    assert "block 1" in proc.stdout and "stage block_1" not in proc.stdout  # blocks once, by block


def test_the_json_report_follows_its_schema(profiled):
    report = json.loads(profiled[1]["json"].read_text())
    assert report["schema"] == "slimengine-profile" and report["schema_version"] == 2 and report["family"] == "sd3"
    assert report["settings"]["iters"] == ITERS and report["settings"]["device_time"] is False
    stats_keys = ["count", "min", "mean", "median", "p90", "p95", "p99", "max", "throughput_per_s"]
    g = report["generation"]
    assert [k for k in g if k in stats_keys] == stats_keys and g["count"] == ITERS and g["device"] is None
    assert g["min"] <= g["median"] <= g["p90"] <= g["p95"] <= g["p99"] <= g["max"] and g["min"] <= g["mean"] <= g["max"]
    assert g["throughput_per_s"] == pytest.approx(1e3 / g["mean"])
    assert [s["level"] for s in report["steps"]] == ["full", "skipped_range", "skipped_range"]
    assert [s["blocks_run"] for s in report["steps"]] == [4, 2, 2] and report["effective_nfe"] == 2.0
    assert report["stages"]["block_0"]["calls_per_generation"] == 3 and report["stages"]["block_1"]["calls_per_generation"] == 1
    assert [b["index"] for b in report["blocks"]] == [0, 1, 2, 3]
    heat = report["block_heatmap_ms"]
    assert [[v is not None for v in row] for row in heat] == [[True] * 4, [True, False, False, True], [True, False, False, True]]
    shares = sum(st["share"] for st in report["stages"].values()) + report["prepare"]["share"] + report["other_host"]["share"]
    assert shares == pytest.approx(1.0)
    base = report["baseline"]
    assert base["steps"] == 28 and base["effective_nfe"] == 56.0 and base["generation"]["count"] == ITERS
    assert report["speedup"]["mean"] == pytest.approx(base["generation"]["mean"] / g["mean"])
    assert report["speedup"]["mean"] > 1  # 28 CFG steps of the same blocks against 3 batch-1 steps


def test_the_chrome_trace_nests_stages_in_steps_in_generations_and_adds_up(profiled):
    trace = json.loads(profiled[1]["trace"].read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert all(isinstance(e["ts"], (int, float)) and e["dur"] >= 0 and e["pid"] == 1 for e in events)
    threads = {e["args"]["name"]: e["tid"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert set(threads) == {"engine", "baseline"}

    def inside(inner, outer, eps=1e-3):  # microseconds, ns resolution
        return outer["ts"] - eps <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"] + eps

    for plan, steps_per_generation in (("engine", 3), ("baseline", 28)):
        mine = [e for e in events if e["tid"] == threads[plan]]
        generations = [e for e in mine if e["name"] == "generate"]
        assert len(generations) == ITERS
        stage_share, step_share = [], []
        for g in generations:
            children = [e for e in mine if e is not g and inside(e, g)]
            steps = [e for e in children if e["cat"] == "step"]
            prepare = [e for e in children if e["cat"] == "prepare"]
            assert len(steps) == steps_per_generation and len(prepare) == 1
            assert [s["name"] for s in steps][:1] == ["step 0 (full)"]
            stage_total = 0.0
            for s in steps:
                assert s["name"] == f"step {s['args']['step']} ({s['args']['level']})"
                stages = [e for e in children if e["cat"] == "stage" and e["args"]["step"] == s["args"]["step"]]
                assert stages and all(inside(e, s) for e in stages), s["name"]
                assert stages[0]["name"] == "embed" and stages[-1]["name"] == "final"
                stage_total += sum(e["dur"] for e in stages)
            step_total = sum(s["dur"] for s in steps)
            stage_share.append(stage_total / step_total)
            step_share.append((step_total + prepare[0]["dur"]) / g["dur"])
        print(f"{plan}: stages / steps {np.median(stage_share):.4f}, (prepare + steps) / generation {np.median(step_share):.4f}")
        assert np.median(stage_share) >= 0.95 and np.median(step_share) >= 0.95
        assert max(stage_share) <= 1 + 1e-6 and max(step_share) <= 1 + 1e-6
    every_stage = [e for e in events if e["cat"] == "stage"]
    assert all(any(inside(e, s) for s in events if s["cat"] == "step" and s["tid"] == e["tid"]) for e in every_stage)


def test_the_plot_is_a_png_of_the_expected_size(profiled):
    data = profiled[1]["plot"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1200, 1400)
    assert len(data) > 50_000  # three drawn panels, not an empty canvas


def test_compare_prints_ratios_of_two_reports(profiled, cfg_bundle, tmp_path):
    other = tmp_path / "cfg.json"
    run_cli("profile-engine", str(cfg_bundle), "--iters", "2", "--warmup", "0", "--text-len", "8", "--no-baseline", "-q",
            "--json", str(other))
    proc = run_cli("profile-engine", "--compare", str(profiled[1]["json"]), str(other))
    print(proc.stdout)
    rows = {line[:34].strip(): line[34:].split() for line in proc.stdout.splitlines()[3:]}
    assert rows["effective NFE"] == ["2.000", "6.000", "3.000"]  # 3 plain CFG steps against the 1.x plan: 6 / 2
    assert rows["speedup vs baseline (mean)"][1:] == ["-", "-"]  # B was run without a baseline
    a, b, ratio = (float(x) for x in rows["generation mean ms"])
    assert ratio == pytest.approx(b / a, rel=1e-2)


def test_bad_arguments_get_one_line_errors(tmp_path, identity_bundle, profiled):
    unknown = tmp_path / "flux.engine"
    unknown.mkdir()
    manifest = json.loads((identity_bundle / "manifest.json").read_text())
    (unknown / "manifest.json").write_text(json.dumps(dict(manifest, family="flux")))
    not_a_report = tmp_path / "x.json"
    shutil.copy(identity_bundle / "manifest.json", not_a_report)
    report = str(profiled[1]["json"])
    cases = [
        ([str(tmp_path / "nothing.engine")], "no such engine"),
        ([str(identity_bundle), "--iters", "0"], "--iters must be at least 1, got 0"),
        ([str(identity_bundle), "--warmup", "-1"], "--warmup must be 0 or more"),
        ([str(identity_bundle), "--xslim", "teacache:0.1"], "unknown X-Slim policy 'teacache'"),
        ([str(identity_bundle), "--resolution", "7"], "--resolution 7: give a latent size"),
        ([str(tmp_path)], "is not an engine bundle"),
        ([str(unknown)], "model family 'flux' is not supported (expected sd3 or lemur)"),
        ([str(identity_bundle), "--program", "embed"], "--program applies to lemur engines"),
        (["--compare", report, str(tmp_path / "missing.json")], "no such report"),
        (["--compare", report, str(not_a_report)], "is not a profile-engine report"),
        ([], "an engine bundle is required"),
    ]
    for args, message in cases:
        proc = run_cli("profile-engine", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.returncode, proc.stderr)
        assert proc.stderr.startswith("profile-engine: error:") and proc.stderr.count("\n") == 1, proc.stderr
