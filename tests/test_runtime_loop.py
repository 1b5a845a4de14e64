"""The runtime's generation loop (docs/runtime-loop.md): the planner's per-block actions equal the
PyTorch reference planner's for the 1.x program and X-Slim's block and token levels, the session's
buffers are the only place stage outputs go (nothing but the request and the result crosses between
caller memory and them), and kept inputs survive in-place additions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import slimengine as se
from slimengine.export.reference_sampler import ACTIONS, reference_generate
from slimengine.export.xslim import XSlimPolicy
from slimengine.noise import gaussian_noise, seeded_latents
from slimengine.runtime import BLOCK_ACTIONS

from .conftest import export, random_inputs, reference_for, relative_error


def block_actions(result, layers: int) -> list[list[str]]:
    """Per step, the action of each joint block, from the generation's block events (in block order)."""
    events = [e for e in result.events if e["kind"] == "block"]
    steps = sorted({e["step"] for e in events})
    actions = [[e["action"] for e in events if e["step"] == s] for s in steps]
    for s in steps:
        assert [e["block"] for e in events if e["step"] == s] == list(range(layers))
    return actions


def check_against_reference(session, model, plan, inputs: dict, ref_inputs: tuple, xslim=None):
    """Runs both with block events on: the same actions step by step, the same latents (within float32)."""
    session.profiling = "blocks"
    got = session.generate(**inputs, **({"xslim": xslim} if xslim is not None else {}))
    ref = reference_generate(model, plan, *ref_inputs, **({"xslim": xslim} if xslim is not None else {}))
    actions = block_actions(got, model.num_layers)
    print("actions per step:", [" ".join(a) for a in actions])
    assert actions == ref.actions
    # Each action's event names the stage it called.
    for e in (e for e in got.events if e["kind"] == "block"):
        expected = {"run": f"block_{e['block']}", "run_keep_kv": f"block_{e['block']}", "run_tokens": f"block_{e['block']}_tokens",
                    "add_delta": "compensate" if plan.compensation == "mlp" else None}.get(e["action"])
        assert e["stage"] == expected, e
    assert relative_error(got.latents, ref.latents) <= 1e-4
    # Block events are observation only: the same latents without them.
    session.profiling = False
    again = session.generate(**inputs, **({"xslim": xslim} if xslim is not None else {}))
    assert np.array_equal(again.latents, got.latents) and not again.events
    return got, ref


def test_action_names_are_the_c_enum_and_block_events_are_asked_for_by_name(cfg_bundle):
    assert ACTIONS == BLOCK_ACTIONS == ("run", "run_keep_kv", "run_tokens", "reuse", "skip", "add_delta")
    session = se.open_engine(cfg_bundle).session()
    with pytest.raises(ValueError, match='True, False or "blocks"'):
        session.profiling = "stages"
    session.profiling = "blocks"
    assert session.profiling == "blocks"


def test_the_1x_plan_runs_the_reference_planners_actions(distilled_checkpoint, distilled_bundle):
    model, plan = reference_for(distilled_checkpoint)
    text, pooled = random_inputs(model, 1, 7, seed=1)
    noise = seeded_latents((1, model.config.in_channels, 16, 16), 3)
    got, ref = check_against_reference(se.open_engine(distilled_bundle).session(), model, plan,
                                       dict(prompt_embeds=text, pooled_embeds=pooled, latents=noise),
                                       tuple(torch.from_numpy(a) for a in (text, pooled, noise)))
    first, last = plan.skip_blocks
    assert ref.actions[0] == ["run"] * model.num_layers
    assert ref.actions[1] == ["skip" if first <= b < last else "add_delta" if b == last else "run" for b in range(model.num_layers)]


def test_every_action_of_a_1x_bundle_under_an_xslim_schedule(distilled_xslim_bundle, distilled_checkpoint):
    """Full, token, skip and block steps on a 1.x student with a dual-attention block: all six actions."""
    bundle, spec = distilled_xslim_bundle
    model, plan = reference_for(distilled_checkpoint, {"steps": 6, "guidance_scale": 3.0, "xslim": spec})
    text, pooled = random_inputs(model, 2, 7, seed=3)
    negative, negative_pooled = random_inputs(model, 2, 7, seed=4)
    noise = np.random.default_rng(5).standard_normal((2, model.config.in_channels, 16, 12), dtype=np.float32)
    _, ref = check_against_reference(
        se.open_engine(bundle).session(), model, plan,
        dict(prompt_embeds=text, pooled_embeds=pooled, latents=noise, negative_prompt_embeds=negative, negative_pooled_embeds=negative_pooled),
        tuple(torch.from_numpy(a) for a in (text, pooled, noise, negative, negative_pooled)))
    assert {a for step in ref.actions for a in step} == set(ACTIONS)
    assert ref.actions[3] == ["skip"] * model.num_layers  # the skip level reuses the whole stack
    dual = set(model.config.dual_attention_layers)
    assert dual and all(a == "run" for b, a in enumerate(ref.actions[2]) if b in dual and not plan.skips_block(2, b))  # run whole


@pytest.mark.parametrize("policy", [XSlimPolicy(early_warning=0.05, critical=0.4, refresh="block", block_threshold=0.5, first_blocks=1),
                                    XSlimPolicy(early_warning=0.05, critical=0.4, refresh="token", sample_ratio=0.25)],
                         ids=["block-level", "token-level"])
def test_online_xslim_levels_run_the_reference_planners_actions(toy_bundles, policy):
    from slimengine.export.checkpoint import load_checkpoint
    from slimengine.export.sampling_plan import make_plan
    from slimengine.tools import toy_shapes

    from .conftest import TOY_PIPELINE, TOY_TEACHER

    ck = load_checkpoint(TOY_TEACHER)
    model = ck.build_model()
    plan = make_plan(ck.config.num_layers, False, ck.metadata, skip_blocks="none", steps=28, guidance_scale=4.0)
    text, pooled = toy_shapes.prompt_embeds(TOY_PIPELINE, toy_shapes.class_prompts())
    text, pooled = text[:2], pooled[:2]
    noise = gaussian_noise((2, model.config.in_channels, 16, 16), 0)  # an input: one Philox stream
    zeros = dict(negative_prompt_embeds=np.zeros_like(text), negative_pooled_embeds=np.zeros_like(pooled))
    _, ref = check_against_reference(se.open_engine(toy_bundles["28-step CFG"]).session(), model, plan,
                                     dict(prompt_embeds=text, pooled_embeds=pooled, latents=noise, **zeros),
                                     (*(torch.from_numpy(a) for a in (text, pooled, noise)), torch.zeros(text.shape), torch.zeros(pooled.shape)),
                                     xslim=policy)
    level = {"block": "reuse", "token": "run_tokens"}[policy.refresh]
    assert any(level in step for step in ref.actions) and any(step == ["skip"] * model.num_layers for step in ref.actions)


@pytest.mark.parametrize("cfg, given_latents", [(False, True), (True, False), (True, True)])
def test_only_the_request_and_the_result_cross_between_caller_memory_and_the_session(cfg_bundle, cfg, given_latents):
    """Stage outputs are written in place into the session's buffers (IO binding) and the work between
    stages runs on them: the bytes moved from and to caller memory are exactly the request's tensors
    (in the model batch under CFG: negative and positive embeddings; the latents once, copied to the second half on the
    device) and the result."""
    engine = se.open_engine(cfg_bundle)
    c = engine.config
    B, L, H, W = 2, 5, 16, 8
    text, pooled = (np.random.default_rng(1).standard_normal(s, dtype=np.float32)
                    for s in [(B, L, c["joint_attention_dim"]), (B, c["pooled_projection_dim"])])
    latents = seeded_latents((B, c["in_channels"], H, W), 4)
    kwargs = dict(negative_prompt_embeds=np.zeros_like(text), negative_pooled_embeds=np.zeros_like(pooled),
                  guidance_scale=4.5 if cfg else 1.0, height=H, width=W, seed=4)
    if given_latents:
        kwargs["latents"] = latents
    result = engine.session().generate(text, pooled, **kwargs)
    copies = 2 if cfg else 1
    # Without CFG the embeddings are already the model batch: on the CPU they are bound in place, not copied.
    embeddings = copies * (text.nbytes + pooled.nbytes) if cfg else 0
    expected = embeddings + (latents.nbytes if given_latents else 0) + latents.nbytes  # + the result
    assert result.stats["transfer_bytes"] == expected
    if not given_latents:  # seeded noise is drawn in the session's buffer, bit for bit the Python noise
        assert np.array_equal(result.latents, engine.session().generate(text, pooled, **kwargs, latents=latents).latents)


def test_a_skipped_range_from_block_0_keeps_the_xslim_stack_input(workdir, plain_checkpoint, tmp_path):
    """Range 0-1 under X-Slim full steps: the embed output is both the stack input X-Slim keeps and the
    range's input, and in later steps the range's delta is added right onto the stack input. The kept
    input must not change (the next step reuses the stack residual): the runtime equals the reference."""
    schedule = tmp_path / "schedule.json"
    schedule.write_text(json.dumps({"steps": [{"level": "full"}, {"level": "full"}, {"level": "skip"}, {"level": "full"}]}))
    spec = f"xslim:schedule={schedule}"
    bundle = export(plain_checkpoint, workdir / "range0-xslim.engine", "--skip-blocks", "0-1", "--steps", "4", "--xslim", spec)
    model, plan = reference_for(plain_checkpoint, {"skip_blocks": "0-1", "steps": 4, "xslim": spec})
    assert plan.skip_blocks == (0, 1)
    text, pooled = random_inputs(model, 1, 6, seed=7)
    noise = seeded_latents((1, model.config.in_channels, 16, 16), 8)
    got, ref = check_against_reference(se.open_engine(bundle).session(), model, plan,
                                       dict(prompt_embeds=text, pooled_embeds=pooled, latents=noise),
                                       tuple(torch.from_numpy(a) for a in (text, pooled, noise)))
    assert ref.levels == ["full", "full", "skip", "full"] and ref.actions[1][:2] == ["skip", "add_delta"]
