"""X-Slim in the runtime: step, block and token levels, the dual-threshold controller and offline
schedules take exactly the PyTorch reference's decisions on the trained toy model's trajectories."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import slimengine as se
from slimengine.export.checkpoint import load_checkpoint
from slimengine.export.reference_sampler import reference_generate
from slimengine.export.sampling_plan import make_plan
from slimengine.export.xslim import XSlimPolicy, load_schedule, parse_xslim_spec
from slimengine.noise import seeded_latents
from slimengine.tools import calibrate_xslim, toy_shapes

from .conftest import TOY_CHECKPOINT, TOY_PIPELINE, TOY_TEACHER, CApiCall, edit_manifest, relative_error, run_cli

LEVEL_NAMES = {"full": "full", "skip": "reused", "block": "block_refresh", "token": "token_refresh"}


def psnr(a, b) -> float:
    return float(10 * np.log10(4.0 / np.mean((np.asarray(a) - np.asarray(b)) ** 2)))  # latents span [-1, 1]


@pytest.fixture(scope="module")
def toy_case(toy_bundles):
    ck = load_checkpoint(TOY_TEACHER)
    plan = make_plan(ck.config.num_layers, False, ck.metadata, skip_blocks="none", steps=28, guidance_scale=4.0)
    text, pooled = toy_shapes.prompt_embeds(TOY_PIPELINE, toy_shapes.class_prompts())
    session = se.open_engine(toy_bundles["28-step CFG"]).session()
    kwargs = dict(negative_prompt_embeds=np.zeros_like(text), negative_pooled_embeds=np.zeros_like(pooled), seed=0, height=16, width=16)
    full = session.generate(text, pooled, xslim="none", **kwargs)
    return ck.build_model(), plan, text, pooled, session, kwargs, full


def run_both(toy_case, policy: XSlimPolicy):
    """The runtime and the reference under one policy; asserts they agree step by step."""
    model, plan, text, pooled, session, kwargs, full = toy_case
    got = session.generate(text, pooled, xslim=policy, **kwargs)
    ref = reference_generate(model, plan, *(torch.from_numpy(a) for a in (text, pooled, seeded_latents(full.latents.shape, 0))),
                             torch.zeros(text.shape), torch.zeros(pooled.shape), xslim=policy)
    steps = got.stats["per_step"]
    err = relative_error(got.latents, ref.latents)
    print(f"{policy}: levels {''.join(s['level'][0] for s in steps)}, NFE {got.stats['effective_nfe']:.2f} of 56, "
          f"PSNR vs full {psnr(got.latents, full.latents):.1f} dB, relative error vs PyTorch {err:.2e}")
    assert [s["level"] for s in steps] == [LEVEL_NAMES[level] for level in ref.levels]
    assert [s["blocks_run"] for s in steps] == ref.blocks_run
    assert [s["blocks_reused"] for s in steps] == [len(b) for b in ref.blocks_skipped]
    assert [s["tokens_computed"] for s in steps] == ref.tokens_computed
    assert got.stats["effective_nfe"] == pytest.approx(ref.effective_nfe, rel=1e-9)
    assert got.stats["flop_fraction"] == pytest.approx(ref.effective_nfe / 56, rel=1e-9)
    assert sum(s["flop_fraction"] for s in steps) == pytest.approx(28 * got.stats["flop_fraction"], rel=1e-9)
    assert err <= 1e-4
    return got, ref


@pytest.mark.parametrize("threshold", [0.05, 0.2, 1.0])
def test_step_level_reuses_the_reference_steps(toy_case, threshold):
    got, ref = run_both(toy_case, XSlimPolicy(early_warning=threshold))
    reused = ref.skipped_steps
    assert reused and not {0, 1, 27} & set(reused)  # warm-up and the last step always compute
    assert got.stats["effective_nfe"] == 2 * (28 - len(reused))
    assert all(s["blocks_run"] == 0 for s in got.stats["per_step"] if s["level"] == "reused")


def test_block_level_refresh_between_the_two_lines(toy_case):
    got, ref = run_both(toy_case, XSlimPolicy(early_warning=0.05, critical=0.4, refresh="block", block_threshold=0.5, first_blocks=1))
    assert {"full", "skip", "block"} <= set(ref.levels)
    block_steps = [i for i, level in enumerate(ref.levels) if level == "block"]
    assert all(ref.blocks_skipped[i] and 0 not in ref.blocks_skipped[i] for i in block_steps)  # first block always computed
    assert got.stats["effective_nfe"] < 56


@pytest.mark.parametrize("ratio", [0.25, 0.7])
def test_token_level_refresh_between_the_two_lines(toy_case, ratio):
    # early warning 0.1: on the toy model's trajectories some steps fall under it (reuse), others between the lines
    got, ref = run_both(toy_case, XSlimPolicy(early_warning=0.1, critical=0.4, refresh="token", sample_ratio=ratio))
    token_steps = [i for i, level in enumerate(ref.levels) if level == "token"]
    assert token_steps and "skip" in ref.levels
    assert all(ref.tokens_computed[i] == round(ratio * 64) for i in token_steps)  # 8x8 image tokens
    assert all(got.stats["per_step"][i]["blocks_run"] == 6 for i in token_steps)  # every block, on the subset
    assert all(got.stats["per_step"][i]["flop_fraction"] < 1 for i in token_steps)


def test_offline_schedule_in_xslim_fields(toy_case, tmp_path):
    strategy = {"fast": {"fully_infer_step": [0, 1, 2, 5, 9, 14, 20, 27], "block_refresh_step": [3, 7, 11, 17],
                         "token_refresh_step": [4, 12, 18, 24], "sample_ratio": 0.7}}
    path = tmp_path / "strategy.json"
    path.write_text(json.dumps(strategy))
    policy = parse_xslim_spec(f"xslim:schedule={path},mode=fast,block=0.5,first=1", steps=28)
    got, ref = run_both(toy_case, policy)
    assert [i for i, level in enumerate(ref.levels) if level == "full"] == strategy["fast"]["fully_infer_step"]
    assert [i for i, level in enumerate(ref.levels) if level == "block"] == strategy["fast"]["block_refresh_step"]
    assert [i for i, level in enumerate(ref.levels) if level == "token"] == strategy["fast"]["token_refresh_step"]
    assert got.stats["effective_nfe"] < 2 * 16


def test_bundle_default_policy_and_per_request_override(toy_bundles, tmp_path, toy_case):
    import shutil

    bundle = tmp_path / "xslim.engine"
    shutil.copytree(toy_bundles["28-step CFG"], bundle)
    # What --xslim xslim:step=0.2 writes (re-signed, as an export would).
    edit_manifest(bundle, lambda m: m["program"].update(xslim=parse_xslim_spec("xslim:step=0.2").to_manifest()))
    _, _, text, pooled, _, kwargs, _ = toy_case
    session = se.open_engine(bundle).session()
    assert session.generate(text, pooled, **kwargs).stats["effective_nfe"] < 56
    assert session.generate(text, pooled, xslim="none", **kwargs).stats["effective_nfe"] == 56
    assert session.generate(text, pooled, xslim_threshold=0, **kwargs).stats["effective_nfe"] == 56


def test_xslim_specs_are_parsed_or_rejected_clearly(tmp_path):
    assert parse_xslim_spec("none") is None
    assert parse_xslim_spec("xslim:step=0.3,warmup=3") == XSlimPolicy(early_warning=0.3, warmup_steps=3)
    assert parse_xslim_spec("xslim:step=0.1,critical=0.4,refresh=block,block=0.2,first=3") == XSlimPolicy(
        early_warning=0.1, critical=0.4, refresh="block", block_threshold=0.2, first_blocks=3)
    assert make_plan(6, False, steps=8, xslim="xslim:step=0.1").to_manifest(6)["xslim"]["early_warning"] == 0.1
    for spec, message in [("xslim:step=-1", "must be >= 0"), ("xslim:warmup=1,step=0.1", "at least 2"), ("xslim", "needs step="),
                          ("xslim:step=0.1,ratio=0", r"in \(0, 1\]"), ("xslim:step=0.1,ratio=1.5", r"in \(0, 1\]"),
                          ("xslim:step=0.1,block=-0.5", ">= 0"), ("xslim:step=0.3,critical=0.1", "must be >= the early-warning"),
                          ("xslim:step=0.1,refresh=layer", "block or token"), ("xslim:step=0.1,speed=2", "not supported"),
                          ("teacache:0.1", "unknown X-Slim policy"), ("xslim:step=abc", "not a number")]:
        with pytest.raises(ValueError, match=message):
            parse_xslim_spec(spec)
    proc = run_cli("export-engine", str(TOY_CHECKPOINT), "-o", str(tmp_path / "x.engine"), "--xslim", "xslim:step=-2", check=False)
    assert proc.returncode == 2 and "must be >= 0" in proc.stderr and not (tmp_path / "x.engine").exists()


@pytest.mark.parametrize("schedule, message", [
    ({"fully_infer_step": [0, 1, 30], "sample_ratio": 0.5}, "names step 30, out of range for a 28-step plan"),
    ({"fully_infer_step": [0, 1], "token_refresh_step": [1]}, "step 1 is in both"),
    ({"fully_infer_step": [1, 2]}, "step 0 must be full"),
    ({"fully_infer_step": [0, 1], "token_refresh_step": [4], "sample_ratio": 1.5}, r"sample_ratio must be in \(0, 1\]"),
    ({"fully_infer_step": [0], "token_refresh_step": [3], "sample_ratio": 0.5}, "needs two full steps"),
    ({"steps": [{"level": "full"}] * 27 + [{"level": "block", "block_threshold": -1}]}, "block_threshold must be a finite number >= 0"),
    ({"steps": [{"level": "full"}] * 27 + [{"level": "warp"}]}, "level must be one of"),
    ({"steps": [{"level": "full"}] * 3}, "the schedule has 3 steps but the plan has 28"),
    ({"slow": {"fully_infer_step": [0]}}, "pass mode="),
])
def test_bad_schedules_are_rejected(tmp_path, schedule, message):
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps(schedule))
    with pytest.raises(ValueError, match=message):
        parse_xslim_spec(f"xslim:schedule={path}", steps=28)


def test_bad_policies_are_refused_at_the_c_boundary(toy_bundles, bundle_copy):
    call = CApiCall(se.open_engine(toy_bundles["1x"]))
    status, message = call.generate(xslim_threshold=float("nan"))
    assert status == "SLIM_ERR_INVALID_ARGUMENT" and "xslim_threshold must be finite" in message
    good = XSlimPolicy(early_warning=0.1).to_manifest()
    for change, expected in [({"sample_ratio": 0}, "xslim_policy.sample_ratio must be in (0, 1]"),
                             ({"block_threshold": -1}, "xslim_policy.block_threshold must not be negative"),
                             ({"mode": "schedule", "schedule": [{"level": "full"}] * 5}, "has 5 steps but the program has 2"),
                             ({"mode": "schedule", "schedule": [{"level": "full"}, {"level": "token"}]}, "before two full steps"),
                             ({"critical": 0.3}, "uses the X-Slim token level but this bundle has no block_N_tokens stages"),
                             ({"mode": "schedule", "schedule": [{"level": "full", "ratio": 0.5}, {"level": "full"}]},
                              "xslim_policy.schedule[0].ratio is not a schedule field"),
                             ({"kind": "teacache"}, 'xslim_policy.kind must be "xslim"')]:
        status, message = call.generate(xslim_policy=json.dumps({**good, **change}).encode())
        assert status == "SLIM_ERR_INVALID_ARGUMENT" and expected in message, message
    status, message = call.generate(xslim_policy=b"{not json")
    assert status == "SLIM_ERR_INVALID_ARGUMENT" and "xslim_policy: json:" in message
    edit_manifest(bundle_copy, lambda m: m["program"].update(xslim={**good, "early_warning": -1}))
    with pytest.raises(se.SlimError, match="program.xslim.early_warning must not be negative"):
        se.open_engine(bundle_copy)


def test_xslim_strategy_files_load_with_skips_in_between(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"fully_infer_step": [0, 1, 4], "block_refresh_step": [2], "token_refresh_step": [5], "sample_ratio": 0.7}))
    assert load_schedule(path, steps=7) == [{"level": "full"}, {"level": "full"}, {"level": "block"}, {"level": "skip"},
                                            {"level": "full"}, {"level": "token", "sample_ratio": 0.7}, {"level": "skip"}]


def test_xslim_composes_with_the_1x_program_cfg_and_dual_attention(distilled_xslim_bundle, distilled_checkpoint):
    """A 1.x student (skipped range 1-2, SD3.5 dual-attention block 0) on 6 steps with CFG under a schedule
    that runs every level: the skipped range stays skipped in every level, dual-attention blocks run whole
    in token steps, and the runtime still matches the reference."""
    from .conftest import random_inputs, reference_for

    bundle, spec = distilled_xslim_bundle
    model, plan = reference_for(distilled_checkpoint, {"steps": 6, "guidance_scale": 3.0, "xslim": spec})
    assert plan.skip_blocks is not None and model.config.dual_attention_layers
    text, pooled = random_inputs(model, 2, 7, seed=3)
    negative, negative_pooled = random_inputs(model, 2, 7, seed=4)
    noise = np.random.default_rng(5).standard_normal((2, model.config.in_channels, 16, 12), dtype=np.float32)
    got = se.open_engine(bundle).session().generate(text, pooled, latents=noise, negative_prompt_embeds=negative,
                                                    negative_pooled_embeds=negative_pooled)
    ref = reference_generate(model, plan, *(torch.from_numpy(a) for a in (text, pooled, noise, negative, negative_pooled)))
    steps = got.stats["per_step"]
    assert [s["level"] for s in steps] == ["full", "skipped_range", "token_refresh", "reused", "block_refresh", "skipped_range"]
    assert ref.levels == ["full", "full", "token", "skip", "block", "full"]
    skipped = plan.skip_blocks[1] - plan.skip_blocks[0] + 1
    assert steps[2]["blocks_run"] == model.num_layers - skipped  # token step: the range still skipped
    assert steps[4]["blocks_reused"] == len(ref.blocks_skipped[4]) > 0 and not set(ref.blocks_skipped[4]) & set(range(1, 3))
    assert steps[4]["blocks_run"] > 0  # a block step that runs some blocks of a bundle with token stages
    assert [s["tokens_computed"] for s in steps] == ref.tokens_computed
    assert got.stats["effective_nfe"] == pytest.approx(ref.effective_nfe, rel=1e-9)
    assert relative_error(got.latents, ref.latents) <= 1e-4


def test_a_session_reused_across_policies_and_sizes_matches_a_fresh_one(toy_bundles, toy_case):
    """Caches sized by an earlier request (token level, small) must not be written by a later one
    (step level with CFG, larger): the result equals a fresh session's, bit for bit."""
    _, _, text, pooled, _, _, _ = toy_case
    engine = se.open_engine(toy_bundles["28-step CFG"])
    reused = engine.session()
    reused.generate(text[:1], pooled[:1], guidance_scale=1.0, seed=1, height=16, width=16,
                    xslim="xslim:step=0.05,critical=0.4,refresh=token,ratio=0.5")
    reused.generate(text[:1], pooled[:1], guidance_scale=1.0, seed=1, height=16, width=16,
                    xslim="xslim:step=0.05,critical=0.4,refresh=block,block=0.5,first=1")
    kwargs = dict(negative_prompt_embeds=np.zeros_like(text), negative_pooled_embeds=np.zeros_like(pooled), seed=2, height=32, width=32,
                  xslim="xslim:step=0.05,critical=0.4,refresh=token,ratio=0.3")
    again = reused.generate(text, pooled, **kwargs)
    fresh = engine.session().generate(text, pooled, **kwargs)
    assert np.array_equal(again.latents, fresh.latents)
    assert [s["level"] for s in again.stats["per_step"]] == [s["level"] for s in fresh.stats["per_step"]]


def test_token_counts_round_as_the_reference_does(toy_case):
    """0.7 x 15 tokens = 10.5 rounds to 11 in the reference (double precision) and in the runtime."""
    model, plan, text, pooled, session, _, _ = toy_case
    noise = seeded_latents((1, model.config.in_channels, 6, 10), 3)
    policy = XSlimPolicy(early_warning=0.05, critical=0.4, refresh="token", sample_ratio=0.7)
    got = session.generate(text[:1], pooled[:1], latents=noise, negative_prompt_embeds=np.zeros_like(text[:1]),
                           negative_pooled_embeds=np.zeros_like(pooled[:1]), xslim=policy)
    ref = reference_generate(model, plan, torch.from_numpy(text[:1]), torch.from_numpy(pooled[:1]), torch.from_numpy(noise),
                             torch.zeros(text[:1].shape), torch.zeros(pooled[:1].shape), xslim=policy)
    counts = [s["tokens_computed"] for s in got.stats["per_step"]]
    assert counts == ref.tokens_computed and 11 in counts
    assert relative_error(got.latents, ref.latents) <= 1e-4


def test_calibrate_xslim_writes_the_cheapest_schedule_of_its_family_that_keeps_the_target(toy_bundles, toy_case, tmp_path):
    """calibrate-xslim's schedule, run by the PyTorch reference, stays within the target PSNR of full
    computation on the calibration seed, and every schedule of its family with fewer full steps does not."""
    model, _, text, pooled, _, _, _ = toy_case
    ck = load_checkpoint(TOY_TEACHER)
    steps, target = 12, 30.0
    out = tmp_path / "schedule.json"
    args = [str(toy_bundles["28-step CFG"]), "--embeds", f"toy:{TOY_PIPELINE}", "-o", str(out), "--steps", str(steps), "--seeds", "1",
            "--target-db", str(target), "--peak", "2", "--size", "16", "-q"]
    assert calibrate_xslim.main(args) == 0
    schedule = load_schedule(out, "fast", steps)
    chosen = [s for s, e in enumerate(schedule) if e["level"] == "full"]

    plan = make_plan(ck.config.num_layers, True, ck.metadata, skip_blocks="none", steps=steps, guidance_scale=4.0)
    noise = torch.from_numpy(seeded_latents((len(text), model.config.in_channels, 16, 16), 1))  # the tool draws seed 1 as the engine does
    negatives = calibrate_xslim.load_embeds(f"toy:{TOY_PIPELINE}")  # the empty prompt's conditioning, as the tool used

    def reference(full_steps):
        policy = None if full_steps is None else XSlimPolicy(schedule=tuple(
            {"level": "full" if s in full_steps else "skip"} for s in range(steps)))
        return reference_generate(model, plan, torch.from_numpy(text), torch.from_numpy(pooled), noise,
                                  *(torch.from_numpy(negatives[k]) for k in ("negative_prompt_embeds", "negative_pooled_prompt_embeds")),
                                  xslim=policy).latents.numpy()

    full = reference(None)
    assert psnr(reference(chosen), full) >= target
    fewer = {tuple(calibrate_xslim.full_steps(steps, w, k)) for w in calibrate_xslim.WARMUPS for k in calibrate_xslim.SPACINGS}
    fewer = [f for f in fewer if len(f) < len(chosen)]
    assert fewer and len(chosen) < steps  # the target is neither free nor out of reach: the check below means something
    for f in fewer:
        assert psnr(reference(f), full) < target, f

    # refusals: an existing file, embeddings without the pooled ones, a target no schedule reaches
    assert calibrate_xslim.main(args) == 2
    bad = tmp_path / "bad.npz"
    np.savez(bad, prompt_embeds=text)
    assert calibrate_xslim.main([*args[:2], str(bad), "-o", str(tmp_path / "x.json"), "-q"]) == 2
    unreachable = tmp_path / "never.json"
    assert calibrate_xslim.main([*args[:3], "-o", str(unreachable), *args[5:9], "--target-db", "500", "-q"]) == 1
    assert not unreachable.exists() and not list(tmp_path.glob(".*tmp*"))
