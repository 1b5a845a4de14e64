"""The C++ JSON reader (runtime/src/json.cpp): its corpus (runtime/tests/json_test.cpp) built with the sanitizers,
and a differential test against Python's json module made as strict (slimengine.bundle.loads_strict)."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

import slimengine as se
from slimengine.bundle import digest_line, loads_strict

from .conftest import sanitized_executable

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "runtime/tests/json_test.cpp", ROOT / "runtime/src/json.cpp"]


@pytest.fixture(scope="module")
def json_test(tmp_path_factory) -> Path:
    return sanitized_executable(tmp_path_factory.mktemp("json") / "json_test", SOURCES)


def test_the_corpus_passes_under_the_sanitizers(json_test):
    proc = subprocess.run([str(json_test)], capture_output=True, text=True, timeout=600,
                          env={"ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"})
    print(proc.stdout)
    assert proc.returncode == 0 and "runtime error" not in proc.stderr and "Sanitizer" not in proc.stderr, proc.stdout + proc.stderr
    assert " 0 failed" in proc.stdout.splitlines()[-1]


def _python_accepts(doc: bytes) -> bool:
    try:
        loads_strict(doc)
    except ValueError:
        return False
    return True


SEEDS = [
    b'{"format": "slimengine-bundle", "format_version": 2, "files": {"stages/a.onnx": {"sha256": "ab", "size": 12}}}',
    b'{"kind": "xslim", "early_warning": 0.05, "schedule": [{"level": "full"}, {"level": "token", "sample_ratio": 0.5}]}',
    '["\\u00e9\\ud83d\\ude00", -0.5e-3, 12, true, false, null, {"": []}, "\\\\\\"/", "caf\u00e9 \U0001F600"]'.encode(),
    b'[[[[[[[[1]]]]]]], {"a": {"b": {"c": [0.1e1, 1E+2, -0]}}}]',
]
ALPHABET = b'{}[]":,\\u0123456789abcdefABCDEF.eE+- \n\t\r\x00\x1f\x7f\x80\xbf\xc3\xed\xf0\xf4\xfftrunlsfaNIdD'


def _mutate(rng: random.Random, doc: bytes) -> bytes:
    doc = bytearray(doc)
    for _ in range(rng.randint(1, 4)):
        if not doc:
            break
        at = rng.randrange(len(doc))
        op = rng.randrange(5)
        if op == 0:
            doc[at] = rng.choice(ALPHABET)
        elif op == 1:
            doc.insert(at, rng.choice(ALPHABET))
        elif op == 2:
            del doc[at:at + rng.randint(1, 3)]
        elif op == 3:
            start = rng.randrange(len(doc))
            doc[at:at] = doc[start:start + rng.randint(1, 8)]
        else:
            del doc[at:]
    return bytes(doc)


def test_the_c_reader_accepts_exactly_what_strict_python_json_accepts(json_test, tmp_path):
    """slimengine.bundle.loads_strict (Python's json made as strict) and the C reader agree on every document."""
    rng = random.Random(1234)
    docs = [_mutate(rng, rng.choice(SEEDS)) for _ in range(6000)] + SEEDS
    docs += [b'"\\ud800"', b'"\\udc00\\ud800"', b"1e400", b"-1e400", b"[" * 64 + b"]" * 64, b"[" * 65 + b"]" * 65, b"01", b"-Infinity",
             b'{"a": 1, "a": 1}', b'"\xed\xa0\x80"', b"\xef\xbb\xbf[]", b"[1.]", b'"\\u00"', b'"\\uZZZZ"', b'"\\u0000"', b'{"\\u0000": 1}']
    corpus = tmp_path / "corpus"
    corpus.write_bytes(b"".join(b"%d\n%s" % (len(d), d) for d in docs))
    proc = subprocess.run([str(json_test), "--classify", str(corpus)], capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode(errors="replace").splitlines()
    assert len(lines) == len(docs)
    disagreements = [(d, line) for d, line in zip(docs, lines) if (line == "ok") != _python_accepts(d)]
    assert not disagreements, disagreements[:10]
    assert all(line == "ok" or line.startswith("error json: ") for line in lines)
    accepted = sum(line == "ok" for line in lines)
    assert 100 < accepted < len(docs) - 100  # both outcomes well represented


def test_a_bad_escape_is_an_invalid_argument_in_a_policy_and_a_bundle_error_in_a_manifest(distilled_bundle, bundle_copy):
    from .conftest import CApiCall

    with se.open_engine(distilled_bundle) as engine:
        call = CApiCall(engine)
        for policy, message in [(b'{"kind": "\\uZZZZ"}', "bad \\u escape"), (b'{"kind": "\\ud800"}', "unpaired surrogate in \\u escape"),
                                (b'{"kind": "xslim", "kind": "none"}', 'duplicate key "kind"'),
                                (b'{"warmup_steps": 02}', "number with a leading zero"), (b'{"early_warning": -Infinity}', "bad number"),
                                (b'{"kind": "caf\xe9"}', "invalid UTF-8")]:
            status, error = call.generate(xslim_policy=policy)
            assert status == "SLIM_ERR_INVALID_ARGUMENT" and f"xslim_policy: json: {message}" in error, (policy, error)
    text = (bundle_copy / "manifest.json").read_bytes().replace(b'"family": "sd3"', b'"family": "sd3", "note": "\\uZZZZ"', 1)
    (bundle_copy / "manifest.json").write_bytes(text)
    (bundle_copy / "manifest.sha256").write_bytes(digest_line(text))
    with pytest.raises(se.SlimError) as err:
        se.open_engine(bundle_copy)
    assert err.value.status == "SLIM_ERR_BUNDLE" and "manifest.json: json: bad \\u escape: 4 hex digits expected" in str(err.value)
