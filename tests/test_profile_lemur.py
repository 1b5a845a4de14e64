"""LEMUR profiling: the runtime's events for embed and score, and profile-engine on a LEMUR bundle."""

from __future__ import annotations

import ctypes
import json
import struct

import numpy as np
import pytest

import slimengine as se

from .conftest import run_cli

ITERS = 5
BATCH, HISTORY = 2, 16


def _documents(config: dict, n: int, rng) -> dict:
    c = config
    return dict(text_ids=rng.integers(1, c["vocab_size"], (n, c["max_text_len"])),
                frames=rng.standard_normal((n, c["max_frames"], 3, c["image_size"], c["image_size"]), dtype=np.float32))


def _inside(inner, outer) -> bool:
    return outer["start_ns"] <= inner["start_ns"] <= inner["end_ns"] <= outer["end_ns"]


def _ms(e) -> float:
    return (e["end_ns"] - e["start_ns"]) / 1e6


def test_embed_and_score_record_nested_events_with_the_clock_reads_of_their_stats(lemur_bundle, tmp_path):
    engine = se.open_engine(lemur_bundle)
    c = engine.config
    session = engine.session()
    bank = se.MemoryBank(tmp_path / "profile.bank", c["embed_dim"])
    rng = np.random.default_rng(0)
    assert session.embed(**_documents(c, 8, rng), bank=bank, document_ids=np.arange(8)).events == []  # off by default
    session.profiling = True
    for i in range(5):
        embedded = session.embed(**_documents(c, 3, rng), bank=bank, document_ids=100 + 3 * i + np.arange(3))
        assert [e["kind"] for e in embedded.events] == ["stage", "bank", "generation"]
        stage, upsert, call = embedded.events
        assert stage["stage"] == "embed" and stage["block"] == -1 and upsert["stage"] is None
        assert all(e["step"] == -1 and e["level"] is None and e["device_ns"] is None for e in embedded.events)
        assert _inside(stage, call) and _inside(upsert, call) and stage["end_ns"] <= upsert["start_ns"]
        # the same clock reads as slim_lemur_stats
        assert _ms(stage) == pytest.approx(embedded.stats["backend_ms"], rel=1e-9)
        assert _ms(upsert) == pytest.approx(embedded.stats["bank_ms"], rel=1e-9)
        assert _ms(call) == pytest.approx(embedded.stats["total_ms"], rel=1e-9)

        scored = session.score(bank, rng.permutation(8).reshape(2, 4), rng.integers(1, c["vocab_size"], (2, c["max_query_len"])))
        assert [e["kind"] for e in scored.events] == ["bank", "stage", "generation"]
        assembly, stage, call = scored.events
        assert stage["stage"] == "score" and _inside(assembly, call) and _inside(stage, call)
        assert assembly["end_ns"] <= stage["start_ns"]
        assert _ms(assembly) == pytest.approx(scored.stats["bank_ms"], rel=1e-9)
        assert _ms(stage) == pytest.approx(scored.stats["backend_ms"], rel=1e-9)
        assert _ms(call) == pytest.approx(scored.stats["total_ms"], rel=1e-9)

    # in C: the bank event is kind SLIM_EVENT_BANK (4), the call SLIM_EVENT_GENERATION (0), last
    lib, handle = se._native.lib(), session._handle
    event = se._native.Event(struct_size=ctypes.sizeof(se._native.Event))
    assert lib.slim_session_event_count(handle) == 3
    assert [lib.slim_session_event(handle, i, ctypes.byref(event)) == 0 and event.kind for i in range(3)] == [4, 3, 0]

    # embed without a bank records no bank work; a score that fails leaves no call event behind
    assert [e["kind"] for e in session.embed(**_documents(c, 1, rng)).events] == ["stage", "generation"]
    with pytest.raises(se.SlimError, match="not in the memory bank"):
        session.score(bank, [[123456]], rng.integers(1, c["vocab_size"], (1, 4)))
    assert lib.slim_session_event_count(handle) == 0
    session.profiling = False
    assert session.score(bank, [[0, 1]], [[5, 6]]).events == []
    bank.close()


def test_a_plain_onnx_engine_refuses_profiling(lemur_bundle):
    session = se.open_engine(lemur_bundle / "stages" / "embed.onnx").session()
    with pytest.raises(se.SlimError, match="this engine's family is 'onnx'"):
        session.profiling = True


# ---- profile-engine ----


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, lemur_bundle):
    """One profile-engine run over the tiny LEMUR bundle (both programs), with every output."""
    out = tmp_path_factory.mktemp("profile-lemur")
    paths = {"json": out / "report.json", "trace": out / "trace.json", "plot": out / "plot.png"}
    proc = run_cli("profile-engine", str(lemur_bundle), "--batch", str(BATCH), "--history", str(HISTORY), "--iters", str(ITERS),
                   "--warmup", "1", "-q", *(arg for kind, path in paths.items() for arg in (f"--{kind}", str(path))))
    return proc, paths


def test_profile_engine_prints_calls_stages_and_bank_work_of_both_programs(profiled):
    proc, _ = profiled
    print(proc.stdout)
    lines = proc.stdout.splitlines()
    assert f"batch {BATCH}, history {HISTORY}, text 48, frames 4, query 16" in lines[0]
    assert f"bank of {BATCH * HISTORY} documents" in lines[1]
    for row in ("embed call ", "  stage embed ", "  bank upsert ", "score call ", "  stage score ", "  bank history assembly ",
                "  other host work ", "documents/s", "scores/s", "no baseline: a LEMUR bundle has no reference plan"):
        assert row in proc.stdout, row
    assert "\nstep " not in proc.stdout and "\nblock " not in proc.stdout and "speedup" not in proc.stdout


def test_the_lemur_json_report_follows_its_schema(profiled):
    report = json.loads(profiled[1]["json"].read_text())
    assert report["schema"] == "slimengine-profile" and report["schema_version"] == 2 and report["family"] == "lemur"
    assert report["baseline"] is None and "no reference plan" in report["baseline_note"]
    assert report["engine"]["stages"] == ["embed", "score"] and report["engine"]["embed_dim"] == 32
    s = report["settings"]
    assert (s["programs"], s["batch"], s["history"], s["iters"], s["bank_documents"]) == (["embed", "score"], BATCH, HISTORY, ITERS,
                                                                                            BATCH * HISTORY)
    stats_keys = ["count", "min", "mean", "median", "p90", "p95", "p99", "max", "throughput_per_s"]
    for program, unit in (("embed", "documents_per_s"), ("score", "scores_per_s")):
        p = report["programs"][program]
        call = p["call"]
        assert [k for k in call if k in stats_keys] == stats_keys and call["count"] == ITERS and call["device"] is None
        assert call["min"] <= call["median"] <= call["p90"] <= call["p95"] <= call["p99"] <= call["max"]
        assert call[unit] == pytest.approx(call["throughput_per_s"] * BATCH)
        assert list(p["stages"]) == [program] and p["stages"][program]["calls_per_call"] == 1
        assert p["bank"]["calls_per_call"] == 1 and p["bank"]["count"] == ITERS
        shares = p["stages"][program]["share"] + p["bank"]["share"] + p["other_host"]["share"]
        assert shares == pytest.approx(1.0)
        assert 0 <= p["other_host"]["mean"] and p["other_host"]["share"] < 0.5
    assert report["programs"]["embed"]["bank"]["work"] == "bank upsert"
    assert report["programs"]["score"]["bank"]["work"] == "bank history assembly"


def test_the_lemur_trace_nests_stage_and_bank_in_calls_and_adds_up(profiled):
    trace = json.loads(profiled[1]["trace"].read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    threads = {e["args"]["name"]: e["tid"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert threads == {"embed": 1, "score": 2}

    def inside(inner, outer, eps=1e-3):  # microseconds, ns resolution
        return outer["ts"] - eps <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"] + eps

    for program, bank_name in (("embed", "bank upsert"), ("score", "bank history assembly")):
        mine = [e for e in events if e["tid"] == threads[program]]
        calls = [e for e in mine if e["cat"] == "call"]
        assert [c["name"] for c in calls] == [f"{program} call"] * ITERS
        assert [c["args"] for c in calls] == [{"iteration": i, "batch": BATCH} for i in range(ITERS)]
        covered = []
        for call in calls:
            children = [e for e in mine if e["cat"] != "call" and inside(e, call)]
            assert sorted((e["cat"], e["name"]) for e in children) == [("bank", bank_name), ("stage", program)]
            covered.append(sum(e["dur"] for e in children) / call["dur"])
        print(f"{program}: (stage + bank) / call, median {np.median(covered):.4f}")
        assert max(covered) <= 1 + 1e-6 and np.median(covered) >= 0.95  # median: robust to one preempted call
        assert all(any(inside(e, c) for c in calls) for e in mine if e["cat"] != "call")


def test_the_lemur_plot_is_a_png_of_the_expected_size(profiled):
    data = profiled[1]["plot"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1200, 800)
    assert len(data) > 30_000  # two drawn panels, not an empty canvas


def test_one_program_and_compare_of_two_lemur_reports(profiled, lemur_bundle, tmp_path):
    other = tmp_path / "score.json"
    proc = run_cli("profile-engine", str(lemur_bundle), "--program", "score", "--batch", "4", "--history", "8", "--iters", "2",
                   "--warmup", "0", "-q", "--json", str(other))
    assert "score call" in proc.stdout and "embed call" not in proc.stdout
    assert list(json.loads(other.read_text())["programs"]) == ["score"]
    proc = run_cli("profile-engine", "--compare", str(profiled[1]["json"]), str(other))
    print(proc.stdout)
    assert proc.stdout.splitlines()[1].endswith(", batch 4, history 8)")
    rows = {line[:34].strip(): line[34:].split() for line in proc.stdout.splitlines()[3:]}
    assert rows["embed documents/s"][1:] == ["-", "-"]  # B timed score only
    a, b, ratio = (float(x) for x in rows["score call mean ms"])
    assert ratio == pytest.approx(b / a, rel=1e-2)
    assert {"score stage score ms/call", "score bank ms/call", "score other host ms/call", "score scores/s"} <= set(rows)


def test_bad_lemur_arguments_get_one_line_errors(lemur_bundle, profiled, tmp_path):
    sd3 = tmp_path / "sd3.engine"
    sd3.mkdir()
    (sd3 / "manifest.json").write_text(json.dumps({"family": "sd3"}))
    sd3_report = tmp_path / "sd3.json"
    sd3_report.write_text(json.dumps({"schema": "slimengine-profile", "schema_version": 2, "family": "sd3"}))
    bundle = str(lemur_bundle)
    cases = [
        ([bundle, "--xslim", "none"], f"--xslim applies to sd3 engines; {bundle} is a lemur engine"),
        ([bundle, "--resolution", "64"], "--resolution applies to sd3 engines"),
        ([bundle, "--text-len", "8"], "--text-len applies to sd3 engines"),
        ([str(sd3), "--program", "embed"], f"--program applies to lemur engines; {sd3} is a sd3 engine"),
        ([str(sd3), "--history", "4"], "--history applies to lemur engines"),
        ([bundle, "--history", "0"], "--history must be at least 1, got 0"),
        ([bundle, "--history", "5000"], "--history 5000: this engine takes histories of at most 4096 documents"),
        ([bundle, "--batch", "5000"], "--batch 5000: this engine takes at most 4096 per call"),
        (["--compare", str(profiled[1]["json"]), str(sd3_report)], "cannot compare a lemur report"),
    ]
    for args, message in cases:
        proc = run_cli("profile-engine", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.returncode, proc.stderr)
        assert proc.stderr.startswith("profile-engine: error:") and proc.stderr.count("\n") == 1, proc.stderr
    proc = run_cli("profile-engine", bundle, "--program", "all", check=False)  # argparse's own choice check
    assert proc.returncode == 2 and "invalid choice: 'all'" in proc.stderr
