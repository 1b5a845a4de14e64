"""A tiny random diffusers SD3 pipeline folder (model_index.json, transformer, CLIP-L/G, T5, VAE, scheduler, tokenizers)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tokenizer_files import make_pipeline_tokenizers

SCALING, SHIFT_FACTOR, SCHEDULER_SHIFT = 1.5305, 0.0609, 2.5


def make_sd3_pipeline(root: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    make_pipeline_tokenizers(root)
    torch.manual_seed(seed)
    clip_tok = CLIPTokenizer.from_pretrained(root / "tokenizer")
    t5_tok = T5TokenizerFast.from_pretrained(root / "tokenizer_3")
    for folder, hidden, proj in (("text_encoder", 32, 24), ("text_encoder_2", 48, 40)):
        config = CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=proj,
                                num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
                                bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id)
        CLIPTextModelWithProjection(config).eval().save_pretrained(root / folder)
    t5 = T5Config(vocab_size=len(t5_tok), d_model=96, d_kv=16, d_ff=64, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                  feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5EncoderModel(t5).eval().save_pretrained(root / "text_encoder_3")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
                        scaling_factor=SCALING, shift_factor=SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False, sample_size=64)
    vae.save_pretrained(root / "vae")
    SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                          num_attention_heads=2, joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=64,
                          pos_embed_max_size=16).save_pretrained(root / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT).save_pretrained(root / "scheduler")
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.31.0",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "transformer": ["diffusers", "SD3Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5TokenizerFast"]}
    (root / "model_index.json").write_text(json.dumps(index, indent=1))
    return root
