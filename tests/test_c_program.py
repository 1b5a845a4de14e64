"""The C library from C: the example program, and open -> generate -> close under AddressSanitizer."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import slimengine as se
from slimengine import _native

ROOT = Path(__file__).resolve().parents[1]


def _env():
    return dict(os.environ, SLIMENGINE_ORT_LIBRARY=_native.onnxruntime_library())


def _lcg_inputs(seed: int, batch: int, text_len: int, joint: int, pooled: int):
    """The example program's repeatable embeddings (an LCG), rebuilt in numpy."""
    state = (seed + 1) & 0xFFFFFFFF
    out = []
    for n in (batch * text_len * joint, batch * pooled):
        values = np.empty(n, dtype=np.float32)
        for i in range(n):
            state = (state * 1664525 + 1013904223) & 0xFFFFFFFF
            values[i] = np.float32(2.0) * (np.float32(state >> 8) / np.float32(16777216.0) - np.float32(0.5))
        out.append(values)
    return out[0].reshape(batch, text_len, joint), out[1].reshape(batch, pooled)


def test_example_program_generates_the_same_latents_as_python(tmp_path, distilled_bundle):
    out = tmp_path / "latents.f32"
    proc = subprocess.run([str(_native.example_program()), str(distilled_bundle), "--seed", "5", "--text-len", "3", "--size", "8",
                           "--out", str(out)], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"steps 2, effective NFE 1\.500, blocks run 6, stage calls 11", proc.stdout), proc.stdout
    engine = se.open_engine(distilled_bundle)
    text, pooled = _lcg_inputs(5, 1, 3, engine.config["joint_attention_dim"], engine.config["pooled_projection_dim"])
    expected = engine.session().generate(text, pooled, seed=5, height=8, width=8).latents
    assert np.array_equal(np.fromfile(out, dtype=np.float32).reshape(expected.shape), expected)


def test_example_program_reports_errors(tmp_path):
    proc = subprocess.run([str(_native.example_program()), str(tmp_path / "missing.engine")], capture_output=True, text=True, env=_env())
    assert proc.returncode == 1 and "cannot open" in proc.stderr and "manifest.json" in proc.stderr


@pytest.fixture(scope="module")
def asan_build(tmp_path_factory) -> Path:
    if not shutil.which("cmake"):
        pytest.skip("cmake not installed")
    build = tmp_path_factory.mktemp("asan")
    headers = ROOT / "third_party/onnxruntime-headers/onnxruntime"
    # The library's structs get fields past ABI 1.0's (SLIM_TEST_FUTURE_FIELDS): the example and slim-old-caller,
    # built against the 1.0 header, are the older callers a later 1.x library must serve.
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-DSLIM_SANITIZE=ON", "-DSLIM_TEST_FUTURE_FIELDS=ON",
                    "-DCMAKE_BUILD_TYPE=Debug", f"-DORT_INCLUDE_DIR={headers}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    return build


def test_open_generate_close_is_clean_under_address_sanitizer(asan_build, distilled_bundle, tmp_path):
    env = dict(_env(), ASAN_OPTIONS="detect_leaks=1:halt_on_error=1", UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    for args in ([str(distilled_bundle), "--size", "16", "--batch", "2"], [str(tmp_path / "missing.engine")]):
        proc = subprocess.run([str(asan_build / "slimengine-example"), *args], capture_output=True, text=True, env=env)
        report = proc.stdout + proc.stderr
        assert "Sanitizer" not in report and "runtime error" not in report, report
        assert proc.returncode == (0 if len(args) > 1 else 1), report


def test_a_caller_of_the_older_header_is_served_within_its_structs(asan_build, distilled_bundle, tmp_path):
    """runtime/tests/old_caller.c against a library whose structs are 8 bytes larger: each slim_*_params_init writes
    exactly the caller's struct, open, generate and the bank read only its struct_size bytes and write only that many of
    the stats (guard bytes and AddressSanitizer), and a struct_size past the library's or below 1.0's is refused."""
    env = dict(_env(), ASAN_OPTIONS="detect_leaks=1:halt_on_error=1", UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    proc = subprocess.run([str(asan_build / "slim-old-caller"), str(distilled_bundle), str(tmp_path / "old.bank")],
                          capture_output=True, text=True, env=env)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0 and proc.stdout.strip() == "ok" and "Sanitizer" not in report, report


def test_tokenizer_files_at_open_are_clean_under_address_sanitizer(asan_build, plain_checkpoint, tmp_path):
    """The sanitizer build opens a bundle with native tokenizers and runs it; each hostile tokenizer file of
    tests/test_tokenizer.py is refused at open (exit 1, the file named) with no sanitizer report."""
    from tests.test_tokenizer import _hostile_clip, _hostile_t5, _replace_file
    from tests.tokenizer_files import make_pipeline_tokenizers

    from .conftest import export

    bundle = export(plain_checkpoint, tmp_path / "tok.engine", "--tokenizers", str(make_pipeline_tokenizers(tmp_path / "pipe")),
                    "--max-sequence-length", "64")
    env = dict(_env(), ASAN_OPTIONS="detect_leaks=1:halt_on_error=1", UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")

    def run(path):
        proc = subprocess.run([str(asan_build / "slimengine-example"), str(path), "--size", "16"], capture_output=True, text=True, env=env)
        report = proc.stdout + proc.stderr
        assert "Sanitizer" not in report and "runtime error" not in report, report
        return proc

    assert run(bundle).returncode == 0
    for role, hostile in (("clip_l", _hostile_clip), ("t5", _hostile_t5)):
        rel = f"tokenizers/{role}.json"
        for name, (data, _) in hostile(json.loads((bundle / rel).read_text())).items():
            if name == "too many tokens":  # 10^6 entries: covered by test_tokenizer.py without the sanitizers' cost
                continue
            copy = tmp_path / "hostile.engine"
            shutil.copytree(bundle, copy)
            _replace_file(copy, rel, data)
            proc = run(copy)
            assert proc.returncode == 1 and rel in proc.stderr, (name, proc.stderr)
            shutil.rmtree(copy)
