"""The PyTorch ground truth for the engine's sampling program (1.x-Distill: docs/distill.md; X-Slim: docs/xslim.md).

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
    actions: list[list[str]] = dataclasses.field(default_factory=list)  # per step: the planner's action per block (ACTIONS)

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


ACTIONS = ("run", "run_keep_kv", "run_tokens", "reuse", "skip", "add_delta")  # the runtime's slim_block_action


@dataclasses.dataclass
class StepActions:
    """One step's plan: the controller's level turned into one action per joint block (runtime/src/step_planner.hpp)."""

    level: str  # full | skip | block | token
    keep: int  # image tokens each block computes (all of them unless a token step)
    reuse_stack: bool  # skip level: the last stack residual added to the stack's input, no block run
    record_stack: bool  # X-Slim full step: the stack residual recorded (record_for_reuse)
    record_blocks: bool  # ... and each run block's residual and change score (block and token levels)
    range_first: int | None  # 1.x recording step: the input of this block is kept, and after
    range_last: int | None  # ... this block delta = its output - that input
    blocks: list[str]  # one of ACTIONS per joint block


@dataclasses.dataclass
class Caches:
    """What steps keep for later steps, by owner (the runtime's sd3_buffers.hpp)."""

    delta: tuple | None = None  # 1.x: delta over the skipped range (image, text)
    compensated: tuple | None = None  # ... and its compensation, once per recorded delta
    residuals: list = dataclasses.field(default_factory=list)  # X-Slim: stack residuals of the last two full steps
    block_res: dict = dataclasses.field(default_factory=dict)  # per block: (image, text) residual at the last full step
    block_scores: dict = dataclasses.field(default_factory=dict)  # per block: relative change at the last full step
    kv: dict = dataclasses.field(default_factory=dict)  # per block: image keys/values at the last full step
    token_stages: dict = dataclasses.field(default_factory=dict)  # token-stage modules, made on first use


def plan_step(plan: SamplingPlan, step: int, level: str, num_layers: int, token_blocks: set[int], tokens: int,
              controller: Controller | None, caches: Caches) -> StepActions:
    """The planner: the step's 1.x plan and the controller's `level` as one action per block. `token_blocks`:
    the blocks with a token stage (every block but SD3.5's dual-attention ones)."""
    policy = controller.policy if controller else None
    uses = policy.uses if policy else set()
    record_stack = level == "full" and controller is not None
    reuse = skippable_blocks(caches.block_scores, controller.block_threshold(step), policy.first_blocks) if level == "block" else set()
    blocks = []
    for i in range(num_layers):
        if level == "skip":
            action = "skip"
        elif plan.skips_block(step, i):
            action = "add_delta" if i == plan.skip_blocks[1] else "skip"
        elif i in reuse:
            action = "reuse"
        elif level == "token" and i in token_blocks:
            action = "run_tokens"
        elif record_stack and "token" in uses and i in token_blocks:
            action = "run_keep_kv"
        else:
            action = "run"
        blocks.append(action)
    first, last = plan.skip_blocks if plan.records_delta(step) else (None, None)
    return StepActions(level=level, keep=tokens_for_ratio(controller.ratio(step), tokens) if level == "token" else tokens,
                       reuse_stack=level == "skip", record_stack=record_stack,
                       record_blocks=record_stack and bool(uses & {"block", "token"}), range_first=first, range_last=last,
                       blocks=blocks)


def execute(model: DistilledSD3, plan: SamplingPlan, actions: StepActions, x_in, t, pooled, text, caches: Caches, ratio: float):
    """Runs one step's actions: embed, one action per block, final. Returns (stack input, stack output, velocity)."""
    img, txt, temb = model.embed(x_in, t, pooled, text)
    stack_in = img
    if actions.reuse_stack:  # the whole stack as its last residual
        img = img + caches.residuals[-1]
    if actions.level == "token":
        idx = select_tokens(caches.residuals[-1], caches.residuals[-2], ratio)
    for i, action in enumerate(actions.blocks):
        if i == actions.range_first:
            before = (img, txt)
        block_in = (img, txt)
        if action == "add_delta":  # end of the skipped range: add the compensated delta
            if caches.compensated is None:
                caches.compensated = model.compensate(*caches.delta) if plan.compensation == "mlp" else caches.delta
            img, txt = img + caches.compensated[0], txt + caches.compensated[1]
        elif action == "reuse":  # block level: the block's residual from the last full step
            img = img + caches.block_res[i][0]
            txt = txt + caches.block_res[i][1] if caches.block_res[i][1] is not None else None
        elif action == "run_tokens":
            if i not in caches.token_stages:
                from .token_block import TokenBlockStage

                caches.token_stages[i] = TokenBlockStage(model.transformer.transformer_blocks[i], torch.float32)
            out = caches.token_stages[i](img, txt, temb, idx, caches.kv[i][0], caches.kv[i][1], caches.block_res[i][0])
            img, txt = out if len(out) == 2 else (out[0], None)
        elif action == "run_keep_kv":
            from .token_block import KVBlockStage

            out = KVBlockStage(model.transformer.transformer_blocks[i], torch.float32)(img, txt, temb)
            img, txt, caches.kv[i] = (out[0], out[1], out[2:]) if len(out) == 4 else (out[0], None, out[1:])
        elif action == "run":
            img, txt = model.block(i, img, txt, temb)
        if actions.record_blocks and action in ("run", "run_keep_kv"):
            caches.block_res[i] = (img - block_in[0], txt - block_in[1] if txt is not None else None)
            caches.block_scores[i] = relative_change(img, block_in[0])
        if i == actions.range_last:
            caches.delta = (img - before[0], txt - before[1])
            caches.compensated = None
    return stack_in, img, model.final(img, temb, x_in)


def record_for_reuse(actions: StepActions, step: int, stack_in, stack_out, caches: Caches, controller: Controller | None) -> None:
    """X-Slim after a full step: the stack residual and the controller's change rate."""
    if actions.record_stack:
        caches.residuals = (caches.residuals + [stack_out - stack_in])[-2:]
        r = caches.residuals
        controller.full_step_done(step, relative_change(r[-1], r[-2]) if len(r) == 2 else None)


def euler_cfg(x, v, sigma: float, sigma_next: float, guidance: float, cfg: bool):
    """The Euler step with classifier-free guidance v = v_neg + g (v_pos - v_neg)."""
    if cfg:
        v_neg, v_pos = v.chunk(2)
        v = v_neg + guidance * (v_pos - v_neg)
    return x + (sigma_next - sigma) * v


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
    xslim: XSlimPolicy | None = _DEFAULT,
) -> ReferenceResult:
    """`xslim` defaults to the plan's X-Slim policy; None computes every step fully. The loop reads as the
    runtime's (runtime/src/sd3_program.cpp, Sd3Session::generate): plan, execute, update caches, Euler/CFG."""
    guidance = plan.guidance_scale if guidance_scale is None else guidance_scale
    policy = plan.xslim if xslim is _DEFAULT else xslim
    if policy is not None:
        policy.validate(plan.steps)
    controller = Controller(policy, plan.steps) if policy else None
    cfg = guidance > 1.0
    if cfg:
        if negative_prompt_embeds is None or negative_pooled_embeds is None:
            raise ValueError("guidance > 1 needs negative prompt and pooled embeddings")
        text = torch.cat([negative_prompt_embeds, prompt_embeds])
        pooled = torch.cat([negative_pooled_embeds, pooled_embeds])
    else:
        text, pooled = prompt_embeds, pooled_embeds
    x = latents.clone().float()
    c = model.config
    N = (x.shape[2] // c.patch_size) * (x.shape[3] // c.patch_size)
    L = text.shape[1]
    token_blocks = set(range(model.num_layers)) - set(c.dual_attention_layers)
    caches = Caches()
    result = ReferenceResult(latents=x, effective_nfe=0.0, blocks_run=[], levels=[], tokens_computed=[])
    flops = 0.0
    for step in range(plan.steps):
        sigma, sigma_next = plan.sigmas[step], plan.sigmas[step + 1]
        x_in = torch.cat([x, x]) if cfg else x
        t = torch.full((x_in.shape[0],), plan.timesteps[step], dtype=torch.float32)
        level = controller.level(step, plan.records_delta(step)) if controller else "full"
        actions = plan_step(plan, step, level, model.num_layers, token_blocks, N, controller, caches)
        ratio = controller.ratio(step) if level == "token" else 1.0
        stack_in, stack_out, v = execute(model, plan, actions, x_in, t, pooled, text, caches, ratio)
        record_for_reuse(actions, step, stack_in, stack_out, caches, controller)
        x = euler_cfg(x, v, sigma, sigma_next, guidance, cfg)
        for action in actions.blocks:  # summed block by block, as the runtime does
            if action.startswith("run"):
                flops += block_flops(N, actions.keep if action == "run_tokens" else N, L, c.inner_dim)
        result.levels.append(level)
        result.blocks_run.append(sum(a.startswith("run") for a in actions.blocks))
        result.tokens_computed.append(actions.keep)
        result.blocks_skipped.append([i for i, a in enumerate(actions.blocks) if a == "reuse"])
        result.actions.append(actions.blocks)
    full_block = block_flops(N, N, L, c.inner_dim)
    result.latents = x
    result.effective_nfe = flops / full_block / model.num_layers * (2 if cfg else 1)
    return result
