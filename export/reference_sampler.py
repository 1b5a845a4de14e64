"""The PyTorch ground truth for the engine's sampling program (REFERENCE.md's 1.x semantics, X-Slim).

    x = noise
    for each step:  v = model(x, t) with the plan's blocks; x = x + (sigma_next - sigma) * v
Step 0 of a 1.x plan records Δ = h_after_range - h_before_range for both streams; later steps skip
the range and add MLP(Δ) (or Δ itself with identity compensation). With guidance > 1 the batch is
[negative; positive] and v = v_neg + g * (v_pos - v_neg). With an X-Slim policy (xslim.py) each
step runs at the level the controller picks: full, skip, block or token.
"""

from __future__ import annotations

import dataclasses

import torch

from .sampling_plan import SamplingPlan
from .sd3_model import DistilledSD3
from .xslim import Controller, XSlimPolicy, skippable_blocks, tokens_for_ratio

_DEFAULT = object()


@dataclasses.dataclass
class ReferenceResult:
    latents: torch.Tensor
    effective_nfe: float  # block evaluations / num_layers, token blocks weighted by their FLOP share
    blocks_run: list[int]  # per step: blocks evaluated, on all or on a subset of tokens
    levels: list[str]  # per step: full | skip | block | token
    tokens_computed: list[int]  # per step: image tokens recomputed per block (N unless a token step)
    blocks_skipped: list[list[int]] = dataclasses.field(default_factory=list)  # per step: X-Slim block-level skips

    @property
    def skipped_steps(self) -> list[int]:
        return [i for i, level in enumerate(self.levels) if level == "skip"]


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum |a - b| / sum |b| in double precision; inf for b == 0 (the runtime: kernels/cpu l1_change)."""
    mag = b.double().abs().sum()
    return float((a.double() - b.double()).abs().sum() / mag) if mag > 0 else float("inf")


def select_tokens(r_last: torch.Tensor, r_prev: torch.Tensor, ratio: float) -> torch.Tensor:
    """[B, n] ascending indices of the round(ratio * N) tokens with the highest change score per row;
    ties go to the lower index (kernels/cpu/token_ops.cpp)."""
    score = (r_last - r_prev).abs().double().mean(-1).float()
    keep = tokens_for_ratio(ratio, score.shape[1])
    order = torch.sort(-score, dim=1, stable=True).indices[:, :keep]
    return torch.sort(order, dim=1).values


def block_flops(tokens: int, computed: int, text: int, dim: int) -> float:
    """Multiply-adds of one joint block recomputing `computed` of `tokens` image tokens: projections and
    MLP per token (12 dim^2) and attention of the queries against every key (2 dim per pair)."""
    rows = computed + text
    return rows * 12.0 * dim * dim + 2.0 * rows * (tokens + text) * dim


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
    cache: XSlimPolicy | None = _DEFAULT,
) -> ReferenceResult:
    """`cache` defaults to the plan's X-Slim policy; None computes every step fully."""
    guidance = plan.guidance_scale if guidance_scale is None else guidance_scale
    policy = plan.cache if cache is _DEFAULT else cache
    if policy is not None:
        policy.validate(plan.steps)
    controller = Controller(policy, plan.steps) if policy else None
    uses = policy.uses if policy else set()
    cfg = guidance > 1.0
    if cfg:
        if negative_prompt_embeds is None or negative_pooled_embeds is None:
            raise ValueError("guidance > 1 needs negative prompt and pooled embeddings")
        text = torch.cat([negative_prompt_embeds, prompt_embeds])
        pooled = torch.cat([negative_pooled_embeds, pooled_embeds])
    else:
        text, pooled = prompt_embeds, pooled_embeds
    x = latents.clone().float()
    delta = compensated = None
    residuals = []  # stack residuals R of the last two full steps
    block_res, block_scores, kv = {}, {}, {}  # per block, recorded at full steps
    token_stages = {}
    levels, blocks_run, tokens_computed, skipped_blocks = [], [], [], []
    flops = 0.0
    c = model.config
    for step in range(plan.steps):
        sigma, sigma_next = plan.sigmas[step], plan.sigmas[step + 1]
        x_in = torch.cat([x, x]) if cfg else x
        t = torch.full((x_in.shape[0],), plan.timesteps[step], dtype=torch.float32)
        img, txt, temb = model.embed(x_in, t, pooled, text)
        N, L = img.shape[1], txt.shape[1]
        level = controller.level(step, plan.records_delta(step)) if controller else "full"
        stack_in, ran, computed, skip_set, reused_blocks = img, 0, N, set(), []
        if level == "skip":  # the whole stack as its last residual
            img = img + residuals[-1]
        if level == "token":
            idx = select_tokens(residuals[-1], residuals[-2], controller.ratio(step))
            computed = idx.shape[1]
        if level == "block":
            skip_set = skippable_blocks(block_scores, controller.block_threshold(step), policy.first_blocks)
        for i in range(0 if level == "skip" else model.num_layers):
            if plan.skips_block(step, i):
                if i == plan.cache_blocks[1]:  # end of the skipped range: add the compensated delta
                    if compensated is None:
                        compensated = model.compensate(*delta) if plan.compensation == "mlp" else delta
                    img, txt = img + compensated[0], txt + compensated[1]
                continue
            if plan.records_delta(step) and i == plan.cache_blocks[0]:
                before = (img, txt)
            block_in = (img, txt)
            if i in skip_set:  # block level: the block's residual from the last full step
                reused_blocks.append(i)
                img = img + block_res[i][0]
                txt = txt + block_res[i][1] if block_res[i][1] is not None else None
            elif level == "token" and i in kv:
                if i not in token_stages:
                    from .token_block import TokenBlockStage

                    token_stages[i] = TokenBlockStage(model.transformer.transformer_blocks[i], torch.float32)
                out = token_stages[i](img, txt, temb, idx, kv[i][0], kv[i][1], block_res[i][0])
                img, txt = out if len(out) == 2 else (out[0], None)
                flops += block_flops(N, computed, L, c.inner_dim)
                ran += 1
            else:
                if level == "full" and "token" in uses and i not in c.dual_attention_layers:
                    from .token_block import KVBlockStage

                    out = KVBlockStage(model.transformer.transformer_blocks[i], torch.float32)(img, txt, temb)
                    img, txt, kv[i] = (out[0], out[1], out[2:]) if len(out) == 4 else (out[0], None, out[1:])
                else:
                    img, txt = model.block(i, img, txt, temb)
                flops += block_flops(N, N, L, c.inner_dim)
                ran += 1
                if level == "full" and uses & {"block", "token"}:
                    block_res[i] = (img - block_in[0], txt - block_in[1] if txt is not None else None)
                    block_scores[i] = relative_change(img, block_in[0])
            if plan.records_delta(step) and i == plan.cache_blocks[1]:
                delta = (img - before[0], txt - before[1])
                compensated = None
        if level == "full" and controller:
            residuals = (residuals + [img - stack_in])[-2:]
            controller.full_step_done(step, relative_change(residuals[-1], residuals[-2]) if len(residuals) == 2 else None)
        v = model.final(img, temb, x_in)
        if cfg:
            v_neg, v_pos = v.chunk(2)
            v = v_neg + guidance * (v_pos - v_neg)
        x = x + (sigma_next - sigma) * v
        levels.append(level)
        blocks_run.append(ran)
        tokens_computed.append(computed)
        skipped_blocks.append(reused_blocks)
    full_block = block_flops(N, N, L, c.inner_dim)
    nfe = flops / full_block / model.num_layers * (2 if cfg else 1)
    return ReferenceResult(latents=x, effective_nfe=nfe, blocks_run=blocks_run, levels=levels, tokens_computed=tokens_computed,
                           blocks_skipped=skipped_blocks)
