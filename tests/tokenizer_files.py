"""Small SD3-layout tokenizer folders made here: a CLIP-style byte-level BPE (vocab.json, merges.txt) trained with
`tokenizers`, and a T5-style SentencePiece unigram model (spiece.model) trained with `sentencepiece`."""

from __future__ import annotations

import json
from pathlib import Path

CAPTIONS = [
    "a red circle on a blue background", "a green square", "a photo of a cat sitting on a mat",
    "an astronaut riding a horse on the moon", "a painting of a lighthouse at sunset, oil on canvas",
    "a close-up photo of a dog's face", "the quick brown fox jumps over the lazy dog", "A yellow triangle and a purple star",
    "city skyline at night with neon lights", "café au lait, crème brûlée", "東京の夜景", "a bowl of ramen 🍜 with chopsticks",
    "Hello, World! It's 2024.",
] * 4
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's bytes-to-unicode table, in CLIP's vocab order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable + [256 + i for i in range(len(others))]]


def make_clip(folder: Path, pad_token: str | None = None) -> Path:
    """CLIP's vocab layout (bytes, bytes + </w>, one token per merge, the two specials) with merges trained on CAPTIONS."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.train_from_iterator(CAPTIONS, trainers.BpeTrainer(vocab_size=600, end_of_word_suffix="</w>", show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    chars = _byte_chars()
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(vocab))}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}
    if pad_token:  # SD3's tokenizer_2 pads with "!" (id 0), tokenizer/ with <|endoftext|>
        config["pad_token"] = pad_token
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
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
