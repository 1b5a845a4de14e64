"""The student's program in PyTorch (differentiable), its distillation, and the compensation fit (docs/distill-1x.md)."""

from __future__ import annotations

import math
import sys

import torch
from tqdm import tqdm

from slimengine.export.sampling_plan import SamplingPlan
from slimengine.export.sd3_model import DistilledSD3


def run_program(model: DistilledSD3, plan: SamplingPlan, x, text, pooled, neg_text=None, neg_pooled=None, skip: bool = True):
    """The sampling loop of docs/distill.md ("The sampling loop"), the latents after each step. CFG when the plan's
    guidance is above 1 (then neg_text/neg_pooled are the negative conditioning). `skip=False` runs every block
    (the full student the compensation is measured against). Gradients flow through every step."""
    cfg = plan.guidance_scale > 1.0
    if cfg:
        text, pooled = torch.cat([neg_text, text]), torch.cat([neg_pooled, pooled])
    first, last = plan.skip_blocks or (-1, -1)
    delta = compensated = None
    out = []
    for k in range(plan.steps):
        x_in = torch.cat([x, x]) if cfg else x
        t = torch.full((x_in.shape[0],), plan.timesteps[k], device=x.device, dtype=x.dtype)
        img, txt, temb = model.embed(x_in, t, pooled, text)
        for i in range(model.num_layers):
            if plan.records_delta(k) and i == first:
                before = (img, txt)
            if skip and plan.skips_block(k, i):
                if i == last:
                    if compensated is None:
                        compensated = model.compensate(*delta) if plan.compensation == "mlp" else delta
                    img, txt = img + compensated[0], txt + compensated[1]
                continue
            img, txt = model.block(i, img, txt, temb)
            if plan.records_delta(k) and i == last:
                delta, compensated = (img - before[0], txt - before[1]), None
        v = model.final(img, temb, x_in)
        if cfg:
            v_neg, v_pos = v.chunk(2)
            v = v_neg + plan.guidance_scale * (v_pos - v_neg)
        x = x + (plan.sigmas[k + 1] - plan.sigmas[k]) * v
        out.append(x)
    return out


def make_student(teacher: DistilledSD3) -> DistilledSD3:
    """The teacher's transformer with compensation MLPs (the teacher's own when it has them, else identity at init)."""
    student = DistilledSD3(teacher.config, with_compensation=True)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("delta_pred_") for k in missing), (missing, unexpected)
    return student


def distillation_loss(student: DistilledSD3, plan: SamplingPlan, noise, target, text, pooled, intermediate_weight: float = 0.5):
    """Regression on the teacher's trajectory: the student's last step should land on the teacher's sample, and each
    earlier step on the straight path between the noise and that sample at its sigma (the flow-matching interpolation
    x_σ = (1 - σ)·x0 + σ·ε). Returns (loss, final-step MSE)."""
    xs = run_program(student, plan, noise, text, pooled)
    final = torch.nn.functional.mse_loss(xs[-1], target)
    loss = final
    for k, x in enumerate(xs[:-1]):
        sigma = plan.sigmas[k + 1]
        loss = loss + intermediate_weight * torch.nn.functional.mse_loss(x, (1 - sigma) * target + sigma * noise)
    return loss, final


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first tenth of the steps (at most 50), then cosine decay to 0."""
    warmup = max(1, min(50, steps // 10))
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def mean_loss(losses: list[float], first: bool) -> float:
    """Mean of the first or last fifth of the losses (at most 50 of them)."""
    n = max(1, min(50, len(losses) // 5))
    window = losses[:n] if first else losses[-n:]
    return sum(window) / len(window)


def train(student: DistilledSD3, plan: SamplingPlan, data: dict, state: dict, steps: int, batch_size: int, lr: float, device: str,
          progress: bool, save=None, save_every: int = 200) -> None:
    """Distil `student` in place for `steps` optimiser steps from state["step"], every parameter (transformer and
    compensation together: the method's Distill-Cache co-training). `data`: prompt index, noise and teacher sample of
    every pair, and the prompts' conditioning. `state` carries what a resume needs (step, optimiser, batch order
    generator, losses) and is updated; `save(state)` is called every `save_every` steps."""
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    if "optimizer" in state:
        opt.load_state_dict(state["optimizer"])
    order = torch.Generator()
    order.set_state(state["order_rng"])
    student.train()
    pairs = data["noise"].shape[0]
    bar = tqdm(range(state["step"], steps), initial=state["step"], total=steps, desc="distilling", disable=not progress, file=sys.stderr)
    for step in bar:
        pick = torch.randint(0, pairs, (batch_size,), generator=order)
        prompt = data["prompt"][pick]
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        loss, final = distillation_loss(student, plan, data["noise"][pick].to(device), data["target"][pick].to(device),
                                        data["text"][prompt].to(device), data["pooled"][prompt].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        state["losses"].append(final.item())
        state["step"] = step + 1
        recent = state["losses"][-50:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
        if save is not None and (step + 1) % save_every == 0 and step + 1 < steps:
            state["optimizer"], state["order_rng"] = opt.state_dict(), order.get_state()
            save(state)
    state["optimizer"], state["order_rng"] = opt.state_dict(), order.get_state()
    student.eval()


@torch.no_grad()
def range_deltas(model: DistilledSD3, plan: SamplingPlan, x, text, pooled):
    """(Δ recorded by step 0, true Δ of step 1) over the plan's skipped range, image and text streams, with every block
    run: what the compensation must turn the first into."""
    first, last = plan.skip_blocks
    deltas = []
    for k in range(2):
        t = torch.full((x.shape[0],), plan.timesteps[k], device=x.device, dtype=x.dtype)
        img, txt, temb = model.embed(x, t, pooled, text)
        for i in range(model.num_layers):
            if i == first:
                before = (img, txt)
            img, txt = model.block(i, img, txt, temb)
            if i == last:
                deltas.append((img - before[0], txt - before[1]))
        x = x + (plan.sigmas[k + 1] - plan.sigmas[k]) * model.final(img, temb, x)
    return deltas


def fit_compensation(model: DistilledSD3, plan: SamplingPlan, noise, text, pooled, steps: int, seed: int, device: str, progress: bool,
                     batch_tokens: int = 4096, lr: float = 1e-3, chunk: int = 64) -> dict[str, tuple[float, float]]:
    """Fit only the compensation MLPs of a frozen `model` (which must have them) for the plan's range, by regression of
    step 1's Δ over the range on step 0's, token by token. Returns {stream: (MSE of Δ reused as is, MSE fitted)}."""
    recorded, true = [[], []], [[], []]
    for i in range(0, noise.shape[0], chunk):
        (r_img, r_txt), (t_img, t_txt) = range_deltas(model, plan, noise[i:i + chunk].to(device), text[i:i + chunk].to(device),
                                                      pooled[i:i + chunk].to(device))
        for lst, a, b in ((recorded, r_img, r_txt), (true, t_img, t_txt)):
            lst[0].append(a.reshape(-1, a.shape[-1]))
            lst[1].append(b.reshape(-1, b.shape[-1]))
    generator = torch.Generator().manual_seed(seed)
    errors = {}
    for s, (name, mlp) in enumerate((("image", model.delta_pred_hidden), ("text", model.delta_pred_encoder))):
        x, y = torch.cat(recorded[s]), torch.cat(true[s])
        torch.manual_seed(seed + s)
        mlp.requires_grad_(True)
        opt = torch.optim.Adam(mlp.parameters(), lr=lr)
        for step in tqdm(range(steps), desc=f"compensation ({name} stream)", disable=not progress, file=sys.stderr):
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, steps, lr)
            idx = torch.randint(0, x.shape[0], (batch_tokens,), generator=generator).to(device)
            loss = torch.nn.functional.mse_loss(mlp(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        mlp.requires_grad_(False)
        with torch.no_grad():
            errors[name] = (torch.nn.functional.mse_loss(x, y).item(), torch.nn.functional.mse_loss(mlp(x), y).item())
    return errors


@torch.no_grad()
def skip_error(model: DistilledSD3, plan: SamplingPlan, noise, text, pooled, chunk: int = 64) -> float:
    """Relative L2 error of the skipping program's final latents against the same model run in full (every block at
    every step): what the compensation is for."""
    num = den = 0.0
    for i in range(0, noise.shape[0], chunk):
        args = (noise[i:i + chunk], text[i:i + chunk], pooled[i:i + chunk])
        skipped = run_program(model, plan, *args)[-1]
        full = run_program(model, plan, *args, skip=False)[-1]
        num += (skipped - full).pow(2).sum().item()
        den += full.pow(2).sum().item()
    return math.sqrt(num / den)
