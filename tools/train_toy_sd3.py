"""train-toy-sd3: train the toy prompt-to-image pipeline (coloured shapes) on CPU, in minutes.

Everything SD3 needs between a prompt and a picture, small and trained here on toy_shapes.py's images and captions:
1. tokenizers from the caption vocabulary: a CLIP-style byte-level BPE (vocab.json + merges.txt, trained with
   `tokenizers`) for tokenizer/ and tokenizer_2/, a T5-style SentencePiece unigram model (plus every caption word as a piece) for tokenizer_3/;
2. a VAE (diffusers AutoencoderKL, 16 latent channels, scale factor 2) trained on the shapes (reconstruction + a small
   KL); its scaling_factor/shift_factor are set from the latents' statistics, as SD3's VAE config carries them;
3. the SD3 transformer trained by flow matching (x_t = (1 - σ) x0 + σ ε, target v = ε - x0, logit-normal σ) on the
   VAE's scaled latents, jointly with the text encoders (CLIP-style L and G with projections, a T5 encoder) whose
   outputs are assembled as diffusers' SD3 encode_prompt does; 10 % empty captions teach the unconditional prediction
   that CFG's empty negative prompt gives; a small auxiliary loss (linear probes of the pooled and T5 outputs naming
   the shape and colour) gets the encoders separating the classes early.
Writes a diffusers-format pipeline folder without a transformer (model_index.json, scheduler/, tokenizer*/,
text_encoder*/, vae/) and the transformer checkpoint (.safetensors), both in fp16 and published atomically: the
teacher, sampled in 28 steps with CFG 4 (its metadata). export-engine CHECKPOINT --pipeline FOLDER makes a
prompt-to-image bundle of them; distill-1x distils the 1.x student from it (docs/distill-1x.md, models/README.md).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from slimengine.export.sampling_plan import make_plan
from slimengine.export.sd3_model import DistilledSD3, SD3Config
from slimengine.staging import (
    OutputPathError,
    output_file,
    publish,
    remove_stale_temporaries,
    sync_tree,
    temporary_path,
    write_file_atomically,
)
from slimengine.tools import toy_shapes

CLIP_LENGTH = 10  # tokens of the CLIP tokenizers (their model_max_length): every toy caption fits
T5_LENGTH = 10  # T5 tokens (tokenizer_3's model_max_length); export with --max-sequence-length 10
CLIP_SIZES = {"clip_l": (24, 16), "clip_g": (32, 16)}  # hidden size, projection size
JOINT_DIM, POOLED_DIM = 64, 32  # T5's d_model; the sum of the CLIP projections
LATENT_CHANNELS = 16
SHIFT = 3.0
CONFIG = SD3Config(num_layers=6, num_attention_heads=3, attention_head_dim=32, in_channels=LATENT_CHANNELS,
                   out_channels=LATENT_CHANNELS, patch_size=2, joint_attention_dim=JOINT_DIM, caption_projection_dim=96,
                   pooled_projection_dim=POOLED_DIM, pos_embed_max_size=16, sample_size=16, qk_norm="rms_norm")
LATENT_SIZE = toy_shapes.IMAGE_SIZE // 2


# --- tokenizers -----------------------------------------------------------------------------------------------------

CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's bytes-to-unicode table, in CLIP's vocab order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable + [256 + i for i in range(len(others))]]


def make_clip_tokenizer(folder: Path, texts: list[str], max_length: int, pad_token: str | None = None, vocab_size: int = 700) -> None:
    """CLIP's vocab layout (bytes, bytes + </w>, one token per merge, the two specials) with BPE merges trained on
    `texts`: CLIPTokenizer loads it as it loads openai/clip-vit-large-patch14's."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, end_of_word_suffix="</w>", show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    chars = _byte_chars()
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(vocab))}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length}
    if pad_token:  # SD3's tokenizer_2 pads with "!" (id 0), tokenizer/ with <|endoftext|>
        config["pad_token"] = pad_token
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def make_t5_tokenizer(folder: Path, texts: list[str], max_length: int) -> None:
    """T5's special ids (pad 0, eos 1, unk 2, no bos) in a SentencePiece unigram model trained on `texts`, with every
    word of `texts` added as a whole piece: on so small a corpus the unigram trainer keeps mostly single characters
    (17 pieces for "A MAGENTA TRIANGLE"). Unigram as T5's own: transformers converts any spiece.model to a Unigram
    tokenizer, so a BPE model would give other ids there than SentencePiece (and the engine) gives."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as spm_model

    folder.mkdir(parents=True, exist_ok=True)
    trained = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=trained, vocab_size=80, hard_vocab_limit=False,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    model = spm_model.ModelProto()
    model.ParseFromString(trained.getvalue())
    known = {p.piece for p in model.pieces}
    best = max(p.score for p in model.pieces if p.type == spm_model.ModelProto.SentencePiece.NORMAL)
    for word in sorted({w for text in texts for w in text.replace(",", " ,").split()}):
        if "\u2581" + word not in known:
            model.pieces.add(piece="\u2581" + word, score=best, type=spm_model.ModelProto.SentencePiece.NORMAL)
    (folder / "spiece.model").write_bytes(model.SerializeToString())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "model_max_length": max_length}))


def make_tokenizers(root: Path) -> dict:
    from transformers import CLIPTokenizer, T5TokenizerFast

    texts = toy_shapes.all_captions() * 4
    make_clip_tokenizer(root / "tokenizer", texts, CLIP_LENGTH)
    make_clip_tokenizer(root / "tokenizer_2", texts, CLIP_LENGTH, pad_token="!")
    make_t5_tokenizer(root / "tokenizer_3", texts, T5_LENGTH)
    return {"clip_l": CLIPTokenizer.from_pretrained(str(root / "tokenizer")), "clip_g": CLIPTokenizer.from_pretrained(str(root / "tokenizer_2")),
            "t5": T5TokenizerFast.from_pretrained(str(root / "tokenizer_3"))}


def make_encoders(tokenizers: dict) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    encoders = {}
    for role, (hidden, projection) in CLIP_SIZES.items():
        tok = tokenizers[role]
        config = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=projection,
                                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_LENGTH, hidden_act="gelu",
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        encoders[role] = CLIPTextModelWithProjection(config)
    t5 = tokenizers["t5"]
    encoders["t5"] = T5EncoderModel(T5Config(vocab_size=len(t5), d_model=JOINT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                             relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                                             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    return encoders


# --- VAE ------------------------------------------------------------------------------------------------------------


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(16, 32), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
                         use_quant_conv=False, use_post_quant_conv=False, sample_size=toy_shapes.IMAGE_SIZE)


def train_vae(vae, steps: int, batch_size: int, seed: int, progress: bool, kl_weight: float = 1e-4) -> list[float]:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 50) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    losses = []
    bar = tqdm(range(steps), desc="VAE", disable=not progress, file=sys.stderr)
    for _ in bar:
        x = torch.from_numpy(toy_shapes.batch(batch_size, rng)[0])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = torch.nn.functional.mse_loss(recon, x)
        loss = rec + kl_weight * posterior.kl().mean() / (LATENT_CHANNELS * LATENT_SIZE**2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(rec.item())
        bar.set_postfix(mse=f"{np.mean(losses[-50:]):.4f}")
    return losses


@torch.no_grad()
def latent_bank(vae, count: int, seed: int):
    """Posterior means and stds of `count` fresh images, their classes, and (scaling_factor, shift_factor) that give the
    scaled latents (z - shift) * scaling zero mean and unit variance."""
    rng = np.random.default_rng(seed)
    images, shapes, colours = toy_shapes.batch(count, rng)
    means, stds = [], []
    for chunk in torch.from_numpy(images).split(256):
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    shift = mean.mean().item()
    scaling = 1.0 / math.sqrt(((mean - shift) ** 2).mean().item() + (std**2).mean().item())
    return mean, std, torch.from_numpy(shapes), torch.from_numpy(colours), scaling, shift


# --- transformer + text encoders --------------------------------------------------------------------------------------


class CaptionTable:
    """Every caption's ids (all templates of all classes, and "" last) by tokenizer role, tokenized once."""

    def __init__(self, tokenizers: dict):
        self.captions = toy_shapes.all_captions() + [""]
        self.ids = toy_shapes.tokenize(tokenizers, self.captions)
        self.empty = len(self.captions) - 1
        per_template = len(toy_shapes.SHAPES) * len(toy_shapes.COLOURS)
        self.templates = len(toy_shapes.CAPTION_TEMPLATES)
        self.index = lambda shape, colour, template: template * per_template + shape * len(toy_shapes.COLOURS) + colour

    def sample(self, shapes, colours, rng: np.random.Generator, empty_fraction: float) -> tuple[dict, torch.Tensor]:
        """Ids of a random caption per class, `empty_fraction` of them the empty caption; and the empty mask."""
        rows = self.index(np.asarray(shapes), np.asarray(colours), rng.integers(0, self.templates, len(shapes)))
        empty = rng.random(len(shapes)) < empty_fraction
        rows[empty] = self.empty
        return {role: ids[torch.from_numpy(rows)] for role, ids in self.ids.items()}, torch.from_numpy(empty)


def train_flow_matching(model: DistilledSD3, encoders: dict, table: CaptionTable, bank, steps: int, batch_size: int, seed: int,
                        progress: bool) -> list[float]:
    mean, std, shapes, colours, scaling, shift = bank
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    classes = len(toy_shapes.SHAPES) + len(toy_shapes.COLOURS)
    probes = torch.nn.ModuleDict({"pooled": torch.nn.Linear(POOLED_DIM, classes), "t5": torch.nn.Linear(JOINT_DIM, classes)})
    params = list(model.transformer.parameters()) + [p for e in encoders.values() for p in e.parameters()] + list(probes.parameters())
    opt = torch.optim.AdamW(params, lr=1.5e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 100) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    losses = []
    bar = tqdm(range(steps), desc="flow matching", disable=not progress, file=sys.stderr)
    for _ in bar:
        pick = torch.from_numpy(rng.integers(0, len(mean), batch_size))
        x0 = ((mean[pick] + std[pick] * torch.randn_like(std[pick])) - shift) * scaling
        ids, empty = table.sample(shapes[pick].numpy(), colours[pick].numpy(), rng, 0.1)
        text, pooled = toy_shapes.sd3_conditioning(encoders, ids, JOINT_DIM)
        sigma = torch.sigmoid(torch.randn(batch_size))
        noise = torch.randn_like(x0)
        xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        v = model.forward_full(xt, sigma * 1000, pooled, text)
        loss = torch.nn.functional.mse_loss(v, noise - x0)
        # Auxiliary: the pooled and T5 outputs of a real caption name its shape and colour.
        keep = ~empty
        t5_mean = text[keep, -T5_LENGTH:].mean(dim=1)
        aux = 0.0
        for logits in (probes["pooled"](pooled[keep]), probes["t5"](t5_mean)):
            aux = aux + torch.nn.functional.cross_entropy(logits[:, : len(toy_shapes.SHAPES)], shapes[pick][keep]) \
                + torch.nn.functional.cross_entropy(logits[:, len(toy_shapes.SHAPES) :], colours[pick][keep])
        opt.zero_grad()
        (loss + 0.05 * aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", aux=f"{aux.item():.3f}")
    return losses


@torch.no_grad()
def class_conditioning(encoders: dict, table: CaptionTable, shapes, colours, templates) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(table.index(np.asarray(shapes), np.asarray(colours), np.asarray(templates)))
    return toy_shapes.sd3_conditioning(encoders, {r: ids[rows] for r, ids in table.ids.items()}, JOINT_DIM)


# --- output ---------------------------------------------------------------------------------------------------------

MODEL_INDEX = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.31.0",
               "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "transformer": [None, None],
               "vae": ["diffusers", "AutoencoderKL"],
               "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
               "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
               "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5TokenizerFast"],
               "image_encoder": [None, None], "feature_extractor": [None, None]}


def write_pipeline(tmp: Path, encoders: dict, vae) -> None:
    """Encoders, VAE, scheduler and model_index.json into `tmp` (which holds the tokenizers already), weights in fp16."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    for role, (_, folder) in toy_shapes.ENCODER_FOLDERS.items():
        encoders[role].to(torch.float16).save_pretrained(tmp / folder)
        encoders[role].float()
    vae.to(torch.float16).save_pretrained(tmp / "vae")
    vae.float()
    FlowMatchEulerDiscreteScheduler(shift=SHIFT).save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="train-toy-sd3", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, required=True, help="transformer .safetensors checkpoint to write")
    parser.add_argument("--pipeline", type=Path, required=True, help="pipeline folder to write (tokenizers, text encoders, VAE, scheduler)")
    parser.add_argument("--vae-steps", type=int, default=600, help="VAE training steps (default 600)")
    parser.add_argument("--steps", type=int, default=2400, help="flow-matching steps (default 2400)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=Path, help="also write a PNG grid of 28-step samples, one per class, here")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: every core)")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.output.suffix != ".safetensors":
        parser.error("the output must be a .safetensors file")
    try:  # before any work: never a device, FIFO, socket, directory or a link to nothing (docs/export.md, "Output files")
        output_file(args.output, parents=True)
    except OutputPathError as e:
        parser.error(str(e))
    torch.set_num_threads(args.threads)
    progress = not args.quiet
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))

    start = time.perf_counter()
    folder = args.pipeline.resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    tmp = temporary_path(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tokenizers = make_tokenizers(tmp)
        encoders = make_encoders(tokenizers)
        times = {}
        vae = make_vae().train()
        vae_losses = train_vae(vae, args.vae_steps, 24, args.seed, progress)
        vae.eval().requires_grad_(False)
        bank = latent_bank(vae, 8192 if args.steps > 10 else 64, args.seed + 3)
        scaling, shift = bank[4], bank[5]
        vae.register_to_config(scaling_factor=scaling, shift_factor=shift)
        times["vae"] = time.perf_counter() - start
        log(f"VAE: reconstruction MSE {np.mean(vae_losses[-50:]):.4f}, scaling_factor {scaling:.4f}, shift_factor {shift:.4f} "
            f"({times['vae']:.0f} s)")

        table = CaptionTable(tokenizers)
        # Built with compensation MLPs, never trained nor saved: they draw from torch's RNG at init, and the shipped teacher
        # was trained after that draw (a rerun reproduces it only with the same sequence).
        model = DistilledSD3(CONFIG, with_compensation=True).train()
        for e in encoders.values():
            e.train()
        losses = train_flow_matching(model, encoders, table, bank, args.steps, args.batch_size, args.seed, progress)
        model.eval()
        for e in encoders.values():
            e.eval()
        times["flow_matching"] = time.perf_counter() - start - times["vae"]
        log(f"flow matching: final loss {np.mean(losses[-100:]):.4f} ({times['flow_matching']:.0f} s)")

        from safetensors.torch import save_file

        metadata = {"num_attention_heads": CONFIG.num_attention_heads, "sample_size": CONFIG.sample_size, "toy_shapes": True,
                    "sampling": {"steps": 28, "shift": SHIFT, "guidance_scale": 4.0},
                    "pipeline": {"clip_length": CLIP_LENGTH, "max_sequence_length": T5_LENGTH},
                    "training": {"steps": args.steps, "vae_steps": args.vae_steps, "batch_size": args.batch_size, "seed": args.seed,
                                 "final_loss": float(np.mean(losses[-100:])), "vae_mse": float(np.mean(vae_losses[-50:])),
                                 "seconds": round(time.perf_counter() - start)}}
        state = {k.removeprefix("transformer."): v.detach().to(torch.float16).contiguous() for k, v in model.transformer.state_dict(
            prefix="transformer.").items()}
        write_pipeline(tmp, encoders, vae)
        sync_tree(tmp)
        publish(tmp, folder, force=True, writer="train-toy-sd3")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_file_atomically(args.output, lambda t: save_file(state, str(t), metadata={"slimengine": json.dumps(metadata)}), parents=True)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) + args.output.stat().st_size
    log(f"wrote {folder} and {args.output} ({sum(v.numel() for v in state.values()) / 1e6:.2f} M transformer params, "
        f"{size / 2**20:.1f} MiB in all) in {time.perf_counter() - start:.0f} s")
    if args.samples:
        write_samples(model, encoders, table, vae, args.samples)
    return 0


@torch.no_grad()
def write_samples(model: DistilledSD3, encoders: dict, table: CaptionTable, vae, path: Path, steps: int = 28, guidance: float = 4.0) -> None:
    from slimengine.export.reference_sampler import reference_generate

    plan = make_plan(model.num_layers, False, steps=steps, guidance_scale=guidance, shift=SHIFT)
    shapes, colours = toy_shapes.class_grid()
    text, pooled = class_conditioning(encoders, table, shapes, colours, np.zeros_like(shapes))
    empty = {r: ids[[table.empty] * len(shapes)] for r, ids in table.ids.items()}
    neg_text, neg_pooled = toy_shapes.sd3_conditioning(encoders, empty, JOINT_DIM)
    x = torch.randn(len(shapes), CONFIG.in_channels, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(0))
    out = reference_generate(model, plan, text, pooled, x, neg_text, neg_pooled).latents
    z = out / vae.config.scaling_factor + vae.config.shift_factor
    toy_shapes.save_png(toy_shapes.to_uint8(vae.decode(z).sample.numpy()), path)


if __name__ == "__main__":
    sys.exit(main())
