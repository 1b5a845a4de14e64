"""Prompt tokenization in the C runtime (docs/tokenizers.md): the native CLIP BPE and T5 Unigram tokenizers give the
ids transformers' tokenizers give with diffusers' SD3 call, on the toy's and SD3's own tokenizer folders; the files
they read are validated at export and at open; slim_tokenize validates its arguments at the C boundary."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from slimengine import Engine, SlimError, _native  # noqa: E402

from .conftest import edit_manifest, export, run_cli, sanitized_executable  # noqa: E402
from .tokenizer_files import make_pipeline_tokenizers, make_sd3_tokenizers, make_t5_json_only  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORPUS = [
    "", " ", "a red circle", "A Red CIRCLE", "HELLO world", "Hello, World!!! It's 2024...", "e.g. U.S.A. -- (a) [b] {c} #1 @x",
    "don't you're we'll I'M it's 's", "café au lait, crème brûlée", "naïve Ünïcödé ß ﬁ İstanbul ΑΒΓ", "東京の夜景", "ＡＢＣ full width",
    "ramen 🍜🍜 yum 👩‍👩‍👧", "  lots   of\t\twhitespace \n here  ", "tab\tsep", "a\u00a0b\u3000c\u2003d", "line\r\nbreak",
    "123456 3.14 a1b2c3", "!!!???", "x" * 300, "word " * 100, "a photo of a cat, " * 40, "<|endoftext|> inside",
    "a close-up photo of a dog's face", "the quick brown fox jumps over the lazy dog", "cafe\u0301 decomposed", "</s> <pad> <extra_id_3>",
]
ROLES = {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5": "tokenizer_3"}
CORPUS_SIZE = 10_000  # per tokenizer folder: the conformance corpus of docs/tokenizers.md
FUZZ_PROMPTS = 300  # per tokenizer folder and run, from a fresh seed (printed on failure)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return make_pipeline_tokenizers(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def sd3_tokenizers(tmp_path_factory):
    return make_sd3_tokenizers(tmp_path_factory.mktemp("sd3-tokenizers"))


@pytest.fixture(scope="module")
def tok_bundle(tmp_path_factory, plain_checkpoint, pipeline):
    return export(plain_checkpoint, tmp_path_factory.mktemp("tok") / "tok.engine", "--tokenizers", str(pipeline),
                  "--max-sequence-length", "64")


@pytest.fixture(scope="module")
def sd3_tok_bundle(tmp_path_factory, plain_checkpoint, sd3_tokenizers):
    return export(plain_checkpoint, tmp_path_factory.mktemp("sd3tok") / "sd3tok.engine", "--tokenizers", str(sd3_tokenizers))


@pytest.fixture(scope="module")
def engine(tok_bundle):
    with Engine(tok_bundle) as e:
        yield e


def _transformers(folder: Path) -> dict:
    from transformers import CLIPTokenizer, T5TokenizerFast

    return {"clip_l": CLIPTokenizer.from_pretrained(folder / "tokenizer"), "clip_g": CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
            "t5": T5TokenizerFast.from_pretrained(folder / "tokenizer_3")}


def _lengths(bundle: Path) -> dict:
    return {t["role"]: t["max_length"] for t in json.loads((bundle / "manifest.json").read_text())["tokenizers"]}


@pytest.fixture(scope="module")
def reference(pipeline):
    """diffusers' SD3 tokenizer calls with the same files (max_sequence_length 64 as exported)."""
    toks = _transformers(pipeline)

    def ids(role, prompt):
        return toks[role](prompt, padding="max_length", max_length=64 if role == "t5" else 77, truncation=True)["input_ids"]

    return ids


def test_manifest_lists_tokenizers(tok_bundle, engine):
    manifest = json.loads((tok_bundle / "manifest.json").read_text())
    assert [(t["role"], t["kind"], t["file"], t["max_length"]) for t in manifest["tokenizers"]] == [
        ("clip_l", "clip_bpe", "tokenizers/clip_l.json", 77), ("clip_g", "clip_bpe", "tokenizers/clip_g.json", 77),
        ("t5", "unigram", "tokenizers/t5.json", 64)]
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


# Pieces the generated prompts are made of: words with case, contractions, accents (composed and decomposed), ligatures,
# Turkish dotted I, Greek sigma, CJK, Hangul, emoji sequences and flags, the tokenizers' special tokens (also in other
# case), full-width forms, prime marks whose NFKC form is ambiguous to segment, U+2581.
WORDS = ("a red circle blue square photo of the cat dog's it's you're we'll I'M don't café naïve ÜNÏCÖDÉ ß ﬁ İstanbul ΑΒΓΣ ΟΔΟΣ "
         "東京 ラーメン 한국어 🍜 👩‍👩‍👧 🇫🇷 <|endoftext|> <|startoftext|> <|ENDOFTEXT|> </s> <pad> <unk> <extra_id_0> <extra_id_99> ▁x ! !! "
         "hi! a!b 123 3.14 x1y2 ｅ\u0301 ﬁ\u0301 e\u0301\u0302 ‴ क्ष ﷺ").split()
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2003", "\u2028", "\x85", "\x0b", "\u200b", "\x1f"]
BLOCKS = [(0x300, 0x370), (0x4E00, 0x9FFF), (0xAC00, 0xD7A4), (0x1100, 0x1200), (0x900, 0x980), (0x1F1E6, 0x1F200), (0x1F300, 0x1FA00),
          (0xFF00, 0xFFEF), (0x590, 0x700), (0x2000, 0x2070), (0xFB00, 0xFB50), (0x1D400, 0x1D800)]


def _random_char(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.3:
        return chr(rng.randrange(0x20, 0x7F))
    if r < 0.6:
        return chr(rng.randrange(*rng.choice(BLOCKS)))
    while True:  # any code point but surrogates (refused as not UTF-8, below) and NUL (C strings)
        c = rng.randrange(1, 0x110000)
        if not 0xD800 <= c < 0xE000:
            return chr(c)


def _prompts(count: int, seed: int) -> list[str]:
    """Words and whitespace runs, random Unicode (CJK, RTL, combining marks, emoji, controls, unassigned), the two mixed,
    and lengths around the truncation lengths (77 CLIP ids, 256 T5 ids) and far past them."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.35:
            out.append("".join(rng.choice(WORDS) + rng.choice(SPACES) for _ in range(rng.randrange(0, 40))))
        elif kind < 0.7:
            out.append("".join(_random_char(rng) for _ in range(rng.randrange(0, 80))))
        elif kind < 0.9:
            out.append("".join(rng.choice(WORDS) + _random_char(rng) for _ in range(rng.randrange(0, 120))))
        else:
            out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randrange(60, 400))))
    return out


def _mismatches(bundle: Path, folder: Path, prompts: list[str]) -> dict:
    toks, lengths = _transformers(folder), _lengths(bundle)
    found = {}
    with Engine(bundle) as engine:
        for role, tok in toks.items():
            want = tok(prompts, padding="max_length", max_length=lengths[role], truncation=True)["input_ids"]
            got = [engine.tokenize(role, p).tolist() for p in prompts]
            bad = [(p, g, w) for p, g, w in zip(prompts, got, want) if g != w]
            if bad:
                found[role] = (len(bad), [(p[:60], g[:12], w[:12]) for p, g, w in bad[:3]])
    return found


@pytest.mark.parametrize("which", ["toy", "sd3"])
def test_conformance_corpus(which, tok_bundle, pipeline, sd3_tok_bundle, sd3_tokenizers):
    """Every id of every role equal to transformers' on 10,000 generated prompts per folder (docs/tokenizers.md)."""
    bundle, folder = (tok_bundle, pipeline) if which == "toy" else (sd3_tok_bundle, sd3_tokenizers)
    assert not _mismatches(bundle, folder, _prompts(CORPUS_SIZE, seed=1 if which == "toy" else 2))


def test_fuzz(sd3_tok_bundle, sd3_tokenizers):
    """A bounded fuzz run: fresh prompts each run, the seed printed for a rerun."""
    seed = int.from_bytes(os.urandom(4), "little")
    assert not _mismatches(sd3_tok_bundle, sd3_tokenizers, _prompts(FUZZ_PROMPTS, seed)), f"fuzz seed {seed}"


def test_sd3_known_ids(sd3_tok_bundle):
    """SD3's tokenizers on a caption: the ids openai/clip-vit-large-patch14 and T5 v1.1 are known to give."""
    with Engine(sd3_tok_bundle) as e:
        assert e.tokenize("clip_l", "a photo of a cat").tolist()[:8] == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
        assert e.tokenize("clip_g", "a photo of a cat!").tolist()[:9] == [49406, 320, 1125, 539, 320, 2368, 0, 49407, 0]
        assert e.tokenize("t5", "a photo of a cat").tolist()[:9] == [3, 9, 1202, 13, 3, 9, 1712, 1, 0]


def test_long_prompts_are_fast(sd3_tok_bundle):
    """64 KiB prompts (the limit) of the shapes that were quadratic or heavy: well under 0.1 s each, per tokenizer
    (benchmarks/bench_tokenizers.py measures the time and its growth)."""
    shapes = {"words": "red " * 16384, "one word": "x" * 65536, "cjk": "東" * 21845, "marks": "a" + "\u0301" * 32767,
              "digits": "1" * 65536, "emoji": "👩‍👩‍👧" * 3640}
    with Engine(sd3_tok_bundle) as e:
        for name, prompt in shapes.items():
            assert len(prompt.encode()) <= 65536, name
            for role in ROLES:
                e.tokenize(role, prompt)
                start = time.perf_counter()
                e.tokenize(role, prompt)
                assert time.perf_counter() - start < 0.1, (name, role)


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


def test_tokenizer_manifest_validation(tmp_path, tok_bundle):
    """A tokenizers entry with an unknown role, kind or file is refused at open, naming the field; an entry of the
    onnxruntime-extensions bundles this runtime no longer runs says to re-export."""
    bundle = tmp_path / "b.engine"
    shutil.copytree(tok_bundle, bundle)
    original = json.loads((bundle / "manifest.json").read_text())["tokenizers"]

    def tokenizers(entries):
        edit_manifest(bundle, lambda m: m.__setitem__("tokenizers", entries))

    cases = [({"role": "bert", "kind": "clip_bpe", "file": "tokenizers/clip_l.json", "max_length": 77}, r"tokenizers\[0\]\.role 'bert' is not clip_l"),
             ({"role": "t5", "kind": "clip_bpe", "file": "tokenizers/t5.json", "max_length": 77}, r"tokenizers\[0\]\.kind 'clip_bpe' is not unigram"),
             ({"role": "t5", "kind": "unigram", "file": "tokenizers/nope.json", "max_length": 77}, r"'tokenizers/nope.json' is not listed"),
             ({"role": "t5", "kind": "unigram", "file": "tokenizers/t5.json", "max_length": 1}, r"tokenizers\[0\]\.max_length"),
             ({"role": "t5", "file": "tokenizers/t5.onnx", "max_length": 64}, "onnxruntime-extensions graph .* re-export the bundle"),
             ({"role": "t5", "kind": "unigram", "file": "tokenizers/clip_l.json", "max_length": 64}, r"tokenizer t5 \(tokenizers/clip_l.json\): format")]
    for entry, message in cases:
        tokenizers([entry])
        with pytest.raises(SlimError, match=message) as e:
            Engine(bundle)
        assert e.value.status == "SLIM_ERR_BUNDLE"
    tokenizers(original)
    with Engine(bundle) as e:
        assert e.tokenizer_roles == ["clip_l", "clip_g", "t5"]


def _replace_file(bundle: Path, rel: str, data: bytes) -> None:
    """Write a bundle file and re-sign the manifest, as an attacker who can write the bundle would."""
    (bundle / rel).write_bytes(data)
    edit_manifest(bundle, lambda m: m["files"].__setitem__(rel, {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}))


def _hostile_clip(data: dict) -> dict:
    """CLIP tokenizer files the runtime must refuse, from a valid one: name -> (file bytes, message)."""
    vocab = data["vocab"]
    first, second = list(vocab)[:2]

    def changed(**fields):
        return json.dumps({**data, **fields}).encode()

    return {
        "duplicate id": (changed(vocab={**vocab, second: vocab[first]}), "is given to two tokens"),
        "huge id": (changed(vocab={**vocab, first: 2**62}), "vocab"),
        "id past the size": (changed(vocab={**vocab, first: len(vocab)}), "vocab"),
        "negative id": (changed(vocab={**vocab, first: -1}), "vocab"),
        "merge of unknown tokens": (changed(merges=data["merges"] + [["zzq", "qzz"]]), "names a token the vocab lacks"),
        "merge not a pair": (changed(merges=[["a"]]), "must be a pair"),
        "repeated merge": (changed(merges=data["merges"] + data["merges"][:1]), "repeats an earlier merge"),
        "bos past the vocab": (changed(bos_id=len(vocab)), "bos_id"),
        "added token past the vocab": (changed(added_tokens=[{"content": "x", "id": 10**9, "normalized": False}]), "added_tokens"),
        "added token of 33 bytes": (changed(added_tokens=[{"content": "x" * 33, "id": 0, "normalized": False}]), "must be 1 to 32 bytes"),
        "repeated added token": (changed(added_tokens=[{"content": "x", "id": 0, "normalized": True}] * 2), "repeats an earlier added token"),
        "wrong format": (changed(format="other"), "format is not slimengine-clip-bpe"),
        "not JSON": (b"{\"vocab\": ", "json"),
        "too many tokens": (b'{"format":"slimengine-clip-bpe","vocab":{' + b",".join(b'"t%d":%d' % (i, i) for i in range((1 << 20) + 1)) +
                            b'},"merges":[],"added_tokens":[],"bos_id":0,"eos_id":0,"pad_id":0,"unk_id":0}', "tokens; 1 to 1048576"),
    }


def _hostile_t5(data: dict) -> dict:
    pieces = data["pieces"]

    def changed(**fields):
        return json.dumps({**data, **fields}).encode()

    import base64

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    charsmap = base64.b64decode(data["charsmap"])
    trie_past_end = b64(len(charsmap).to_bytes(4, "little") + charsmap[4:])
    return {
        "repeated piece": (changed(pieces=pieces + pieces[:1]), "repeats an earlier piece"),
        "unk past the pieces": (changed(unk_id=len(pieces)), "unk_id"),
        "eos past the ids": (changed(eos_id=2**40), "eos_id"),
        "score not a number": (changed(pieces=[[pieces[0][0], "x"]] + pieces[1:]), "score"),
        "charsmap not base64": (changed(charsmap="$$$$"), "charsmap is not base64"),
        "charsmap trie past its end": (changed(charsmap=trie_past_end), "charsmap's trie size does not fit it"),
        "charsmap too short": (changed(charsmap="AAA="), "charsmap is shorter than its header"),
        # a replacement of kilobytes made a 64 KiB prompt 64 MB of text (2 GB, 10 s); one without a NUL would end outside
        "charsmap replacement of 65 bytes": (changed(charsmap=b64(charsmap + b"b" * 65 + b"\0")), "replacement of 65 bytes"),
        "charsmap strings without a NUL": (changed(charsmap=b64(charsmap + b"bb")), "has no NUL terminator"),
        "repeated added token": (changed(added_tokens=[{"content": "<x>", "id": 0}] * 2), "repeats an earlier added token"),
    }


def test_hostile_tokenizer_files_are_refused_at_open(tmp_path, tok_bundle):
    """Each tokenizer file of a bundle is validated when the bundle opens: SLIM_ERR_BUNDLE naming the file and the problem,
    whatever the file claims (its digest re-signed, as a bundle writer could)."""
    for role, hostile in (("clip_l", _hostile_clip), ("t5", _hostile_t5)):
        rel = f"tokenizers/{role}.json"
        cases = hostile(json.loads((tok_bundle / rel).read_text()))
        for name, (data, message) in cases.items():
            bundle = tmp_path / f"{role}-{name.replace(' ', '-')}.engine"
            shutil.copytree(tok_bundle, bundle)
            _replace_file(bundle, rel, data)
            with pytest.raises(SlimError, match=message) as e:
                Engine(bundle)
            assert e.value.status == "SLIM_ERR_BUNDLE" and rel in str(e.value), (name, str(e.value))
            shutil.rmtree(bundle)


@pytest.fixture(scope="module")
def tokenizer_check(tmp_path_factory) -> Path:
    """runtime/tests/tokenizer_check.cpp with the tokenizers' sources, built with AddressSanitizer and UBSan."""
    sources = [ROOT / "runtime/tests/tokenizer_check.cpp"] + [ROOT / f"runtime/src/{n}.cpp" for n in ("clip_tokenizer", "t5_tokenizer",
                                                                                                     "unicode_text", "json")]
    return sanitized_executable(tmp_path_factory.mktemp("tokcheck") / "tokenizer_check", sources)


def _run_check(exe: Path, kind: str, file: Path, max_length: int, prompts: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    records = tmp_path / "prompts.bin"
    records.write_bytes(b"".join(b"%d\n" % len(p.encode()) + p.encode() for p in prompts))
    proc = subprocess.run([str(exe), kind, str(file), str(max_length), str(records)], capture_output=True, text=True, timeout=600,
                          env={"ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"})
    assert "Sanitizer" not in proc.stderr and "runtime error" not in proc.stderr, proc.stderr
    return proc


def test_sanitizers_hostile_files_and_fuzzed_prompts(tokenizer_check, tok_bundle, sd3_tok_bundle, sd3_tokenizers, tmp_path):
    """Under AddressSanitizer and UBSan: every hostile file above refused (exit 2, one line), and SD3's tokenizers on
    fuzzed prompts, ids still equal to transformers'."""
    for role, hostile in (("clip_l", _hostile_clip), ("t5", _hostile_t5)):
        kind = "t5" if role == "t5" else "clip"
        for name, (data, message) in hostile(json.loads((tok_bundle / f"tokenizers/{role}.json").read_text())).items():
            path = tmp_path / f"{role}.json"
            path.write_bytes(data)
            proc = _run_check(tokenizer_check, kind, path, 64, ["a cat"], tmp_path)
            assert proc.returncode == 2 and proc.stdout.startswith("refused: ") and message.split()[0] in proc.stdout, (name, proc.stdout)
    seed = int.from_bytes(os.urandom(4), "little")
    prompts = _prompts(FUZZ_PROMPTS, seed) + ["red " * 16384, "a" + "\u0301" * 32767]
    toks = _transformers(sd3_tokenizers)
    for role, max_length in _lengths(sd3_tok_bundle).items():
        proc = _run_check(tokenizer_check, "t5" if role == "t5" else "clip", sd3_tok_bundle / f"tokenizers/{role}.json", max_length,
                          prompts, tmp_path)
        assert proc.returncode == 0, proc.stdout[-500:] + proc.stderr
        got = [[int(x) for x in line.split()] for line in proc.stdout.splitlines()]
        want = toks[role](prompts, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
        assert got == want, f"fuzz seed {seed}, role {role}"


def _vocab_folder(tmp_path: Path, pipeline: Path, edit) -> Path:
    """A copy of the toy tokenizer folders with tokenizer/vocab.json (or merges.txt) edited."""
    folder = tmp_path / "pipe"
    shutil.copytree(pipeline, folder)
    edit(folder / "tokenizer")
    return folder


def _edit_vocab(change):
    def edit(folder):
        vocab = json.loads((folder / "vocab.json").read_text())
        (folder / "vocab.json").write_text(json.dumps(change(vocab)))
    return edit


def test_hostile_vocabularies_refused_at_export(tmp_path, plain_checkpoint, pipeline):
    """Source vocabularies the runtime would refuse are refused before transformers reads them: exit 2, one line naming the
    file, no bundle and no temporary left (a duplicate id once ended the exporter in malloc's abort)."""
    first = list(json.loads((pipeline / "tokenizer/vocab.json").read_text()))[:2]

    def merges_with_unknown(folder):
        (folder / "merges.txt").write_text((folder / "merges.txt").read_text() + "zzq qzz\n")

    def vocab_of(count):
        def edit(folder):
            with open(folder / "vocab.json", "w") as f:
                f.write("{" + ",".join(f'"t{i}":{i}' for i in range(count)) + "}")
        return edit

    def write(name, text):
        return lambda folder: (folder / name).write_text(text)

    def tokenizer_json(spec):
        def edit(folder):
            (folder / "vocab.json").unlink()
            (folder / "merges.txt").unlink()
            (folder / "tokenizer.json").write_text(json.dumps(spec))
        return edit

    def config(**fields):
        def edit(folder):
            (folder / "tokenizer_config.json").write_text(json.dumps({**json.loads((folder / "tokenizer_config.json").read_text()), **fields}))
        return edit

    def fifo_config(folder):
        (folder / "tokenizer_config.json").unlink()
        os.mkfifo(folder / "tokenizer_config.json")

    def not_a_folder(folder):
        shutil.rmtree(folder)
        folder.write_text("x")

    cases = {
        "duplicate id": (_edit_vocab(lambda v: {**v, first[1]: v[first[0]]}), "is given to two tokens"),
        "huge id": (_edit_vocab(lambda v: {**v, first[0]: 2**62}), "ids must be integers from 0 to"),
        "merges naming unknown tokens": (merges_with_unknown, "names a token the vocabulary lacks"),
        "2^20 + 1 entries": (vocab_of((1 << 20) + 1), "at most 1048576 are accepted"),
        "10^7 entries": (vocab_of(10**7), "a tokenizer file of at most 64 MiB is accepted"),  # refused unread
        # found by the break-it pass: tracebacks (exit 1) or a bundle the runtime then refused
        "nested 10^5 deep": (write("vocab.json", "[" * 100000), "not valid JSON"),
        "tokenizer.json a list": (tokenizer_json([]), "must be a JSON object"),
        "merges of numbers": (tokenizer_json({"model": {"vocab": {"a": 0}, "merges": [1]}}), "is not a pair of token strings"),
        "merges of objects": (tokenizer_json({"model": {"vocab": {"a": 0}, "merges": [[{"x": 1}, "a"]]}}), "is not a pair of token strings"),
        "merges not UTF-8": (lambda folder: (folder / "merges.txt").write_bytes(b"#version: 0.2\n\xff \xfe\n"), "merges.txt: not UTF-8"),
        "model_max_length 1": (config(model_max_length=1), "must be an integer from 2 to 4096"),
        "model_max_length -5": (config(model_max_length=-5), "must be an integer from 2 to 4096"),
        "model_max_length 77.5": (config(model_max_length=77.5), "must be an integer from 2 to 4096"),
        "model_max_length '77'": (config(model_max_length="77"), "must be an integer from 2 to 4096"),
        "a FIFO as the config": (fifo_config, "not a regular file"),
        "a file, not a folder": (not_a_folder, "not a folder"),
    }
    for name, (edit, message) in cases.items():
        case = tmp_path / "".join(c if c.isalnum() else "-" for c in name)
        folder = _vocab_folder(case, pipeline, edit)
        out = case / "out.engine"
        proc = run_cli("export-engine", str(plain_checkpoint), "--tokenizers", str(folder), "-o", str(out), "-q", check=False)
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0] and "pipe/tokenizer" in lines[0], (name, proc.stderr)
        assert not out.exists() and not [p for p in case.iterdir() if p.name.startswith(".out.engine")], name


def test_t5_folder_with_only_tokenizer_json(tmp_path, plain_checkpoint, sd3_tokenizers):
    """A T5 folder as T5TokenizerFast.save_pretrained writes it today (tokenizer.json, no spiece.model) exports, and its
    ids are T5TokenizerFast's."""
    folder = tmp_path / "pipe"
    folder.mkdir()
    make_t5_json_only(sd3_tokenizers / "tokenizer_3", folder / "tokenizer_3")
    assert not (folder / "tokenizer_3/spiece.model").exists()
    bundle = export(plain_checkpoint, tmp_path / "t5.engine", "--tokenizers", str(folder))
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(folder / "tokenizer_3")
    prompts = CORPUS + _prompts(500, seed=3)
    want = tok(prompts, padding="max_length", max_length=256, truncation=True)["input_ids"]
    with Engine(bundle) as e:
        assert e.tokenizer_roles == ["t5"]
        assert [e.tokenize("t5", p).tolist() for p in prompts] == want


def test_normalized_added_token_content_is_normalized(tmp_path, plain_checkpoint, pipeline):
    """An added token registered normalized=true with content in upper case ("<X>") is looked for in normalized (lower
    case) text, its content normalized too, as transformers does: "<x>" and "<X>" both give its id (found by the break-it
    pass: the runtime compared the raw content and never matched)."""
    folder = tmp_path / "pipe"
    shutil.copytree(pipeline, folder)
    clip = folder / "tokenizer"
    vocab = json.loads((clip / "vocab.json").read_text())
    vocab["<X>"] = len(vocab)
    (clip / "vocab.json").write_text(json.dumps(vocab))
    config = json.loads((clip / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(vocab["<X>"]): {"content": "<X>", "lstrip": False, "normalized": True, "rstrip": False,
                                                           "single_word": False, "special": True}}
    (clip / "tokenizer_config.json").write_text(json.dumps(config))
    bundle = export(plain_checkpoint, tmp_path / "x.engine", "--tokenizers", str(folder))
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(clip)
    prompts = ["<x>", "<X>", "a <X> b", "<X><x>", "<\u0058>", "< X >"]
    want = tok(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert sum(row.count(vocab["<X>"]) for row in want) >= 5  # transformers finds the token in each form
    with Engine(bundle) as e:
        assert [e.tokenize("clip_l", p).tolist() for p in prompts] == want


def test_expanding_t5_normalizer_refused_at_export(tmp_path, plain_checkpoint, pipeline):
    """A SentencePiece model whose normalization rules map a character to more than 64 bytes (here 'q' to 100 'b's:
    each 64 KiB prompt became 6 MB of text, seconds and gigabytes per call) is refused at export, in one line."""
    import sentencepiece as spm

    from .tokenizer_files import CAPTIONS

    folder = tmp_path / "pipe"
    shutil.copytree(pipeline, folder)
    rules = tmp_path / "rules.tsv"
    rules.write_text("71\t" + " ".join(["62"] * 100) + "\n")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS), model_prefix=str(folder / "tokenizer_3" / "spiece"), vocab_size=90,
                                   hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2, normalization_rule_tsv=str(rules))
    proc = run_cli("export-engine", str(plain_checkpoint), "--tokenizers", str(folder), "-o", str(tmp_path / "x.engine"), "-q", check=False)
    assert proc.returncode == 2 and "maps a character to 100 bytes; at most 64 are accepted" in proc.stderr, proc.stderr
    assert not (tmp_path / "x.engine").exists()
