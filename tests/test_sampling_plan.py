"""Sampling plans and the PyTorch reference sampler, checked against docs/distill.md and diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from slimengine.export.checkpoint import load_checkpoint
from slimengine.export.reference_sampler import reference_generate
from slimengine.export.sampling_plan import SamplingPlan, make_plan, parse_block_range, teacher_grid

from .conftest import make_checkpoint


def test_distilled_sigmas_are_shifted_and_snapped_to_the_teacher_grid():
    plan = make_plan(24, True)
    assert plan.steps == 2 and plan.skip_blocks == (2, 7) and plan.guidance_scale == 1.0
    assert plan.sigmas == pytest.approx((1.0, 0.75, 0.0))  # shift 3 of (1, 0.5, 0) is exactly on the grid
    grid = teacher_grid(3.0)
    five = make_plan(24, True, steps=5)
    for s in five.sigmas:
        assert np.isclose(grid, s, rtol=0, atol=1e-12).any(), s
    raw = 3 * np.linspace(1, 0, 6) / (1 + 2 * np.linspace(1, 0, 6))
    assert np.abs(np.array(five.sigmas) - raw).max() <= np.diff(grid).max() / 2 + 1e-12
    assert five.timesteps == pytest.approx([s * 1000 for s in five.sigmas[:-1]])


@pytest.mark.parametrize("skip_blocks,nfe", [("2-7", 1.75), ("2-9", 1 + 16 / 24)])
def test_effective_nfe_matches_the_paper_accounting(skip_blocks, nfe):
    # 6 skipped of 24 -> 1.75; 8 skipped of 24 -> 1.67 (docs/distill.md, effective NFE)
    assert make_plan(24, True, skip_blocks=skip_blocks).effective_nfe(24) == pytest.approx(nfe)
    assert make_plan(24, False, steps=28).effective_nfe(24) == 56  # 28 steps x 2 (CFG)


def test_plans_with_impossible_ranges_are_rejected():
    with pytest.raises(ValueError, match="must lie within"):
        make_plan(4, True, skip_blocks="1-3")  # the last block ends the text stream
    with pytest.raises(ValueError, match="form A-B"):
        parse_block_range("7-2")
    with pytest.raises(ValueError, match="form A-B"):
        parse_block_range("two-seven")
    with pytest.raises(ValueError, match="no skipped block range"):
        make_plan(4, True)  # a shallow distilled model without metadata
    with pytest.raises(ValueError, match="delta_pred"):
        SamplingPlan((1.0, 0.0), 1.0, (1, 1), "mlp").validate(4, has_compensation_mlp=False)


def test_plain_reference_sampler_equals_a_diffusers_scheduler_loop(tmp_path):
    """Euler steps and CFG against diffusers' own FlowMatchEulerDiscreteScheduler.step."""
    model = load_checkpoint(make_checkpoint(tmp_path / "m.pt", "--preset", "tiny", "--plain")).build_model()
    plan = make_plan(model.num_layers, False, steps=4, guidance_scale=5.0)
    g = torch.Generator().manual_seed(0)
    c = model.config
    x0 = torch.randn(1, c.in_channels, 12, 16, generator=g)
    text, neg_text = torch.randn(2, 1, 6, c.joint_attention_dim, generator=g)
    pooled, neg_pooled = torch.randn(2, 1, c.pooled_projection_dim, generator=g)

    ours = reference_generate(model, plan, text, pooled, x0, neg_text, neg_pooled)

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    x = x0.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = model.transformer(torch.cat([x, x]), torch.cat([neg_text, text]), torch.cat([neg_pooled, pooled]), t.expand(2)).sample
            v_neg, v_pos = v.chunk(2)
            x = scheduler.step(v_neg + 5.0 * (v_pos - v_neg), t, x).prev_sample
    err = (ours.latents - x).abs().max().item() / x.abs().max().item()
    assert err < 1e-5, f"relative error {err}"
    assert ours.effective_nfe == 8.0 and ours.blocks_run == [4] * 4


def test_1x_reference_skips_the_range_and_adds_the_compensated_delta(tmp_path):
    """Step 2 of the 1.x plan equals running the full model with the skipped blocks replaced by MLP(Δ) from step 1."""
    ck = load_checkpoint(make_checkpoint(tmp_path / "d.pt", "--preset", "tiny", "--skip-blocks", "1-2"))
    model = ck.build_model()
    plan = make_plan(model.num_layers, True, ck.metadata)
    g = torch.Generator().manual_seed(1)
    c = model.config
    x = torch.randn(1, c.in_channels, 8, 8, generator=g)
    text = torch.randn(1, 4, c.joint_attention_dim, generator=g)
    pooled = torch.randn(1, c.pooled_projection_dim, generator=g)
    result = reference_generate(model, plan, text, pooled, x)
    assert result.blocks_run == [4, 2] and result.effective_nfe == 1.5

    blocks = model.transformer.transformer_blocks
    with torch.no_grad():
        def step_velocity(latents, sigma, delta):
            t = torch.tensor([sigma * 1000.0])
            h, ctx, temb = model.embed(latents, t, pooled, text)
            ctx, h = blocks[0](h, ctx, temb)
            if delta is None:
                h0, c0 = h, ctx
                for i in (1, 2):
                    ctx, h = blocks[i](h, ctx, temb)
                delta = (h - h0, ctx - c0)
            else:
                h = h + model.delta_pred_hidden(delta[0])
                ctx = ctx + model.delta_pred_encoder(delta[1])
            _, h = blocks[3](h, ctx, temb)
            return model.final(h, temb, latents), delta

        s0, s1, s2 = plan.sigmas
        v, delta = step_velocity(x, s0, None)
        x1 = x + (s1 - s0) * v
        v, _ = step_velocity(x1, s1, delta)
        expected = x1 + (s2 - s1) * v
    assert torch.allclose(result.latents, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_skip_blocks_none_gives_a_plain_plan_for_a_student():
    plan = make_plan(6, True, {"sampling": {"steps": 2, "skip_blocks": "1-3"}}, skip_blocks="none", steps=28, guidance_scale=4.0)
    assert plan.skip_blocks is None and plan.compensation is None and plan.steps == 28
    assert plan.effective_nfe(6) == 56 and plan.sigmas == make_plan(6, False, steps=28).sigmas
