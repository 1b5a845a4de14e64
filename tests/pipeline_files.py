"""A tiny random diffusers SD3 pipeline folder (model_index.json, transformer, CLIP-L/G, T5, VAE, scheduler, tokenizers)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tokenizer_files import make_pipeline_tokenizers

SCALING, SHIFT_FACTOR, SCHEDULER_SHIFT = 1.5305, 0.0609, 2.5

# Component sizes. "tiny": for tests (64 px images). "small": for benchmarks (benchmarks/bench_prompt.py), big enough
# that each stage's compute shows over call overhead on a CPU: 256 px images (32x32 latents), CLIP-L/G 4 layers of
# 192/320, T5 4 layers of 512, a 4-block transformer of width 128, a VAE of widths 32-128.
PRESETS = {
    "tiny": {"clip": (("text_encoder", 32, 24), ("text_encoder_2", 48, 40)), "clip_layers": 3, "clip_heads": 2,
             "t5": dict(d_model=96, d_kv=16, d_ff=64, num_layers=2, num_heads=2), "vae_widths": (8, 8, 16, 16), "vae_groups": 4,
             "transformer": dict(sample_size=8, num_layers=2, attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32,
                                 pos_embed_max_size=16)},
    "small": {"clip": (("text_encoder", 192, 192), ("text_encoder_2", 320, 320)), "clip_layers": 4, "clip_heads": 4,
              "t5": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=4, num_heads=8), "vae_widths": (32, 64, 128, 128), "vae_groups": 32,
              "transformer": dict(sample_size=32, num_layers=4, attention_head_dim=32, num_attention_heads=4, caption_projection_dim=128,
                                  pos_embed_max_size=64)},
    # diffusers' own dummy SD3 components (tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py,
    # get_dummy_components; T5 is hf-internal-testing/tiny-random-t5's config): CLIP-L + CLIP-G (32 + 32) are wider than
    # T5 and joint_attention_dim (32), a 1-block VAE (scale factor 1) of 4 latent channels, patch size 1.
    "diffusers": {"clip": (("text_encoder", 32, 32), ("text_encoder_2", 32, 32)), "clip_layers": 5, "clip_heads": 4, "clip_intermediate": 37,
                  "t5": dict(d_model=32, d_kv=8, d_ff=37, num_layers=5, num_heads=4, feed_forward_proj="relu"), "vae_widths": (4,),
                  "vae_groups": 1, "latent_channels": 4, "scaling_factor": 1.5035, "scheduler_shift": 1.0,
                  "transformer": dict(sample_size=32, patch_size=1, num_layers=1, attention_head_dim=8, num_attention_heads=4,
                                      caption_projection_dim=32)},
}


# Prompts the prompt-to-image tests (Python and C) run: unicode, punctuation, one over CLIP's 77 tokens; and negatives.
PROMPTS = ["a red circle on a blue square", "Ünïcode, PUNCTUATION!? and a long " + "very " * 40 + "long prompt"]
NEGATIVES = ["", "blurry"]

def make_sd3_pipeline(root: Path, seed: int = 0, preset: str = "tiny") -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    make_pipeline_tokenizers(root)
    torch.manual_seed(seed)
    size = PRESETS[preset]
    clip_tok = CLIPTokenizer.from_pretrained(root / "tokenizer")
    t5_tok = T5TokenizerFast.from_pretrained(root / "tokenizer_3")
    for folder, hidden, proj in size["clip"]:
        config = CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=hidden, intermediate_size=size.get("clip_intermediate", 2 * hidden),
                                projection_dim=proj,
                                num_hidden_layers=size["clip_layers"], num_attention_heads=size["clip_heads"], max_position_embeddings=77, hidden_act="gelu",
                                bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id)
        CLIPTextModelWithProjection(config).eval().save_pretrained(root / folder)
    t5 = T5Config(vocab_size=len(t5_tok), **{"feed_forward_proj": "gated-gelu", **size["t5"]}, relative_attention_num_buckets=8,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5EncoderModel(t5).eval().save_pretrained(root / "text_encoder_3")
    blocks, latent_channels = len(size["vae_widths"]), size.get("latent_channels", 16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=size["vae_widths"],
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                        norm_num_groups=size["vae_groups"], scaling_factor=size.get("scaling_factor", SCALING), shift_factor=SHIFT_FACTOR,
                        use_quant_conv=False, use_post_quant_conv=False, sample_size=64)
    vae.save_pretrained(root / "vae")
    pooled = sum(proj for _, _, proj in size["clip"])
    SD3Transformer2DModel(**{"patch_size": 2, **size["transformer"]}, in_channels=latent_channels, out_channels=latent_channels,
                          joint_attention_dim=size["t5"]["d_model"], pooled_projection_dim=pooled).save_pretrained(root / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=size.get("scheduler_shift", SCHEDULER_SHIFT)).save_pretrained(root / "scheduler")
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.31.0",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "transformer": ["diffusers", "SD3Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5TokenizerFast"]}
    (root / "model_index.json").write_text(json.dumps(index, indent=1))
    return root
