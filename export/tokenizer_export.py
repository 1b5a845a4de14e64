"""Tokenizer stages: SD3's three tokenizers as ONNX graphs run by onnxruntime-extensions' ops (docs/tokenizers.md).

Each graph takes one UTF-8 prompt (a string tensor of shape [1]) and returns `input_ids`, int64 [max_length]: the ids
transformers' tokenizer gives with diffusers' SD3 call (padding="max_length", truncation=True), i.e. the tokenizer's
own special tokens, the content truncated so that the end-of-sequence id stays last, then padding with its pad id.

- CLIP-L / CLIP-G (diffusers' tokenizer/, tokenizer_2/): onnxruntime-extensions' HfJsonTokenizer on the tokenizer's
  own tokenizer.json (its BPE, vocab and merges as transformers' CLIPTokenizer loads them).
- T5 (tokenizer_3/): onnxruntime-extensions' SentencepieceTokenizer on spiece.model, with the end-of-sequence id.

Truncation and padding are ONNX ops after the tokenizer op, so the runtime only feeds a string and reads ids.
Every graph is checked against the transformers tokenizer it was made from before it is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import TokenizerError

EXTENSIONS_DOMAIN = "ai.onnx.contrib"
# Role -> (diffusers' folder, default max_length): 77 for CLIP (diffusers' tokenizer_max_length), 256 for T5
# (StableDiffusion3Pipeline's max_sequence_length default).
ROLES = {"clip_l": ("tokenizer", 77), "clip_g": ("tokenizer_2", 77), "t5": ("tokenizer_3", 256)}
WHITESPACE_RUN = r"[\t\n\x{0B}\f\r\x{85}\p{Z}]+"
MAX_T5_LENGTH = 512  # T5's position buckets do not limit it, but diffusers refuses more than 512
# Prompts the export checks the graphs on (the tests check a larger corpus).
SELF_CHECK = ["", "a photo of a cat", "A Red CIRCLE, on blue!!", "café 東京 🍜", "  spaced\tout\n text ", "x" * 400, "word " * 300]


def _load_clip(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def _load_t5(folder: Path):
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(folder))


def _truncate_and_pad(nodes: list, inits: list, raw: str, max_length: int, eos_id: int, pad_id: int) -> None:
    """raw (int64 [n], ending with eos) -> input_ids (int64 [max_length]): the first min(n, max_length) - 1 ids, eos, pads."""

    def const(name, values):
        inits.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
        return name

    const("c_zero", [0])
    const("c_one", [1])
    const("c_room", [max_length - 1])  # ids before eos
    const("c_eos", [eos_id])
    const("c_len", [max_length])
    nodes += [
        helper.make_node("Shape", [raw], ["n"]),
        helper.make_node("Sub", ["n", "c_one"], ["n_content"]),
        helper.make_node("Min", ["n_content", "c_room"], ["keep_hi"]),
        helper.make_node("Max", ["keep_hi", "c_zero"], ["keep"]),
        helper.make_node("Slice", [raw, "c_zero", "keep", "c_zero"], ["content"]),
        helper.make_node("Concat", ["content", "c_eos"], ["ended"], axis=0),
        helper.make_node("Add", ["keep", "c_one"], ["used"]),
        helper.make_node("Sub", ["c_len", "used"], ["pad_len"]),
        helper.make_node("Concat", ["c_zero", "pad_len"], ["pads"], axis=0),
        helper.make_node("Pad", ["ended", "pads", "c_pad"], ["input_ids"], mode="constant"),
    ]
    inits.append(helper.make_tensor("c_pad", TensorProto.INT64, [], [pad_id]))


def _model(nodes, inits, name: str, max_length: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("prompt", TensorProto.STRING, [1])],
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [max_length])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(EXTENSIONS_DOMAIN, 1)],
                              producer_name="slimengine")
    onnx.checker.check_model(model)
    return model


def _clip_length(tok) -> int:
    """diffusers' SD3 tokenizer_max_length: the tokenizer's model_max_length (77 when it states none)."""
    return tok.model_max_length if tok.model_max_length <= 4096 else ROLES["clip_l"][1]


def clip_max_length(folder: Path) -> int:
    """The token count a CLIP tokenizer folder pads and truncates prompts to in diffusers' SD3 pipeline."""
    try:
        return _clip_length(_load_clip(folder))
    except Exception as e:  # a folder transformers cannot load: one line
        raise TokenizerError(f"{folder}: cannot load it as a CLIPTokenizer ({type(e).__name__}: {str(e).strip()[:200]})") from None


def check_t5_tokenizer(folder: Path) -> None:
    """Refuse, in one line naming the file, a T5 tokenizer folder the T5 tokenizer stage cannot be made from: its
    spiece.model missing or not a SentencePiece model (the stage's op runs it), or a folder transformers cannot load
    (what the stage is checked against). Checked before the export's work, which would fail on it at the end."""
    spiece = folder / "spiece.model"
    if not spiece.is_file():
        raise TokenizerError(f"{folder}: no spiece.model (the T5 tokenizer stage is built from the SentencePiece model)")
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_proto=spiece.read_bytes())
    except Exception as e:  # a corrupt or truncated model: protobuf's or sentencepiece's error, one line
        raise TokenizerError(f"{spiece}: not a SentencePiece model ({type(e).__name__}: {str(e).strip()[:200]})") from None
    try:
        _load_t5(folder)
    except Exception as e:
        raise TokenizerError(f"{folder}: cannot load it as a T5TokenizerFast ({type(e).__name__}: {str(e).strip()[:200]})") from None


def clip_tokenizer_model(folder: Path, max_length: int | None = None):
    """(graph, transformers tokenizer) for a CLIP tokenizer folder (vocab.json + merges.txt, or tokenizer.json)."""
    tok = _load_clip(folder)
    if max_length is None:
        max_length = _clip_length(tok)
    # The tokenizer.json transformers itself runs (normalizer, pre-tokenizer, BPE), and the special tokens.
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
              **{k: str(getattr(tok, k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}}
    nodes = [
        # transformers' CLIP normalizer turns every whitespace run into one space; the op alone misses tabs
        # between words. RE2's \s is ASCII only: this class is Unicode's White_Space, as the tokenizers crate's \s.
        helper.make_node("StringRegexReplace", ["prompt", "c_ws_pattern", "c_ws_space"], ["spaced"], domain=EXTENSIONS_DOMAIN),
        helper.make_node("HfJsonTokenizer", ["spaced"], ["raw_2d"], domain=EXTENSIONS_DOMAIN,
                         tokenizer_config=json.dumps(config), tokenizer_vocab=tok.backend_tokenizer.to_str()),
        helper.make_node("Reshape", ["raw_2d", "c_flat"], ["raw"]),
    ]
    inits = [helper.make_tensor("c_flat", TensorProto.INT64, [1], [-1]),
             helper.make_tensor("c_ws_pattern", TensorProto.STRING, [1], [WHITESPACE_RUN.encode()]),
             helper.make_tensor("c_ws_space", TensorProto.STRING, [1], [b" "])]
    _truncate_and_pad(nodes, inits, "raw", max_length, tok.eos_token_id, tok.pad_token_id)
    return _model(nodes, inits, "clip_tokenizer", max_length), tok, max_length


def t5_tokenizer_model(folder: Path, max_length: int = 256):
    """(graph, transformers tokenizer) for a T5 tokenizer folder with spiece.model."""
    spiece = folder / "spiece.model"
    if not spiece.is_file():
        raise TokenizerError(f"{folder}: no spiece.model (the T5 tokenizer stage is built from the SentencePiece model)")
    if not 1 < max_length <= MAX_T5_LENGTH:
        raise TokenizerError(f"T5 max_length must be in 2..{MAX_T5_LENGTH}, got {max_length}")
    tok = _load_t5(folder)
    scalars = [("sp_nbest", TensorProto.INT64, 0), ("sp_alpha", TensorProto.FLOAT, 0.0), ("sp_bos", TensorProto.BOOL, False),
               ("sp_eos", TensorProto.BOOL, True), ("sp_reverse", TensorProto.BOOL, False)]
    inits = [helper.make_tensor(n, t, [1], [v]) for n, t, v in scalars]
    nodes = [
        helper.make_node("SentencepieceTokenizer", ["prompt"] + [s[0] for s in scalars], ["raw_i32", "sp_indices"],
                         domain=EXTENSIONS_DOMAIN, model=spiece.read_bytes()),
        helper.make_node("Cast", ["raw_i32"], ["raw"], to=TensorProto.INT64),
    ]
    _truncate_and_pad(nodes, inits, "raw", max_length, tok.eos_token_id, tok.pad_token_id)
    return _model(nodes, inits, "t5_tokenizer", max_length), tok, max_length


def extensions_session(model: onnx.ModelProto):
    """An ONNX Runtime session of a tokenizer graph in this Python process (onnxruntime-extensions' library registered)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.register_custom_ops_library(extensions_library())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def extensions_library() -> str:
    try:
        import onnxruntime_extensions
    except ImportError as e:
        raise TokenizerError("tokenizer stages need onnxruntime-extensions: pip install 'slimengine[tokenizers]'") from e
    return onnxruntime_extensions.get_library_path()


def reference_ids(tok, prompt: str, max_length: int) -> list[int]:
    """The ids diffusers' SD3 pipeline gets for `prompt` (its tokenizer call, with the same max_length)."""
    return tok(prompt, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True)["input_ids"]


def build_tokenizer(role: str, folder: Path, max_length: int | None = None) -> tuple[onnx.ModelProto, int]:
    """The checked tokenizer graph of `role` (clip_l, clip_g, t5) from a diffusers tokenizer folder, and its max_length."""
    if role not in ROLES:
        raise TokenizerError(f"'{role}' is not a tokenizer role ({', '.join(ROLES)})")
    if role == "t5":
        model, tok, max_length = t5_tokenizer_model(folder, max_length or ROLES[role][1])
    else:
        model, tok, max_length = clip_tokenizer_model(folder, max_length)
    session = extensions_session(model)
    for prompt in SELF_CHECK:
        got = session.run(None, {"prompt": np.array([prompt], dtype=object)})[0].tolist()
        want = reference_ids(tok, prompt, max_length)
        if got != want:
            raise TokenizerError(f"tokenizer {role} ({folder}): onnxruntime-extensions gives {got[:16]}... but transformers {want[:16]}... "
                              f"for {prompt[:40]!r}; this tokenizer cannot be exported as a stage")
    return model, max_length


def export_tokenizers(pipeline: Path, bundle: Path, t5_max_length: int = 256, roles: tuple[str, ...] = ("clip_l", "clip_g", "t5")) -> list[dict]:
    """Writes bundle/tokenizers/ROLE.onnx for each role whose folder `pipeline` has; returns the manifest's `tokenizers` list."""
    entries = []
    (bundle / "tokenizers").mkdir(exist_ok=True)
    for role in roles:
        folder = pipeline / ROLES[role][0]
        if not folder.is_dir():
            continue
        model, max_length = build_tokenizer(role, folder, t5_max_length if role == "t5" else None)
        path = Path("tokenizers") / f"{role}.onnx"
        onnx.save(model, bundle / path)
        entries.append({"role": role, "file": str(path), "max_length": max_length})
    if not entries:
        raise TokenizerError(f"{pipeline}: none of {', '.join(ROLES[r][0] for r in roles)}/ is there (a diffusers pipeline folder)")
    return entries
