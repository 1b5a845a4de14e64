"""Prompt tokenization in the C runtime (docs/tokenizers.md): the bundle's tokenizer stages give the ids transformers'
tokenizers give with diffusers' SD3 call, and slim_tokenize validates its arguments at the C boundary."""

from __future__ import annotations

import ctypes
import json
import os

import numpy as np
import pytest

pytest.importorskip("onnxruntime_extensions")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from slimengine import Engine, SlimError, _native  # noqa: E402

from .conftest import export, run_python  # noqa: E402
from .tokenizer_files import make_pipeline_tokenizers  # noqa: E402

CORPUS = [
    "", " ", "a red circle", "A Red CIRCLE", "HELLO world", "Hello, World!!! It's 2024...", "e.g. U.S.A. -- (a) [b] {c} #1 @x",
    "don't you're we'll I'M it's 's", "café au lait, crème brûlée", "naïve Ünïcödé ß ﬁ İstanbul ΑΒΓ", "東京の夜景", "ＡＢＣ full width",
    "ramen 🍜🍜 yum 👩‍👩‍👧", "  lots   of\t\twhitespace \n here  ", "tab\tsep", "a\u00a0b\u3000c\u2003d", "line\r\nbreak",
    "123456 3.14 a1b2c3", "!!!???", "x" * 300, "word " * 100, "a photo of a cat, " * 40, "<|endoftext|> inside",
    "a close-up photo of a dog's face", "the quick brown fox jumps over the lazy dog",
]
ROLES = {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5": "tokenizer_3"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return make_pipeline_tokenizers(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def tok_bundle(tmp_path_factory, plain_checkpoint, pipeline):
    return export(plain_checkpoint, tmp_path_factory.mktemp("tok") / "tok.engine", "--tokenizers", str(pipeline),
                  "--max-sequence-length", "64")


@pytest.fixture(scope="module")
def engine(tok_bundle):
    with Engine(tok_bundle) as e:
        yield e


@pytest.fixture(scope="module")
def reference(pipeline):
    """diffusers' SD3 tokenizer calls with the same files (max_sequence_length 64 as exported)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    toks = {"clip_l": (CLIPTokenizer.from_pretrained(pipeline / "tokenizer"), 77),
            "clip_g": (CLIPTokenizer.from_pretrained(pipeline / "tokenizer_2"), 77),
            "t5": (T5TokenizerFast.from_pretrained(pipeline / "tokenizer_3"), 64)}

    def ids(role, prompt):
        tok, n = toks[role]
        return tok(prompt, padding="max_length", max_length=n, truncation=True, add_special_tokens=True)["input_ids"]

    return ids


def test_manifest_lists_tokenizers(tok_bundle, engine):
    manifest = json.loads((tok_bundle / "manifest.json").read_text())
    assert [(t["role"], t["max_length"]) for t in manifest["tokenizers"]] == [("clip_l", 77), ("clip_g", 77), ("t5", 64)]
    assert engine.tokenizer_roles == ["clip_l", "clip_g", "t5"]


@pytest.mark.parametrize("role", list(ROLES))
def test_ids_equal_transformers(engine, reference, role):
    mismatches = []
    for prompt in CORPUS:
        got = engine.tokenize(role, prompt)
        assert got.dtype == np.int64
        want = reference(role, prompt)
        if got.tolist() != want:
            mismatches.append((prompt[:40], got.tolist()[:20], want[:20]))
    assert not mismatches, mismatches


def test_truncation_and_padding(engine, reference):
    """Over-long prompts keep max_length - 1 content ids and end with eos; short ones pad with the tokenizer's pad id."""
    long = "a photo of a cat, " * 40
    clip = engine.tokenize("clip_l", long)
    assert len(clip) == 77 and clip[-1] == reference("clip_l", "")[1]  # eos last, not cut off
    t5 = engine.tokenize("t5", long)
    assert len(t5) == 64 and t5[-1] == 1
    short_l, short_g = engine.tokenize("clip_l", "a cat"), engine.tokenize("clip_g", "a cat")
    eos = reference("clip_l", "")[1]
    assert short_l[-1] == eos and short_g[-1] == 0  # tokenizer_2 pads with "!" (id 0) as SD3's does
    assert engine.tokenize("t5", "")[0] == 1 and not engine.tokenize("t5", "").tolist()[1:].count(1)


def test_nfd_input_is_a_documented_difference(engine, reference):
    """transformers' CLIP normalizer applies NFC; the extensions op does not (docs/tokenizers.md): NFC text matches."""
    import unicodedata

    nfd = unicodedata.normalize("NFD", "café")
    assert engine.tokenize("clip_l", unicodedata.normalize("NFC", nfd)).tolist() == reference("clip_l", nfd)


def _c_tokenize(engine, role, prompt, capacity=256, ids=True):
    lib = _native.lib()
    count = ctypes.c_size_t(12345)
    buf = (ctypes.c_int64 * max(capacity, 1))()
    status = lib.slim_tokenize(engine._handle, role, prompt, buf if ids else None, capacity, ctypes.byref(count))
    return status, count.value, list(buf)[:capacity], lib.slim_last_error().decode()


def test_c_boundary_errors(engine):
    lib = _native.lib()
    invalid = 1  # SLIM_ERR_INVALID_ARGUMENT
    count = ctypes.c_size_t()
    buf = (ctypes.c_int64 * 77)()
    assert lib.slim_tokenize(None, b"clip_l", b"a", buf, 77, ctypes.byref(count)) == invalid
    assert lib.slim_tokenize(engine._handle, None, b"a", buf, 77, ctypes.byref(count)) == invalid
    assert lib.slim_tokenize(engine._handle, b"clip_l", None, buf, 77, ctypes.byref(count)) == invalid
    assert lib.slim_tokenize(engine._handle, b"clip_l", b"a", buf, 77, None) == invalid
    status, n, _, err = _c_tokenize(engine, b"vae", b"a")
    assert status == invalid and "no tokenizer 'vae'" in err and "clip_l, clip_g, t5" in err
    # Too small a buffer: refused, nothing written, count tells the size needed (capacity 0 sizes the buffer).
    status, n, written, err = _c_tokenize(engine, b"clip_l", b"a cat", capacity=76)
    assert status == invalid and n == 77 and written == [0] * 76 and "holds 76" in err
    status, n, _, _ = _c_tokenize(engine, b"t5", b"a cat", capacity=0, ids=False)
    assert status == invalid and n == 64
    status, n, _, err = _c_tokenize(engine, b"clip_l", b"a cat", capacity=77, ids=False)
    assert status == invalid and "ids_out is NULL" in err
    for bad in [b"\xff", b"caf\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok \x80 no"]:
        status, n, written, err = _c_tokenize(engine, b"clip_l", bad)
        assert status == invalid and "not valid UTF-8" in err and written == [0] * 256, bad
    status, _, _, err = _c_tokenize(engine, b"t5", b"x" * (64 * 1024 + 1))
    assert status == invalid and "at most 65536" in err
    assert _c_tokenize(engine, b"t5", b"x" * (64 * 1024))[0] == 0  # the limit itself is accepted
    with pytest.raises(SlimError, match="not valid UTF-8"):
        engine.tokenize("clip_l", "lone \ud800 surrogate")
    with pytest.raises(ValueError, match="NUL"):
        engine.tokenize("clip_l", "a\0b")


def test_a_nul_in_any_name_or_path_passed_to_c_is_refused(engine, tok_bundle, tmp_path):
    """C ends a string at its first NUL: tokenize("t5\\0x", ...) silently tokenized with "t5", and Engine("b\\0x") opened
    "b". Every str the binding hands to C goes through one check (_native.c_string) that refuses a NUL."""
    import slimengine as se

    with pytest.raises(ValueError, match="role contains a NUL"):
        engine.tokenize("t5\0x", "a cat")
    with pytest.raises(ValueError, match="prompt contains a NUL"):
        engine.tokenize("t5", "a\0b")
    with pytest.raises(ValueError, match="path contains a NUL"):
        Engine(f"{tok_bundle}\0x")
    with pytest.raises(ValueError, match="onnxruntime_library contains a NUL"):
        Engine(tok_bundle, onnxruntime_library=f"{_native.onnxruntime_library()}\0x")
    with pytest.raises(ValueError, match="path contains a NUL"):
        se.verify_bundle(f"{tok_bundle}\0x")
    with pytest.raises(ValueError, match="path contains a NUL"):
        se.MemoryBank(f"{tmp_path / 'bank'}\0x", 4)
    assert not list(tmp_path.iterdir())  # no bank file made under the name cut at the NUL
    session = engine.session()
    try:
        ids = np.zeros((1, 77), np.int64)
        hidden, pooled = np.zeros((1, 77, 8), np.float32), np.zeros((1, 8), np.float32)
        with pytest.raises(ValueError, match="stage contains a NUL"):
            session.run_stage(f"{engine.stage_names[0]}\0x", {"input_ids": ids}, {"hidden_states": hidden, "pooled": pooled})
        with pytest.raises(ValueError, match="tensor name contains a NUL"):
            session.run_stage(engine.stage_names[0], {"input_ids\0x": ids}, {})
    finally:
        session.close()


def test_without_tokenizers(identity_bundle):
    """A bundle exported without --tokenizers has none, and says how to get them."""
    with Engine(identity_bundle) as e:
        assert e.tokenizer_roles == []
        with pytest.raises(SlimError, match="none; export it with --tokenizers"):
            e.tokenize("clip_l", "a cat")


def test_extensions_library_from_the_environment(tok_bundle):
    """The C runtime takes the library from SLIMENGINE_EXTENSIONS_LIBRARY: unset or wrong, a clear BACKEND error."""
    code = f"""
import ctypes, os
from slimengine import Engine, _native
e = Engine({str(tok_bundle)!r})
lib, n, buf = _native.lib(), ctypes.c_size_t(), (ctypes.c_int64 * 77)()
os.environ.pop("SLIMENGINE_EXTENSIONS_LIBRARY", None)
print(lib.slim_tokenize(e._handle, b"clip_l", b"a", buf, 77, ctypes.byref(n)), lib.slim_last_error().decode())
os.environ["SLIMENGINE_EXTENSIONS_LIBRARY"] = "/nonexistent/libortextensions.so"
print(lib.slim_tokenize(e._handle, b"clip_l", b"a", buf, 77, ctypes.byref(n)), lib.slim_last_error().decode())
"""
    env_before = os.environ.pop("SLIMENGINE_EXTENSIONS_LIBRARY", None)
    try:
        proc = run_python(code, timeout=120)
    finally:
        if env_before is not None:
            os.environ["SLIMENGINE_EXTENSIONS_LIBRARY"] = env_before
    assert proc.returncode == 0, proc.stderr
    unset, missing = proc.stdout.splitlines()
    assert unset.startswith("4 ") and "set SLIMENGINE_EXTENSIONS_LIBRARY" in unset
    assert missing.startswith("4 ") and "/nonexistent/libortextensions.so" in missing


def test_tokenizer_manifest_validation(bundle_copy, pipeline):
    """A tokenizers entry with an unknown role is refused at load, naming the field."""
    from .conftest import edit_manifest

    def tokenizers(entries):
        edit_manifest(bundle_copy, lambda m: m.__setitem__("tokenizers", entries))

    stage_file = json.loads((bundle_copy / "manifest.json").read_text())["stages"][0]["file"]
    tokenizers([{"role": "bert", "file": stage_file, "max_length": 77}])
    with pytest.raises(SlimError, match=r"tokenizers\[0\]\.role 'bert' is not clip_l"):
        Engine(bundle_copy)
    tokenizers([{"role": "t5", "file": "stages/nope.onnx", "max_length": 77}])
    with pytest.raises(SlimError, match=r"tokenizers\[0\]\.file 'stages/nope.onnx' is not listed"):
        Engine(bundle_copy)
    tokenizers([{"role": "t5", "file": stage_file, "max_length": 1}])
    with pytest.raises(SlimError, match=r"tokenizers\[0\]\.max_length"):
        Engine(bundle_copy)
    # A graph that is not a tokenizer: the engine loads (tokenizers load on first use), tokenize says what is wrong.
    tokenizers([{"role": "t5", "file": stage_file, "max_length": 77}])
    with Engine(bundle_copy) as e, pytest.raises(SlimError, match="tokenizer_t5: graph inputs are"):
        e.tokenize("t5", "a cat")
