"""Tokenizer data for the runtime's native tokenizers (docs/tokenizers.md): SD3's three tokenizers, read from a diffusers
pipeline folder, checked, and written as one JSON file per role that libslimengine reads.

- CLIP-L / CLIP-G (`tokenizer/`, `tokenizer_2/`): the byte-level BPE vocabulary, merges, added tokens and special ids
  of transformers' CLIPTokenizer (format `slimengine-clip-bpe`, runtime/src/clip_tokenizer.cpp).
- T5 (`tokenizer_3/`): T5TokenizerFast's Unigram pieces and scores (from spiece.model, or tokenizer.json alone), its
  precompiled normalizer charsmap, added tokens and eos/pad ids (format `slimengine-unigram`, runtime/src/t5_tokenizer.cpp).

The runtime gives the ids of diffusers' SD3 call `tokenizer(prompt, padding="max_length", max_length=N,
truncation=True)`. The source files are validated before transformers reads them (sizes bounded, vocabulary ids
unique and dense, merges naming known tokens): a hostile vocabulary is refused in one line, never loaded.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from .bundle import refuse_special_files
from .errors import TokenizerError

# Role -> (diffusers' folder, default max_length): 77 for CLIP (diffusers' tokenizer_max_length), 256 for T5
# (StableDiffusion3Pipeline's max_sequence_length default).
ROLES = {"clip_l": ("tokenizer", 77), "clip_g": ("tokenizer_2", 77), "t5": ("tokenizer_3", 256)}
MAX_T5_LENGTH = 512  # T5's position buckets do not limit it, but diffusers refuses more than 512
# The runtime's limits (runtime/src/clip_tokenizer.hpp), checked here first so an export never writes what it refuses.
MAX_VOCAB_SIZE = 1 << 20
MAX_TOKEN_BYTES = 1024
MAX_CLIP_ADDED_TOKENS = 64
MAX_T5_ADDED_TOKENS = 1024
MAX_ADDED_TOKEN_BYTES = 32
MAX_REPLACEMENT_BYTES = 64  # a T5 normalizer's replacement string
MAX_FILE_BYTES = 64 << 20  # a tokenizer file larger than this is refused unread (CLIP's are 2 MB, T5's 2.4 MB)
CLIP_FORMAT = "slimengine-clip-bpe"
T5_FORMAT = "slimengine-unigram"
# CLIPTokenizer's pipeline (transformers' tokenization_clip.py), which the native tokenizer implements.
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _read_json(path: Path):
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise TokenizerError(f"{path}: {size} bytes; a tokenizer file of at most {MAX_FILE_BYTES >> 20} MiB is accepted")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # RecursionError: arrays nested thousands deep
        raise TokenizerError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: must be a JSON object, not {type(data).__name__}")
    return data


def check_vocab(vocab, where: str) -> None:
    """A {token: id} vocabulary the runtime accepts: 1 to 2^20 tokens, ids unique and dense (0 to size - 1)."""
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(f"{where}: the vocabulary must be a non-empty {{token: id}} object")
    if len(vocab) > MAX_VOCAB_SIZE:
        raise TokenizerError(f"{where}: {len(vocab)} tokens; at most {MAX_VOCAB_SIZE} are accepted")
    seen = set()
    for token, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(vocab):
            raise TokenizerError(f"{where}: token {token[:40]!r} has id {i!r}; ids must be integers from 0 to {len(vocab) - 1} (one per token)")
        if i in seen:
            raise TokenizerError(f"{where}: id {i} is given to two tokens (the second is {token[:40]!r}); ids must be unique")
        if not token or len(token.encode()) > MAX_TOKEN_BYTES:
            raise TokenizerError(f"{where}: a token of {len(token.encode())} bytes; 1 to {MAX_TOKEN_BYTES} are accepted")
        seen.add(i)


def check_merges(merges: list, vocab: dict, where: str) -> None:
    """Every merge names two vocabulary tokens whose concatenation is one too, at most one merge per token."""
    if len(merges) > len(vocab):
        raise TokenizerError(f"{where}: {len(merges)} merges for {len(vocab)} tokens; a vocabulary has at most one merge per token")
    seen = set()
    for k, pair in enumerate(merges):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise TokenizerError(f"{where}: merge {k} ({json.dumps(pair)[:80]}) is not a pair of token strings")
        if any(p not in vocab for p in pair) or pair[0] + pair[1] not in vocab:
            raise TokenizerError(f"{where}: merge {k} ({' '.join(map(str, pair))[:80]!r}) names a token the vocabulary lacks")
        if tuple(pair) in seen:
            raise TokenizerError(f"{where}: merge {k} ({' '.join(pair)[:80]!r}) repeats an earlier merge")
        seen.add(tuple(pair))


def check_clip_files(folder: Path) -> None:
    """The raw vocabulary and merges of a CLIP tokenizer folder (vocab.json + merges.txt, or tokenizer.json), checked
    before transformers or the runtime reads them."""
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = _read_json(folder / "vocab.json")
        check_vocab(vocab, str(folder / "vocab.json"))
        path = folder / "merges.txt"
        if path.stat().st_size > MAX_FILE_BYTES:
            raise TokenizerError(f"{path}: {path.stat().st_size} bytes; at most {MAX_FILE_BYTES >> 20} MiB are accepted")
        try:
            lines = path.read_text(encoding="utf-8", errors="strict").splitlines()
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{path}: not UTF-8 ({e})") from None
        merges = [line.split(" ") for line in lines if line and not line.startswith("#version")]
        check_merges(merges, vocab, str(path))
    elif (folder / "tokenizer.json").is_file():
        model = _read_json(folder / "tokenizer.json").get("model")
        if not isinstance(model, dict):
            raise TokenizerError(f"{folder / 'tokenizer.json'}: has no model object")
        check_vocab(model.get("vocab"), f"{folder / 'tokenizer.json'} model.vocab")
        if not isinstance(model.get("merges") or [], list):
            raise TokenizerError(f"{folder / 'tokenizer.json'}: model.merges must be a list")
        merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges") or []]
        check_merges(merges, model["vocab"], f"{folder / 'tokenizer.json'} model.merges")
    else:
        raise TokenizerError(f"{folder}: no vocab.json + merges.txt and no tokenizer.json (a CLIP tokenizer folder)")


def _load_clip(folder: Path):
    check_clip_files(folder)
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except Exception as e:  # a folder transformers cannot load: one line
        raise TokenizerError(f"{folder}: cannot load it as a CLIPTokenizer ({type(e).__name__}: {str(e).strip()[:200]})") from None


def _clip_length(tok, folder: Path) -> int:
    """diffusers' SD3 tokenizer_max_length: the tokenizer's model_max_length (77 when it states none: transformers
    then says 10^30), an integer from 2 to 4096 as the runtime accepts."""
    n = tok.model_max_length
    if isinstance(n, (int, float)) and not isinstance(n, bool) and n > 4096:
        return ROLES["clip_l"][1]
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise TokenizerError(f"{folder}/tokenizer_config.json: model_max_length {n!r}: must be an integer from 2 to 4096")
    return n


def clip_max_length(folder: Path) -> int:
    """The token count a CLIP tokenizer folder pads and truncates prompts to in diffusers' SD3 pipeline."""
    return _clip_length(_load_clip(folder), folder)


def _check_added(folder: Path, added: list, most: int) -> None:
    """Added tokens the runtime accepts: at most `most`, each 1 to 32 bytes, none twice."""
    if len(added) > most:
        raise TokenizerError(f"{folder}: {len(added)} added tokens; at most {most} are accepted")
    contents = [a["content"] for a in added]
    for content in contents:
        if not 0 < len(content.encode()) <= MAX_ADDED_TOKEN_BYTES:
            raise TokenizerError(f"{folder}: added token {content[:40]!r} is {len(content.encode())} bytes; 1 to {MAX_ADDED_TOKEN_BYTES} "
                                 "are accepted")
    if len(set(contents)) != len(contents):
        raise TokenizerError(f"{folder}: an added token appears twice")


def _refuse_unlike(folder: Path, what: str, got, want) -> None:
    if got != want:
        raise TokenizerError(f"{folder}: its {what} is {json.dumps(got)[:160]}, not CLIPTokenizer's {json.dumps(want)[:160]}; "
                             "the runtime's tokenizer implements CLIPTokenizer's pipeline only")


def clip_tokenizer_data(folder: Path) -> tuple[dict, int]:
    """The runtime's CLIP tokenizer file (a JSON object) for a CLIP tokenizer folder, and its max_length. Refuses a
    tokenizer whose pipeline is not CLIPTokenizer's, which the native tokenizer implements step by step."""
    tok = _load_clip(folder)
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec["model"]
    _refuse_unlike(folder, "normalizer", spec.get("normalizer"), {"type": "Sequence", "normalizers": [
        {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "}, {"type": "Lowercase"}]})
    _refuse_unlike(folder, "pre-tokenizer", spec.get("pre_tokenizer"), {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": CLIP_SPLIT_PATTERN}, "behavior": "Removed", "invert": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]})
    _refuse_unlike(folder, "BPE model", {k: model.get(k) for k in ("type", "dropout", "continuing_subword_prefix", "end_of_word_suffix",
                                                                   "fuse_unk", "byte_fallback", "ignore_merges")},
                   {"type": "BPE", "dropout": None, "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": False,
                    "byte_fallback": False, "ignore_merges": False})
    vocab = model["vocab"]
    check_vocab(vocab, f"{folder} (as transformers loaded it)")
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    check_merges(merges, vocab, f"{folder} (as transformers loaded it)")
    added = spec.get("added_tokens") or []
    _check_added(folder, added, MAX_CLIP_ADDED_TOKENS)
    for a in added:
        if a["single_word"] or a["lstrip"] or a["rstrip"]:
            raise TokenizerError(f"{folder}: added token {a['content']!r} has single_word, lstrip or rstrip set, which the runtime's "
                                 "tokenizer does not implement")
        if vocab.get(a["content"]) != a["id"]:
            raise TokenizerError(f"{folder}: added token {a['content']!r} has id {a['id']}, not its vocabulary id {vocab.get(a['content'])}")
    ids = {name: getattr(tok, f"{name}_token_id") for name in ("bos", "eos", "pad", "unk")}
    if any(i is None for i in ids.values()):
        raise TokenizerError(f"{folder}: the tokenizer lacks a {', '.join(k for k, i in ids.items() if i is None)} token")
    data = {"format": CLIP_FORMAT, "vocab": vocab, "merges": merges,
            "added_tokens": [{"content": a["content"], "id": a["id"], "normalized": a["normalized"]} for a in added],
            **{f"{k}_id": i for k, i in ids.items()}}
    return data, _clip_length(tok, folder)


def check_t5_files(folder: Path) -> None:
    """The raw model of a T5 tokenizer folder (spiece.model, or tokenizer.json's Unigram model), checked before
    transformers reads it: a bounded size, and a SentencePiece model that loads or a piece list of bounded length."""
    spiece, spec = folder / "spiece.model", folder / "tokenizer.json"
    if spiece.is_file():
        if spiece.stat().st_size > MAX_FILE_BYTES:
            raise TokenizerError(f"{spiece}: {spiece.stat().st_size} bytes; at most {MAX_FILE_BYTES >> 20} MiB are accepted")
        import sentencepiece

        try:
            processor = sentencepiece.SentencePieceProcessor(model_proto=spiece.read_bytes())
        except Exception as e:  # a corrupt or truncated model: protobuf's or sentencepiece's error, one line
            raise TokenizerError(f"{spiece}: not a SentencePiece model ({type(e).__name__}: {str(e).strip()[:200]})") from None
        pieces = processor.get_piece_size()
    elif spec.is_file():
        model = _read_json(spec).get("model") or {}
        if model.get("type") != "Unigram":
            raise TokenizerError(f"{spec}: model type {model.get('type')!r}; a T5 tokenizer is a SentencePiece Unigram model")
        pieces = len(model.get("vocab") or [])
    else:
        raise TokenizerError(f"{folder}: no spiece.model and no tokenizer.json (a T5 tokenizer folder)")
    if not 0 < pieces <= MAX_VOCAB_SIZE:
        raise TokenizerError(f"{folder}: {pieces} pieces; 1 to {MAX_VOCAB_SIZE} are accepted")


def _load_t5(folder: Path):
    check_t5_files(folder)
    from transformers import T5TokenizerFast

    try:
        return T5TokenizerFast.from_pretrained(str(folder))
    except Exception as e:
        raise TokenizerError(f"{folder}: cannot load it as a T5TokenizerFast ({type(e).__name__}: {str(e).strip()[:200]})") from None


def _refuse_unlike_t5(folder: Path, what: str, got, want) -> None:
    if got != want:
        raise TokenizerError(f"{folder}: its {what} is {json.dumps(got)[:160]}, not T5TokenizerFast's {json.dumps(want)[:160]}; "
                             "the runtime's tokenizer implements T5's pipeline only")


def t5_tokenizer_data(folder: Path) -> dict:
    """The runtime's T5 tokenizer file for a T5 tokenizer folder (spiece.model, or tokenizer.json alone): the Unigram
    pieces and scores T5TokenizerFast runs, its precompiled normalizer charsmap, added tokens and eos/pad ids."""
    tok = _load_t5(folder)
    spec = json.loads(tok.backend_tokenizer.to_str())
    normalizer, model = spec.get("normalizer") or {}, spec["model"]
    _refuse_unlike_t5(folder, "normalizer type", normalizer.get("type"), "Precompiled")
    _refuse_unlike_t5(folder, "pre-tokenizer", spec.get("pre_tokenizer"), {"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"}, {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}]})
    _refuse_unlike_t5(folder, "model", {k: model.get(k) for k in ("type", "byte_fallback")}, {"type": "Unigram", "byte_fallback": False})
    pieces, unk = model["vocab"], model.get("unk_id")
    if not 0 < len(pieces) <= MAX_VOCAB_SIZE:
        raise TokenizerError(f"{folder}: {len(pieces)} pieces; 1 to {MAX_VOCAB_SIZE} are accepted")
    if len({p for p, _ in pieces}) != len(pieces):
        raise TokenizerError(f"{folder}: a piece appears twice in the vocabulary")
    if not isinstance(unk, int) or not 0 <= unk < len(pieces):
        raise TokenizerError(f"{folder}: its unk_id {unk!r} is not a piece id")
    added = spec.get("added_tokens") or []
    _check_added(folder, added, MAX_T5_ADDED_TOKENS)
    for a in added:
        if a["single_word"] or a["lstrip"] or a["rstrip"] or a["normalized"]:
            raise TokenizerError(f"{folder}: added token {a['content']!r} has single_word, lstrip, rstrip or normalized set, which the "
                                 "runtime's tokenizer does not implement")
        if not 0 <= a["id"] < len(pieces) + MAX_T5_ADDED_TOKENS:
            raise TokenizerError(f"{folder}: added token {a['content'][:40]!r} has id {a['id']}, beyond the model's {len(pieces)} pieces "
                                 f"and {MAX_T5_ADDED_TOKENS} added ids")
    for name, i in (("eos", tok.eos_token_id), ("pad", tok.pad_token_id)):
        if i is None or not 0 <= i < len(pieces) + MAX_T5_ADDED_TOKENS:
            raise TokenizerError(f"{folder}: its {name} id {i} is not a token id")
    charsmap = base64.b64decode(normalizer["precompiled_charsmap"])
    strings = charsmap[4 + int.from_bytes(charsmap[:4], "little"):]
    longest = max((len(r) for r in strings.split(b"\0")), default=0)
    if longest > MAX_REPLACEMENT_BYTES:
        raise TokenizerError(f"{folder}: its normalizer maps a character to {longest} bytes; at most {MAX_REPLACEMENT_BYTES} are accepted "
                             "(T5's longest is 33)")
    return {"format": T5_FORMAT, "pieces": pieces, "unk_id": unk, "charsmap": normalizer["precompiled_charsmap"],
            "added_tokens": [{"content": a["content"], "id": a["id"]} for a in added], "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id}


def check_t5_tokenizer(folder: Path) -> None:
    """Refuse, in one line naming the file, a T5 tokenizer folder the runtime's tokenizer cannot be made from. Checked
    before the export's work, which would fail on it at the end."""
    t5_tokenizer_data(folder)


def check_tokenizer_folders(pipeline: Path) -> None:
    """Refuse, before the export's work, a tokenizer folder of `pipeline` whose files the runtime could not read."""
    for role, (folder, _) in ROLES.items():
        if (pipeline / folder).exists() and not (pipeline / folder).is_dir():
            raise TokenizerError(f"{pipeline / folder}: not a folder (a diffusers tokenizer folder)")
        if (pipeline / folder).is_dir():
            refuse_special_files(pipeline / folder)
        if (pipeline / folder).is_dir() and role == "t5":
            check_t5_tokenizer(pipeline / folder)
        elif (pipeline / folder).is_dir():
            clip_tokenizer_data(pipeline / folder)


def export_tokenizers(pipeline: Path, bundle: Path, t5_max_length: int = 256, roles: tuple[str, ...] = ("clip_l", "clip_g", "t5")) -> list[dict]:
    """Writes bundle/tokenizers/ROLE.json for each role whose folder `pipeline` has; returns the manifest's `tokenizers` list."""
    if not 1 < t5_max_length <= MAX_T5_LENGTH:
        raise TokenizerError(f"T5 max_length must be in 2..{MAX_T5_LENGTH}, got {t5_max_length}")
    entries = []
    (bundle / "tokenizers").mkdir(exist_ok=True)
    for role in roles:
        folder = pipeline / ROLES[role][0]
        if not folder.is_dir():
            continue
        if role == "t5":
            data, kind, max_length = t5_tokenizer_data(folder), "unigram", t5_max_length
        else:
            (data, max_length), kind = clip_tokenizer_data(folder), "clip_bpe"
        path = Path("tokenizers") / f"{role}.json"
        (bundle / path).write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
        entries.append({"role": role, "kind": kind, "file": str(path), "max_length": max_length})
    if not entries:
        raise TokenizerError(f"{pipeline}: none of {', '.join(ROLES[r][0] for r in roles)}/ is there (a diffusers pipeline folder)")
    return entries
