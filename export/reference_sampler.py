"""The PyTorch ground truth for the engine's sampling program (REFERENCE.md's 1.x semantics).

    x = noise
    for each step:  v = model(x, t) with the plan's blocks; x = x + (sigma_next - sigma) * v
Step 0 of a 1.x plan records Δ = h_after_range - h_before_range for both streams; later steps skip
the range and add MLP(Δ) (or Δ itself with identity compensation). With guidance > 1 the batch is
[negative; positive] and v = v_neg + g * (v_pos - v_neg). With a step-cache policy (xslim.py) a
step may reuse the whole stack as h_out = h_in + R.
"""

from __future__ import annotations

import dataclasses

import torch

from .sampling_plan import SamplingPlan
from .sd3_model import DistilledSD3
from .xslim import StepCachePolicy, StepCacheState

_DEFAULT = object()


@dataclasses.dataclass
class ReferenceResult:
    latents: torch.Tensor
    effective_nfe: float
    blocks_run: list[int]  # per step
    skipped_steps: list[int]  # steps that reused the whole stack


@torch.no_grad()
def reference_generate(
    model: DistilledSD3,
    plan: SamplingPlan,
    prompt_embeds: torch.Tensor,
    pooled_embeds: torch.Tensor,
    latents: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_embeds: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    step_cache: StepCachePolicy | None = _DEFAULT,
) -> ReferenceResult:
    """`step_cache` defaults to the plan's policy; None turns step reuse off."""
    guidance = plan.guidance_scale if guidance_scale is None else guidance_scale
    policy = plan.step_cache if step_cache is _DEFAULT else step_cache
    cache = StepCacheState(policy, plan.steps) if policy else None
    skipped = []
    cfg = guidance > 1.0
    if cfg:
        if negative_prompt_embeds is None or negative_pooled_embeds is None:
            raise ValueError("guidance > 1 needs negative prompt and pooled embeddings")
        text = torch.cat([negative_prompt_embeds, prompt_embeds])
        pooled = torch.cat([negative_pooled_embeds, pooled_embeds])
    else:
        text, pooled = prompt_embeds, pooled_embeds
    x = latents.clone().float()
    delta = None
    compensated = None
    blocks_run = []
    for step in range(plan.steps):
        sigma, sigma_next = plan.sigmas[step], plan.sigmas[step + 1]
        x_in = torch.cat([x, x]) if cfg else x
        t = torch.full((x_in.shape[0],), plan.timesteps[step], dtype=torch.float32)
        img, txt, temb = model.embed(x_in, t, pooled, text)
        stack_in = img
        ran = 0
        reuse = cache is not None and not plan.records_delta(step) and cache.should_skip(step)
        if reuse:  # X-Slim step level: the whole stack as its last residual
            img = img + cache.residual
            cache.skipped()
            skipped.append(step)
        for i in range(0 if reuse else model.num_layers):
            if plan.skips_block(step, i):
                if i == plan.cache_blocks[1]:  # end of the skipped range: add the compensated delta
                    if compensated is None:
                        compensated = model.compensate(*delta) if plan.compensation == "mlp" else delta
                    img, txt = img + compensated[0], txt + compensated[1]
                continue
            if plan.records_delta(step) and i == plan.cache_blocks[0]:
                before = (img, txt)
            img, txt = model.block(i, img, txt, temb)
            ran += 1
            if plan.records_delta(step) and i == plan.cache_blocks[1]:
                delta = (img - before[0], txt - before[1])
        if cache is not None and not reuse:
            cache.computed(step, img - stack_in)
        v = model.final(img, temb, x_in)
        if cfg:
            v_neg, v_pos = v.chunk(2)
            v = v_neg + guidance * (v_pos - v_neg)
        x = x + (sigma_next - sigma) * v
        blocks_run.append(ran)
    nfe = sum(blocks_run) / model.num_layers * (2 if cfg else 1)
    return ReferenceResult(latents=x, effective_nfe=nfe, blocks_run=blocks_run, skipped_steps=skipped)
