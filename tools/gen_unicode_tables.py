"""Writes runtime/src/unicode_tables.inc: the Unicode data the native CLIP tokenizer needs (docs/tokenizers.md).

The tables are read off the reference itself, so they agree with it code point by code point:
- letter / number / space classes (`\\p{L}`, `\\p{N}`, `\\s`): what the `tokenizers` library's regex engine (Oniguruma)
  matches, one code point at a time, as transformers' CLIPTokenizer pre-tokenizer and normalizer use them;
- lowercase: what tokenizers' Lowercase normalizer gives for each code point (Rust's char::to_lowercase);
- NFC: canonical decompositions, combining classes and primary composites from Python's unicodedata, checked
  against tokenizers' NFC normalizer on every code point (the script fails if one differs);
- grapheme clusters (the T5 normalizer works per extended grapheme cluster, UAX #29): each code point's
  Grapheme_Cluster_Break, Extended_Pictographic and Indic_Conjunct_Break properties, from the `regex` module of the
  Unicode version of tokenizers' unicode-segmentation crate (16.0): regex 2024.11.6, pinned below (newer ones are
  Unicode 17, whose new combining marks the crate does not join).

Run after upgrading tokenizers (the native tokenizers' tests compare against transformers on a large corpus and catch
a stale table):
    pip install --target /tmp/regex16 regex==2024.11.6
    PYTHONPATH=/tmp/regex16 python tools/gen_unicode_tables.py
"""

from __future__ import annotations

import sys
import unicodedata
from pathlib import Path

import regex
import tokenizers
from tokenizers import Regex, normalizers, pre_tokenizers

GRAPHEME_REGEX = "2.5.148"  # regex.__version__ of regex 2024.11.6, the last release on Unicode 16.0 (the crate's version)
OUT = Path(__file__).resolve().parent.parent / "runtime" / "src" / "unicode_tables.inc"
CODE_POINTS = [cp for cp in range(0x110000) if not 0xD800 <= cp < 0xE000]


def ranges(members: list[int]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for cp in members:
        if out and out[-1][1] == cp - 1:
            out[-1][1] = cp
        else:
            out.append([cp, cp])
    return [tuple(r) for r in out]


def regex_class(pattern: str) -> list[tuple[int, int]]:
    split = pre_tokenizers.Split(Regex(pattern), behavior="removed")
    return ranges([cp for cp in CODE_POINTS if not split.pre_tokenize_str(chr(cp))])


def lowercase_map() -> list[tuple[int, list[int]]]:
    lower = normalizers.Lowercase()
    out = []
    for cp in CODE_POINTS:
        low = lower.normalize_str(chr(cp))
        if low != chr(cp):
            out.append((cp, [ord(c) for c in low]))
    return out


def nfc_tables():
    nfc = normalizers.NFC()
    for cp in CODE_POINTS:  # the tables below are Python's; they hold only where the reference agrees
        if nfc.normalize_str(chr(cp)) != unicodedata.normalize("NFC", chr(cp)):
            sys.exit(f"tokenizers' NFC differs from unicodedata's at U+{cp:04X}: the tables would not match it")
    ccc = [(cp, unicodedata.combining(chr(cp))) for cp in CODE_POINTS if unicodedata.combining(chr(cp))]
    ccc_ranges: list[list[int]] = []
    for cp, c in ccc:
        if ccc_ranges and ccc_ranges[-1][1] == cp - 1 and ccc_ranges[-1][2] == c:
            ccc_ranges[-1][1] = cp
        else:
            ccc_ranges.append([cp, cp, c])
    decompositions, compositions = [], []
    for cp in CODE_POINTS:
        if 0xAC00 <= cp <= 0xD7A3:  # Hangul syllables: algorithmic, in the C++
            continue
        full = unicodedata.normalize("NFD", chr(cp))
        if full != chr(cp):
            decompositions.append((cp, [ord(c) for c in full]))
        mapping = unicodedata.decomposition(chr(cp))
        if mapping and not mapping.startswith("<"):
            parts = [int(p, 16) for p in mapping.split()]
            if len(parts) == 2 and unicodedata.normalize("NFC", chr(parts[0]) + chr(parts[1])) == chr(cp):
                compositions.append((parts[0], parts[1], cp))
    compositions.sort()
    return ccc_ranges, decompositions, compositions


GRAPHEME_BREAKS = ["Other", "CR", "LF", "Control", "Extend", "ZWJ", "Regional_Indicator", "Prepend", "SpacingMark", "L", "V", "T",
                   "LV", "LVT"]  # the order of runtime/src/t5_tokenizer.cpp's GraphemeBreak
INCB = ["None", "Consonant", "Extend", "Linker"]


def members(pattern: str) -> set[int]:
    text = "".join(chr(cp) for cp in CODE_POINTS)
    return {ord(m.group()) for m in regex.finditer(pattern, text)}


def grapheme_ranges() -> list[tuple[int, int, int]]:
    """(first, last, packed) runs: packed = break index | Extended_Pictographic << 4 | InCB index << 5."""
    packed = dict.fromkeys(CODE_POINTS, 0)
    for index, name in enumerate(GRAPHEME_BREAKS[1:], 1):
        for cp in members(rf"\p{{Grapheme_Cluster_Break={name}}}"):
            packed[cp] |= index
    for cp in members(r"\p{Extended_Pictographic}"):
        packed[cp] |= 1 << 4
    for index, name in enumerate(INCB[1:], 1):
        for cp in members(rf"\p{{Indic_Conjunct_Break={name}}}"):
            packed[cp] |= index << 5
    runs: list[list[int]] = []
    for cp in CODE_POINTS:
        if packed[cp] == 0:
            continue
        if runs and runs[-1][1] == cp - 1 and runs[-1][2] == packed[cp]:
            runs[-1][1] = cp
        else:
            runs.append([cp, cp, packed[cp]])
    return [tuple(r) for r in runs]


def table(name: str, ctype: str, rows: list[str], per_line: int = 6) -> str:
    lines = [", ".join(rows[i:i + per_line]) for i in range(0, len(rows), per_line)]
    return f"constexpr {ctype} {name}[] = {{\n    " + ",\n    ".join(lines) + "\n};\n"


def main() -> None:
    if regex.__version__ != GRAPHEME_REGEX:
        sys.exit(f"regex {regex.__version__} is not regex 2024.11.6 ({GRAPHEME_REGEX}, Unicode 16.0); see the docstring for how to run this")
    letters, numbers, spaces = regex_class(r"\p{L}"), regex_class(r"\p{N}"), regex_class(r"\s")
    lower = lowercase_map()
    ccc, decompositions, compositions = nfc_tables()
    graphemes = grapheme_ranges()
    flat: list[int] = []
    decomposition_rows = []
    for cp, seq in decompositions:
        decomposition_rows.append(f"{{0x{cp:X}, {len(flat)}, {len(seq)}}}")
        flat += seq
    lower_flat: list[int] = []
    lower_rows = []
    for cp, seq in lower:
        lower_rows.append(f"{{0x{cp:X}, {len(lower_flat)}, {len(seq)}}}")
        lower_flat += seq
    parts = [
        f"// Generated by tools/gen_unicode_tables.py from tokenizers {tokenizers.__version__} and Python's unicodedata "
        f"{unicodedata.unidata_version}, grapheme properties from regex 2024.11.6 (Unicode 16.0); do not edit.\n",
        table("kLetterRanges", "CodeRange", [f"{{0x{a:X}, 0x{b:X}}}" for a, b in letters]),
        table("kNumberRanges", "CodeRange", [f"{{0x{a:X}, 0x{b:X}}}" for a, b in numbers]),
        table("kSpaceRanges", "CodeRange", [f"{{0x{a:X}, 0x{b:X}}}" for a, b in spaces]),
        table("kLowercaseCodes", "char32_t", [f"0x{c:X}" for c in lower_flat], 10),
        table("kLowercase", "Mapping", lower_rows, 5),
        table("kCombiningClassRanges", "ClassRange", [f"{{0x{a:X}, 0x{b:X}, {c}}}" for a, b, c in ccc], 4),
        table("kDecompositionCodes", "char32_t", [f"0x{c:X}" for c in flat], 10),
        table("kDecompositions", "Mapping", decomposition_rows, 5),
        table("kCompositions", "Composition", [f"{{0x{a:X}, 0x{b:X}, 0x{c:X}}}" for a, b, c in compositions], 4),
        table("kGraphemeRanges", "ClassRange", [f"{{0x{a:X}, 0x{b:X}, {c}}}" for a, b, c in graphemes], 4),
    ]
    OUT.write_text("".join(parts))
    print(f"{OUT}: {len(letters)} letter, {len(numbers)} number, {len(spaces)} space ranges; {len(lower)} lowercase, "
          f"{len(decompositions)} decompositions, {len(compositions)} compositions, {len(graphemes)} grapheme property ranges")


if __name__ == "__main__":
    main()
