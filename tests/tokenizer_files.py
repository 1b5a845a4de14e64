"""SD3-layout tokenizer folders for the tests: small ones made here (a CLIP-style byte-level BPE trained with
`tokenizers`, a T5-style SentencePiece unigram model trained with `sentencepiece`), and SD3's own (CLIP's 49408-token
BPE, T5 v1.1's 32000-piece model) from tests/data (README there)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"

CAPTIONS = [
    "a red circle on a blue background", "a green square", "a photo of a cat sitting on a mat",
    "an astronaut riding a horse on the moon", "a painting of a lighthouse at sunset, oil on canvas",
    "a close-up photo of a dog's face", "the quick brown fox jumps over the lazy dog", "A yellow triangle and a purple star",
    "city skyline at night with neon lights", "café au lait, crème brûlée", "東京の夜景", "a bowl of ramen 🍜 with chopsticks",
    "Hello, World! It's 2024.",
] * 4


def make_clip(folder: Path, pad_token: str | None = None) -> Path:
    """CLIP's vocab layout (bytes, bytes + </w>, one token per merge, the two specials) with merges trained on CAPTIONS,
    by the toy trainer's maker (slimengine.tools.train_toy_sd3.make_clip_tokenizer), model_max_length 77 as SD3's."""
    from slimengine.tools.train_toy_sd3 import make_clip_tokenizer

    make_clip_tokenizer(folder, CAPTIONS, 77, pad_token, vocab_size=600)
    return folder


def make_t5(folder: Path) -> Path:
    """T5's special ids (pad 0, eos 1, unk 2, no bos) in a unigram model trained on CAPTIONS."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS), model_prefix=str(folder / "spiece"), vocab_size=90,
                                   hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "model_max_length": 512}))
    return folder


def make_pipeline_tokenizers(root: Path) -> Path:
    """tokenizer/, tokenizer_2/ and tokenizer_3/ as in a diffusers SD3 pipeline folder."""
    make_clip(root / "tokenizer")
    make_clip(root / "tokenizer_2", pad_token="!")
    make_t5(root / "tokenizer_3")
    return root


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet in CLIP's order: printable Latin-1 bytes as themselves, the rest from U+0100."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def make_sd3_clip(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    """SD3's tokenizer/ (CLIP-L; pad_token "!" for tokenizer_2/, CLIP-bigG): the vocabulary CLIP's SimpleTokenizer
    builds from its merges (bytes, bytes + </w>, one token per merge, the two specials), with the configuration of
    openai/clip-vit-large-patch14 (bos/eos registered normalized, "!" as a non-normalized special when it pads)."""
    merges = gzip.open(DATA / "clip_bpe_simple_vocab_16e6.txt.gz").read().decode().split("\n")[1:49152 - 256 - 2 + 1]
    alphabet = _byte_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    def special(content, normalized):
        return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False, "special": True}

    added = {"49406": special("<|startoftext|>", True), "49407": special("<|endoftext|>", True)}
    if pad_token == "!":
        added = {"0": special("!", False), **added}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": pad_token, "do_lower_case": True, "added_tokens_decoder": added}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder


def make_sd3_t5(folder: Path) -> Path:
    """SD3's tokenizer_3/: T5 v1.1's spiece.model, its 100 extra ids added by transformers (ids 32000 to 32099)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(gzip.open(DATA / "t5_v1_1_spiece.model.gz").read())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 100}))
    return folder


def make_sd3_tokenizers(root: Path) -> Path:
    """SD3's tokenizer/, tokenizer_2/ and tokenizer_3/, as in stabilityai/stable-diffusion-3-medium-diffusers."""
    make_sd3_clip(root / "tokenizer")
    make_sd3_clip(root / "tokenizer_2", pad_token="!")
    make_sd3_t5(root / "tokenizer_3")
    return root


def make_t5_json_only(source: Path, folder: Path) -> Path:
    """A T5 tokenizer folder as today's transformers saves it: tokenizer.json and tokenizer_config.json, no spiece.model."""
    from transformers import T5TokenizerFast

    T5TokenizerFast.from_pretrained(str(source)).save_pretrained(str(folder))
    (folder / "spiece.model").unlink(missing_ok=True)
    return folder
