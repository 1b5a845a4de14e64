"""Benchmark of the runtime's native prompt tokenizers (CLIP byte-level BPE, T5 Unigram: docs/tokenizers.md) on
64 KiB prompts, the longest slim_tokenize accepts, against transformers' tokenizers from the same files in the same run.

A bundle with tokenizers (by default SD3's own, from tests/data) is exported from a tiny plain checkpoint (make-sd3-checkpoint --preset tiny --plain, then
export-engine --tokenizers FOLDER; or --bundle), and each of its roles (clip_l, clip_g, t5) tokenizes five prompt shapes:

- red:   "red " * 16384 (the break-it case: one short word repeated);
- word:  one 64 KiB word ("x" * 65536);
- cjk:   random CJK unified ideographs (U+4E00-U+9FFF, 3 bytes each);
- marks: "a" and combining acute accents (U+0301), whole characters under 65536 bytes;
- ascii: random printable ASCII, about one character in six a space.

- speed: Engine.tokenize (the C ABI slim_tokenize) against transformers' CLIPTokenizer / T5TokenizerFast loaded from
  the same folder, called as diffusers' SD3 pipeline calls them (padding="max_length", max_length = the role's
  max_length: model_max_length, 77 for SD3's CLIP, and the bundle's max_sequence_length for T5, truncation=True; the
  extra untruncated call diffusers makes for its truncation warning is not counted). Ratio = transformers / native;
  goal: native < 100 ms per tokenizer for a 64 KiB prompt;
- linearity: native time of the 64 KiB prompt / the 16 KiB prompt of the same shape (4x the text; goal <= 5x), the
  two sizes' runs interleaved;
- ids: the native ids equal transformers' for every prompt timed (checked, and the run fails otherwise).

Each native figure is the best of --repeats runs, each transformers figure of --ref-repeats, after a warm-up call.

    python benchmarks/bench_tokenizers.py [--tokenizers FOLDER] [--bundle NAME.engine] [--repeats 11]
                                          [--ref-repeats 7] [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import string
import sys
import tempfile
import time
from pathlib import Path

from common import cli

import slimengine as se

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "models" / "toy-pipeline"
FOLDERS = {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5": "tokenizer_3"}
SHAPES = ("red", "word", "cjk", "marks", "ascii")
BIG, SMALL = 64 * 1024, 16 * 1024
GOAL_MS, GOAL_LINEAR = 100.0, 5.0


def prompt(shape: str, nbytes: int, seed: int = 0) -> str:
    """A prompt of `shape` of at most `nbytes` UTF-8 bytes (whole characters)."""
    rng = random.Random(f"{shape}-{nbytes}-{seed}")
    if shape == "red":
        text = "red " * (nbytes // 4)
    elif shape == "word":
        text = "x" * nbytes
    elif shape == "cjk":
        text = "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(nbytes // 3))
    elif shape == "marks":
        text = "a" + "\u0301" * ((nbytes - 1) // 2)
    elif shape == "ascii":
        visible = string.ascii_letters + string.digits + string.punctuation
        text = "".join(" " if rng.random() < 1 / 6 else rng.choice(visible) for _ in range(nbytes))
    else:
        raise ValueError(shape)
    assert len(text.encode()) <= nbytes, (shape, nbytes)
    return text


def make_bundle(tokenizers: Path, workdir: Path) -> Path:
    checkpoint, bundle = workdir / "tiny.safetensors", workdir / "tok.engine"
    cli("slimengine.tools.make_sd3_checkpoint", "--preset", "tiny", "--plain", "--seed", "2", "-o", str(checkpoint))
    cli("slimengine.export.cli", str(checkpoint), "--tokenizers", str(tokenizers), "-o", str(bundle), "-q", "--force")
    return bundle


def reference(tokenizers: Path, roles: dict[str, int]):
    """transformers' tokenizers of the folder, called as diffusers' SD3 pipeline calls them: role -> (prompt -> ids)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    calls = {}
    for role, max_length in roles.items():
        cls = T5TokenizerFast if role == "t5" else CLIPTokenizer
        tok = cls.from_pretrained(tokenizers / FOLDERS[role])

        def call(text, tok=tok, n=max_length):
            return tok(text, padding="max_length", max_length=n, truncation=True, add_special_tokens=True)["input_ids"]

        calls[role] = call
    return calls


def best_ms(fn, text: str, repeats: int) -> float:
    fn(text)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(text)
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def interleaved_ms(fn, small: str, big: str, repeats: int) -> tuple[float, float]:
    """Best times (ms) of `repeats` runs of fn(small) and fn(big), alternating, after a warm-up call of each."""
    fn(small), fn(big)
    times = {0: [], 1: []}
    for _ in range(repeats):
        for i, text in enumerate((small, big)):
            start = time.perf_counter()
            fn(text)
            times[i].append((time.perf_counter() - start) * 1e3)
    return min(times[0]), min(times[1])


def run(bundle: Path, tokenizers: Path, repeats: int, ref_repeats: int) -> bool:
    with se.Engine(bundle) as engine:
        roles = {t["role"]: t["max_length"] for t in engine.manifest["tokenizers"]}
        if not roles:
            raise SystemExit(f"{bundle}: no tokenizer stages (export it with --tokenizers)")
        ref = reference(tokenizers, roles)
        print(f"bundle {bundle.name}: tokenizers from {tokenizers}; max_length "
              + ", ".join(f"{r} {n}" for r, n in roles.items()))
        prompts = {(shape, n): prompt(shape, n) for shape in SHAPES for n in (SMALL, BIG)}
        print("prompts (UTF-8 bytes / characters): "
              + ", ".join(f"{s} {len(prompts[s, BIG].encode())}/{len(prompts[s, BIG])}" for s in SHAPES)
              + f" (64 KiB); 16 KiB: the same shapes at {SMALL} bytes")

        mismatches, rows = [], []
        for shape in SHAPES:
            for role in roles:

                def native(text, role=role):
                    return engine.tokenize(role, text)

                small_ms, big_ms = interleaved_ms(native, prompts[shape, SMALL], prompts[shape, BIG], repeats)
                ref_ms = best_ms(ref[role], prompts[shape, BIG], ref_repeats)
                equal = True
                for n in (SMALL, BIG):
                    got, want = native(prompts[shape, n]).tolist(), ref[role](prompts[shape, n])
                    if got != want:
                        equal = False
                        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                        mismatches.append(f"{shape} {n} B {role}: first difference at {first}: native {got[first:first + 8]} "
                                          f"transformers {want[first:first + 8]} (lengths {len(got)}, {len(want)})")
                rows.append((shape, role, big_ms, ref_ms, small_ms, equal))

    print(f"\n64 KiB prompts: native (best of {repeats}) vs transformers (best of {ref_repeats}); "
          f"ratio = transformers / native; goal native < {GOAL_MS:.0f} ms")
    print(f"  {'shape':6s} {'role':7s} {'native ms':>10s} {'transf. ms':>10s} {'ratio':>7s}  {'< 100 ms':8s} ids equal")
    for shape, role, big_ms, ref_ms, _, equal in rows:
        print(f"  {shape:6s} {role:7s} {big_ms:10.2f} {ref_ms:10.2f} {ref_ms / big_ms:6.2f}x  "
              f"{'yes' if big_ms < GOAL_MS else 'NO':8s} {'yes' if equal else 'NO'}")
    print(f"\nlinearity: native 64 KiB / 16 KiB (4x the prompt; best of {repeats} each, interleaved); goal <= {GOAL_LINEAR:.0f}x")
    print(f"  {'shape':6s} {'role':7s} {'16 KiB ms':>10s} {'64 KiB ms':>10s} {'ratio':>7s}  <= 5x")
    for shape, role, big_ms, _, small_ms, _ in rows:
        ratio = big_ms / small_ms
        print(f"  {shape:6s} {role:7s} {small_ms:10.2f} {big_ms:10.2f} {ratio:6.2f}x  {'yes' if ratio <= GOAL_LINEAR else 'NO'}")

    worst = max(rows, key=lambda r: r[2])
    linear = max(rows, key=lambda r: r[2] / r[4])
    ok = worst[2] < GOAL_MS and linear[2] / linear[4] <= GOAL_LINEAR
    print(f"\nslowest 64 KiB: {worst[1]} {worst[0]} {worst[2]:.2f} ms; least linear: {linear[1]} {linear[0]} "
          f"{linear[2] / linear[4]:.2f}x -> {'meets' if ok else 'MISSES'} the goals; ids equal transformers' on "
          f"{2 * len(rows) - len(mismatches)}/{2 * len(rows)} prompts")
    for m in mismatches:
        print(f"  MISMATCH {m}")
    assert not mismatches, f"{len(mismatches)} prompts' native ids differ from transformers'"
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizers", type=Path,
                        help="pipeline folder with tokenizer/, tokenizer_2/, tokenizer_3/ (default: SD3's own, made from tests/data; "
                             f"the toy's: {PIPELINE.relative_to(ROOT)}); with --bundle, the folder its tokenizers were exported from")
    parser.add_argument("--bundle", type=Path, help="time this bundle's tokenizers instead of exporting one")
    parser.add_argument("--repeats", type=int, default=11, help="native runs per prompt (best of)")
    parser.add_argument("--ref-repeats", type=int, default=7, help="transformers runs per prompt (best of)")
    parser.add_argument("--quick", action="store_true", help="fewer runs (--repeats 5 --ref-repeats 2)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.ref_repeats = 5, 2
    import transformers

    print(f"machine: {os.cpu_count()} CPUs, slimengine {se.version()}, transformers {transformers.__version__}, "
          f"Python {sys.version.split()[0]}")
    if args.bundle:
        if args.tokenizers is None:
            parser.error("--bundle needs --tokenizers: the folder its tokenizers were exported from (the reference)")
        run(args.bundle, args.tokenizers, args.repeats, args.ref_repeats)
        return
    with tempfile.TemporaryDirectory(prefix="bench_tokenizers-") as tmp:
        if args.tokenizers is None:  # SD3's CLIP-L, CLIP-G and T5 v1.1 tokenizers
            sys.path.insert(0, str(ROOT))
            from tests.tokenizer_files import make_sd3_tokenizers

            args.tokenizers = make_sd3_tokenizers(Path(tmp) / "sd3-tokenizers")
        start = time.perf_counter()
        bundle = make_bundle(args.tokenizers, Path(tmp))
        print(f"exported a tiny plain bundle with --tokenizers in {time.perf_counter() - start:.1f} s")
        run(bundle, args.tokenizers, args.repeats, args.ref_repeats)


if __name__ == "__main__":
    main()
