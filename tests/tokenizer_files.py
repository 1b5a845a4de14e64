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
