"""X-Slim step-level reuse: the runtime takes the reference's decisions on a trained model's trajectories."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import slimengine as se
from slimengine.export.checkpoint import load_checkpoint
from slimengine.export.reference_sampler import reference_generate
from slimengine.export.sampling_plan import make_plan
from slimengine.export.xslim import StepCachePolicy, parse_cache_spec
from slimengine.noise import gaussian_noise
from slimengine.tools import toy_shapes
from slimengine.tools.toy_demo import class_grid

from .conftest import TOY_CHECKPOINT, CApiCall, relative_error, run_cli


def psnr(a, b) -> float:
    return float(10 * np.log10(4.0 / np.mean((np.asarray(a) - np.asarray(b)) ** 2)))  # latents span [-1, 1]


@pytest.fixture(scope="module")
def toy_case():
    ck = load_checkpoint(TOY_CHECKPOINT)
    plan = make_plan(ck.config.num_layers, True, ck.metadata, cache_blocks="none", steps=28, guidance_scale=4.0)
    text, pooled = toy_shapes.prompt_embeds(*class_grid())
    return ck.build_model(), plan, text, pooled


@pytest.mark.parametrize("threshold", [0.05, 0.2, 1.0])
def test_runtime_reuses_the_same_steps_as_the_reference(toy_bundles, toy_case, threshold):
    model, plan, text, pooled = toy_case
    session = se.open_engine(toy_bundles["28-step CFG"]).session()
    kwargs = dict(negative_prompt_embeds=np.zeros_like(text), negative_pooled_embeds=np.zeros_like(pooled), seed=0, height=16, width=16)
    full = session.generate(text, pooled, **kwargs)
    cached = session.generate(text, pooled, step_cache_threshold=threshold, **kwargs)
    ref = reference_generate(model, plan, *(torch.from_numpy(a) for a in (text, pooled, gaussian_noise(full.latents.shape, 0))),
                             torch.zeros(text.shape), torch.zeros(pooled.shape), step_cache=StepCachePolicy(threshold))
    reused = [i for i, s in enumerate(cached.stats["per_step"]) if s["level"] == "reused"]
    err = relative_error(cached.latents, ref.latents)
    print(f"step cache {threshold}: reused steps {reused}, NFE {cached.stats['effective_nfe']:.0f} of 56, "
          f"PSNR vs full {psnr(cached.latents, full.latents):.1f} dB, relative error vs PyTorch {err:.2e}")
    assert reused == ref.skipped_steps and reused, "expected the same, non-empty set of reused steps"
    assert 0 not in reused and 1 not in reused and 27 not in reused  # warm-up and the last step always compute
    assert cached.stats["effective_nfe"] == ref.effective_nfe == 2 * (28 - len(reused))
    assert all(s["blocks_run"] == 0 for s in cached.stats["per_step"] if s["level"] == "reused")
    assert err <= 1e-4


def test_the_bundle_default_policy_and_per_request_override(toy_bundles, tmp_path, toy_case):
    import shutil

    bundle = tmp_path / "cached.engine"
    shutil.copytree(toy_bundles["28-step CFG"], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["program"]["step_cache"] = StepCachePolicy(0.2).to_manifest()  # what --cache xslim:step=0.2 writes
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    _, _, text, pooled = toy_case
    session = se.open_engine(bundle).session()
    kwargs = dict(negative_prompt_embeds=np.zeros_like(text), negative_pooled_embeds=np.zeros_like(pooled), height=16, width=16)
    assert session.generate(text, pooled, **kwargs).stats["effective_nfe"] < 56
    assert session.generate(text, pooled, step_cache_threshold=0, **kwargs).stats["effective_nfe"] == 56


def test_cache_specs_are_parsed_or_rejected_clearly(tmp_path):
    assert parse_cache_spec("none") is None
    assert parse_cache_spec("xslim:step=0.3,warmup=3") == StepCachePolicy(0.3, 3)
    assert make_plan(6, False, steps=8, cache="xslim:step=0.1").to_manifest(6)["step_cache"] == {"threshold": 0.1, "warmup_steps": 2}
    for spec, message in [("xslim:step=-1", "must be >= 0"), ("xslim:warmup=1,step=0.1", "at least 2"), ("xslim", "needs step="),
                          ("xslim:block=0.1", "not supported"), ("teacache:0.1", "unknown cache policy"), ("xslim:step=abc", "not a number")]:
        with pytest.raises(ValueError, match=message):
            parse_cache_spec(spec)
    proc = run_cli("export-engine", str(TOY_CHECKPOINT), "-o", str(tmp_path / "x.engine"), "--cache", "xslim:step=-2", check=False)
    assert proc.returncode == 2 and "must be >= 0" in proc.stderr and not (tmp_path / "x.engine").exists()


def test_bad_step_cache_values_are_refused(toy_bundles, bundle_copy):
    status, message = CApiCall(se.open_engine(toy_bundles["1x"])).generate(step_cache_threshold=float("nan"))
    assert status == "SLIM_ERR_INVALID_ARGUMENT" and "step_cache_threshold" in message
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["program"]["step_cache"] = {"threshold": -1, "warmup_steps": 2}
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(se.SlimError, match="step_cache.threshold must not be negative"):
        se.open_engine(bundle_copy)
