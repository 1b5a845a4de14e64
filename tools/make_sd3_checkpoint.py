"""make-sd3-checkpoint: write an SD3 / 1.x-Distill checkpoint with seeded random weights.

For tests, demos and benchmarks: any size from a few-layer toy to the full SD3-Medium
configuration, in every format export-engine reads (.pt, .safetensors, diffusers folder; diffusers
or original MMDiT key names; wrapper prefixes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from slimengine.export.sd3_model import DistilledSD3, SD3Config
from slimengine.staging import OutputPathError, output_file, write_file_atomically

PRESETS = {
    # The small CPU configuration: 4 layers, 8 heads x 32.
    "small": dict(num_layers=4, num_attention_heads=8, attention_head_dim=32, joint_attention_dim=4096,
                  caption_projection_dim=256, pooled_projection_dim=2048, pos_embed_max_size=96),
    "tiny": dict(num_layers=4, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=48,
                 caption_projection_dim=32, pooled_projection_dim=24, pos_embed_max_size=16),
    # SD3.5 features at toy size: qk-norm and dual attention.
    "tiny-3.5": dict(num_layers=4, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=48,
                     caption_projection_dim=32, pooled_projection_dim=24, pos_embed_max_size=16, qk_norm="rms_norm",
                     dual_attention_layers=(0, 1)),
    "sd3-medium": dict(num_layers=24, num_attention_heads=24, attention_head_dim=64, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
    "sd3.5-medium": dict(num_layers=24, num_attention_heads=24, attention_head_dim=64, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    "sd3.5-large": dict(num_layers=38, num_attention_heads=38, attention_head_dim=64, joint_attention_dim=4096,
                        caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
}
COMMON = dict(in_channels=16, out_channels=16, patch_size=2)


def random_state_dict(config: SD3Config, with_compensation: bool, seed: int, dtype: torch.dtype) -> dict:
    """Seeded weights for every tensor of the model, built tensor by tensor (no fp32 copy of a big model)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DistilledSD3(config, with_compensation).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        name = key.removeprefix("transformer.")
        if name == "pos_embed.pos_embed":
            grid = config.pos_embed_max_size
            table = get_2d_sincos_pos_embed(config.inner_dim, grid, base_size=config.sample_size // config.patch_size,
                                            output_type="pt")
            state[name] = table.float().unsqueeze(0).to(dtype)
        elif len(shape) == 1 and name.endswith(".weight"):  # norm scales
            state[name] = torch.ones(shape, dtype=dtype)
        elif len(shape) == 1:  # biases
            state[name] = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
        else:
            fan_in = int(torch.tensor(shape[1:]).prod())
            state[name] = (torch.randn(shape, generator=generator) / fan_in**0.5).to(dtype)
    return state


def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_original_keys(state: dict, num_layers: int) -> dict:
    """diffusers names -> original MMDiT names: the inverse of diffusers' single-file conversion."""
    out, s = {}, dict(state)
    p = "model.diffusion_model."
    out[p + "pos_embed"] = s.pop("pos_embed.pos_embed")
    for a, b in [("x_embedder.proj", "pos_embed.proj"), ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
                 ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"), ("context_embedder", "context_embedder"),
                 ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
                 ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"), ("final_layer.linear", "proj_out")]:
        for t in ("weight", "bias"):
            out[f"{p}{a}.{t}"] = s.pop(f"{b}.{t}")
    for t in ("weight", "bias"):
        out[f"{p}final_layer.adaLN_modulation.1.{t}"] = swap_halves(s.pop(f"norm_out.linear.{t}"))
    for i in range(num_layers):
        d, o = f"transformer_blocks.{i}.", f"{p}joint_blocks.{i}."
        last = i == num_layers - 1
        for t in ("weight", "bias"):
            out[f"{o}x_block.attn.qkv.{t}"] = torch.cat([s.pop(f"{d}attn.to_{x}.{t}") for x in "qkv"])
            out[f"{o}context_block.attn.qkv.{t}"] = torch.cat([s.pop(f"{d}attn.add_{x}_proj.{t}") for x in "qkv"])
            out[f"{o}x_block.attn.proj.{t}"] = s.pop(f"{d}attn.to_out.0.{t}")
            out[f"{o}x_block.adaLN_modulation.1.{t}"] = s.pop(f"{d}norm1.linear.{t}")
            ctx_mod = s.pop(f"{d}norm1_context.linear.{t}")
            out[f"{o}context_block.adaLN_modulation.1.{t}"] = swap_halves(ctx_mod) if last else ctx_mod
            out[f"{o}x_block.mlp.fc1.{t}"] = s.pop(f"{d}ff.net.0.proj.{t}")
            out[f"{o}x_block.mlp.fc2.{t}"] = s.pop(f"{d}ff.net.2.{t}")
            if not last:
                out[f"{o}context_block.attn.proj.{t}"] = s.pop(f"{d}attn.to_add_out.{t}")
                out[f"{o}context_block.mlp.fc1.{t}"] = s.pop(f"{d}ff_context.net.0.proj.{t}")
                out[f"{o}context_block.mlp.fc2.{t}"] = s.pop(f"{d}ff_context.net.2.{t}")
            if f"{d}attn2.to_q.{t}" in s:
                out[f"{o}x_block.attn2.qkv.{t}"] = torch.cat([s.pop(f"{d}attn2.to_{x}.{t}") for x in "qkv"])
                out[f"{o}x_block.attn2.proj.{t}"] = s.pop(f"{d}attn2.to_out.0.{t}")
        for a, b in [("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
                     ("context_block.attn.ln_q", "attn.norm_added_q"), ("context_block.attn.ln_k", "attn.norm_added_k"),
                     ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k")]:
            if f"{d}{b}.weight" in s:
                out[f"{o}{a}.weight"] = s.pop(f"{d}{b}.weight")
    out.update(s)  # delta_pred_* keep their names
    return out


def write_checkpoint(state: dict, config: SD3Config, metadata: dict, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "pt":
        torch.save({"state_dict": state, "slimengine": metadata}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"slimengine": json.dumps(metadata)})
    elif fmt == "diffusers":
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        cfg = {"_class_name": "SD3Transformer2DModel", **config.diffusers_kwargs()}
        cfg["dual_attention_layers"] = list(config.dual_attention_layers)
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
        (path / "slimengine.json").write_text(json.dumps(metadata, indent=2))
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "diffusion_pytorch_model.safetensors"))
    else:
        raise ValueError(f"unknown format {fmt}")


def make_config(preset: str, layers: int | None = None) -> SD3Config:
    kwargs = {**COMMON, **PRESETS[preset]}
    if layers:
        kwargs["num_layers"] = layers
    return SD3Config(**kwargs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="make-sd3-checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", required=True, type=Path, help="file (.pt/.safetensors) or folder to write")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model size (default: small)")
    parser.add_argument("--layers", type=int, help="override the number of joint blocks")
    parser.add_argument("--plain", action="store_true", help="a plain SD3 model: no 1.x-Distill compensation MLPs")
    parser.add_argument("--skip-blocks", default=None, help="skipped block range (1.x) stored in the metadata, e.g. 1-2")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps stored in the metadata")
    parser.add_argument("--format", choices=["pt", "safetensors", "diffusers"], help="default: from the output suffix")
    parser.add_argument("--key-format", choices=["diffusers", "original"], default="diffusers")
    parser.add_argument("--prefix", default="", help="wrapper prefix added to every key, e.g. module.")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:  # before any work: never a device, FIFO, socket, directory or a link to nothing (docs/export.md, "Output files")
        output_file(args.output, parents=True)
    except OutputPathError as e:
        parser.error(str(e))

    config = make_config(args.preset, args.layers)
    fmt = args.format or {".pt": "pt", ".pth": "pt", ".safetensors": "safetensors"}.get(args.output.suffix, "diffusers")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    state = random_state_dict(config, not args.plain, args.seed, dtype)
    if args.key_format == "original":
        state = to_original_keys(state, config.num_layers)
    state = {args.prefix + k: v for k, v in state.items()}
    sampling = {}
    if args.steps:
        sampling["steps"] = args.steps
    if args.skip_blocks:
        sampling["skip_blocks"] = args.skip_blocks
    elif not args.plain and config.num_layers < 9:  # 2-7 does not fit: skip blocks 1..L-2
        sampling["skip_blocks"] = f"1-{config.num_layers - 2}"
    metadata = {"num_attention_heads": config.num_attention_heads, "sampling": sampling}
    write_file_atomically(args.output, lambda tmp: write_checkpoint(state, config, metadata, tmp, fmt), parents=True)
    params = sum(v.numel() for v in state.values())
    print(f"wrote {args.output} ({args.preset}, {config.num_layers} layers, {params / 1e6:.1f} M params, {fmt}, "
          f"{'plain' if args.plain else '1.x-distill'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
