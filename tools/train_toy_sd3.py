"""train-toy-sd3: train a small SD3-architecture model on coloured shapes, on CPU, in minutes.

Flow matching (x_t = (1 - σ) x0 + σ ε, target v = ε - x0, logit-normal σ) on the procedural image
set of toy_shapes.py, with 10 % unconditional samples for classifier-free guidance; then the 1.x
compensation MLPs are fitted by regression on Δ pairs (Δ recorded over the cached range at step 1
-> the true Δ at step 2) so that the checkpoint is a real 1.x-Distill student. The result is a
small `.safetensors` checkpoint that export-engine reads like any other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from slimengine.export.bundle import write_file_atomically
from slimengine.export.sampling_plan import make_plan
from slimengine.export.sd3_model import DistilledSD3, SD3Config
from slimengine.tools import toy_shapes

CONFIG = SD3Config(num_layers=6, num_attention_heads=3, attention_head_dim=32, in_channels=toy_shapes.LATENT_CHANNELS,
                   out_channels=toy_shapes.LATENT_CHANNELS, patch_size=2, joint_attention_dim=toy_shapes.JOINT_DIM,
                   caption_projection_dim=96, pooled_projection_dim=toy_shapes.POOLED_DIM, pos_embed_max_size=16, sample_size=16,
                   qk_norm="rms_norm")
CACHE_BLOCKS = (1, 3)


def train_flow_matching(model: DistilledSD3, steps: int, batch_size: int, seed: int, progress: bool) -> list[float]:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    params = list(model.transformer.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 100) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    losses = []
    bar = tqdm(range(steps), desc="flow matching", disable=not progress, file=sys.stderr)
    for _ in bar:
        images, shapes, colours = toy_shapes.batch(batch_size, rng)
        x0 = toy_shapes.to_latents(images)
        text, pooled = (torch.from_numpy(a) for a in toy_shapes.prompt_embeds(shapes, colours))
        drop = torch.from_numpy(rng.random(batch_size) < 0.1)  # unconditional: zero embeddings
        text[drop], pooled[drop] = 0, 0
        sigma = torch.sigmoid(torch.randn(batch_size))
        noise = torch.randn_like(x0)
        xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        v = model.forward_full(xt, sigma * 1000, pooled, text)
        loss = torch.nn.functional.mse_loss(v, noise - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return losses


@torch.no_grad()
def delta_pairs(model: DistilledSD3, count: int, seed: int):
    """(Δ recorded at step 1, true Δ at step 2) over the cached range, for both streams."""
    plan = make_plan(model.num_layers, True, cache_blocks=CACHE_BLOCKS)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    shapes = rng.integers(0, len(toy_shapes.SHAPES), count)
    colours = rng.integers(0, len(toy_shapes.COLOURS), count)
    text, pooled = (torch.from_numpy(a) for a in toy_shapes.prompt_embeds(shapes, colours))
    x = torch.randn(count, CONFIG.in_channels, 16, 16, generator=g)
    first, last = CACHE_BLOCKS
    deltas = []
    for step in range(2):
        sigma, sigma_next = plan.sigmas[step], plan.sigmas[step + 1]
        img, txt, temb = model.embed(x, torch.full((count,), plan.timesteps[step]), pooled, text)
        for i in range(model.num_layers):
            if i == first:
                before = (img, txt)
            img, txt = model.block(i, img, txt, temb)
            if i == last:
                deltas.append((img - before[0], txt - before[1]))
        x = x + (sigma_next - sigma) * model.final(img, temb, x)
    return deltas[0], deltas[1]


def fit_compensation(model: DistilledSD3, pairs, steps: int, seed: int, progress: bool) -> dict[str, float]:
    (rec_img, rec_txt), (true_img, true_txt) = pairs
    torch.manual_seed(seed)
    errors = {}
    for name, mlp, x, y in [("image", model.delta_pred_hidden, rec_img, true_img), ("text", model.delta_pred_encoder, rec_txt, true_txt)]:
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        opt = torch.optim.Adam(mlp.parameters(), lr=1e-3)
        identity_error = torch.nn.functional.mse_loss(x, y).item()
        for _ in tqdm(range(steps), desc=f"compensation ({name})", disable=not progress, file=sys.stderr):
            idx = torch.randint(0, x.shape[0], (1024,))
            loss = torch.nn.functional.mse_loss(mlp(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            errors[name] = (identity_error, torch.nn.functional.mse_loss(mlp(x), y).item())
    return errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="train-toy-sd3", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, required=True, help=".safetensors checkpoint to write")
    parser.add_argument("--steps", type=int, default=4000, help="flow-matching steps (default 4000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--compensation-steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=Path, help="also write a PNG grid of 28-step samples here")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.output.suffix != ".safetensors":
        parser.error("the output must be a .safetensors file")
    torch.set_num_threads(os.cpu_count() or 1)

    start = time.perf_counter()
    model = DistilledSD3(CONFIG, with_compensation=True).train()
    losses = train_flow_matching(model, args.steps, args.batch_size, args.seed, not args.quiet)
    model.eval()
    errors = fit_compensation(model, delta_pairs(model, 256, args.seed + 1), args.compensation_steps, args.seed + 2, not args.quiet)
    for name, (identity, fitted) in errors.items():
        print(f"compensation {name}: MSE(Δ1 - Δ2) {identity:.4f} -> MSE(MLP(Δ1) - Δ2) {fitted:.4f}", file=sys.stderr)

    from safetensors.torch import save_file

    metadata = {"num_attention_heads": CONFIG.num_attention_heads, "sample_size": CONFIG.sample_size, "toy_shapes": True,
                "sampling": {"steps": 2, "shift": 3.0, "cache_blocks": f"{CACHE_BLOCKS[0]}-{CACHE_BLOCKS[1]}"},
                "training": {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
                             "final_loss": float(np.mean(losses[-100:]))}}
    state = {k.removeprefix("transformer."): v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    write_file_atomically(args.output, lambda tmp: save_file(state, str(tmp), metadata={"slimengine": json.dumps(metadata)}))
    print(f"wrote {args.output} ({sum(v.numel() for v in state.values()) / 1e6:.2f} M params, final loss "
          f"{metadata['training']['final_loss']:.4f}) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if args.samples:
        write_samples(model, args.samples)
    return 0


@torch.no_grad()
def write_samples(model: DistilledSD3, path: Path, steps: int = 28, guidance: float = 4.0) -> None:
    from slimengine.export.reference_sampler import reference_generate

    plan = make_plan(model.num_layers, False, steps=steps, guidance_scale=guidance)
    shapes = np.repeat(np.arange(len(toy_shapes.SHAPES)), len(toy_shapes.COLOURS))
    colours = np.tile(np.arange(len(toy_shapes.COLOURS)), len(toy_shapes.SHAPES))
    text, pooled = (torch.from_numpy(a) for a in toy_shapes.prompt_embeds(shapes, colours))
    x = torch.randn(len(shapes), CONFIG.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    out = reference_generate(model, plan, text, pooled, x, text * 0, pooled * 0).latents
    toy_shapes.save_png(toy_shapes.to_images(out), path)


if __name__ == "__main__":
    sys.exit(main())
