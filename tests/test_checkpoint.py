"""Checkpoint loading: formats, key names, config inference, and one-line errors for bad files."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from slimengine.export.checkpoint import infer_config, load_checkpoint
from slimengine.export.errors import CheckpointError
from slimengine.export.sd3_model import DistilledSD3
from slimengine.tools.make_sd3_checkpoint import make_config

from .conftest import make_checkpoint, run_cli


def test_every_format_and_key_naming_loads_the_same_weights(tmp_path):
    variants = {
        "diffusers-keys.pt": [],
        "original-keys.safetensors": ["--key-format", "original", "--prefix", "module."],
        "fsdp.pt": ["--prefix", "_fsdp_wrapped_module."],
        "transformer-prefix.safetensors": ["--prefix", "transformer."],
        "folder": ["--format", "diffusers"],
    }
    loaded = {name: load_checkpoint(make_checkpoint(tmp_path / name, "--preset", "tiny-3.5", "--seed", "3", *args))
              for name, args in variants.items()}
    base = loaded["diffusers-keys.pt"]
    assert base.has_compensation and base.config.qk_norm == "rms_norm" and base.config.dual_attention_layers == (0, 1)
    for name, ck in loaded.items():
        assert ck.config == base.config, name
        assert ck.state_dict.keys() == base.state_dict.keys(), name
        for key, value in base.state_dict.items():
            assert torch.equal(ck.state_dict[key], value), f"{name}: {key}"


@pytest.mark.parametrize("preset", ["sd3-medium", "sd3.5-medium", "sd3.5-large", "small"])
def test_config_is_inferred_from_weight_shapes_alone(preset):
    config = make_config(preset)
    with torch.device("meta"):
        state = {k.removeprefix("transformer."): v for k, v in DistilledSD3(config, with_compensation=False).state_dict().items()}
    heads = None if config.qk_norm or config.attention_head_dim == 64 else config.num_attention_heads
    assert infer_config(state, "meta", heads) == config


def test_sd3_medium_has_the_published_parameter_count():
    with torch.device("meta"):
        model = DistilledSD3(make_config("sd3-medium"), with_compensation=False)
    assert sum(p.numel() for p in model.transformer.parameters()) == 2_028_328_000  # SD3-Medium's transformer as diffusers builds it


@pytest.mark.parametrize("preset", ["tiny", "tiny-3.5"])
@pytest.mark.parametrize("latent_hw", [(16, 16), (14, 10)])
def test_stage_decomposition_equals_diffusers_forward(tmp_path, preset, latent_hw):
    model = load_checkpoint(make_checkpoint(tmp_path / "m.pt", "--preset", preset)).build_model()
    g = torch.Generator().manual_seed(0)
    c = model.config
    x = torch.randn(2, c.in_channels, *latent_hw, generator=g)
    t = torch.tensor([981.0, 250.0])
    pooled = torch.randn(2, c.pooled_projection_dim, generator=g)
    text = torch.randn(2, 9, c.joint_attention_dim, generator=g)
    with torch.no_grad():
        expected = model.transformer(x, text, pooled, t).sample
        got = model.forward_full(x, t, pooled, text)
    err = (got - expected).abs().max().item()
    assert err <= 1e-5 * expected.abs().max().item(), f"max error {err}"


def _bad_files(tmp_path):
    good_pt = make_checkpoint(tmp_path / "good.pt", "--preset", "tiny")
    good_st = make_checkpoint(tmp_path / "good.safetensors", "--preset", "tiny")
    cases = {}
    data = good_pt.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    cases["truncated.pt"] = "cannot read checkpoint"
    data = good_st.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated.safetensors"] = "cannot read checkpoint"
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 100)
    cases["garbage.pt"] = "cannot read checkpoint"
    saved = torch.load(good_pt, weights_only=True)
    state = saved["state_dict"]
    missing = {k: v for k, v in state.items() if k != "transformer_blocks.1.attn.to_q.weight"}
    torch.save({"state_dict": missing, "slimengine": saved["slimengine"]}, tmp_path / "missing-key.pt")
    torch.save(state, tmp_path / "no-metadata.pt")
    cases["no-metadata.pt"] = "pass --heads"
    cases["missing-key.pt"] = "transformer_blocks.1.attn.to_q.weight"
    wrong_dtype = dict(state, **{"proj_out.bias": state["proj_out.bias"].to(torch.int32)})
    save_file(wrong_dtype, str(tmp_path / "int-weights.safetensors"), metadata={"slimengine": '{"num_attention_heads": 2}'})
    cases["int-weights.safetensors"] = "floating-point"
    nan_weights = dict(state, **{"proj_out.bias": torch.full_like(state["proj_out.bias"], float("nan"))})
    save_file(nan_weights, str(tmp_path / "nan-weights.safetensors"), metadata={"slimengine": '{"num_attention_heads": 2}'})
    cases["nan-weights.safetensors"] = "'proj_out.bias' contains NaN or Inf"
    torch.save(torch.nn.Linear(4, 4).state_dict(), tmp_path / "not-sd3.pt")
    cases["not-sd3.pt"] = "not an SD3 transformer checkpoint"
    torch.save([1, 2, 3], tmp_path / "a-list.pt")
    cases["a-list.pt"] = "expected a state dict"
    save_file(state, str(tmp_path / "list-metadata.safetensors"), metadata={"slimengine": "[1, 2]"})
    cases["list-metadata.safetensors"] = "must be a JSON object"
    save_file(state, str(tmp_path / "too-many-heads.safetensors"), metadata={"slimengine": '{"num_attention_heads": 64}'})
    cases["too-many-heads.safetensors"] = "cannot be split into 64 attention heads"
    (tmp_path / "weights.txt").write_text("hello")
    cases["weights.txt"] = "unknown checkpoint type"
    cases["does-not-exist.pt"] = "no such file"
    return cases


def test_bad_checkpoints_give_one_clear_line_and_write_nothing(tmp_path):
    for name, expected in _bad_files(tmp_path).items():
        out = tmp_path / f"{name}.engine"
        proc = run_cli("export-engine", str(tmp_path / name), "-o", str(out), "-q", check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, f"{name}: {proc.stderr}"
        assert len(lines) == 1 and "Traceback" not in proc.stderr, f"{name}: {proc.stderr}"
        assert name in lines[0] and expected in lines[0], f"{name}: {lines[0]}"
        assert not out.exists() and not list(tmp_path.glob(f".{name}.engine*")), name


def test_pickled_code_is_never_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    import pickle

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    proc = run_cli("export-engine", str(tmp_path / "evil.pt"), "-q", check=False)
    assert proc.returncode == 2 and "cannot read checkpoint" in proc.stderr
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("key_format", ["diffusers", "original"])
def test_expanded_or_overlapping_sd3_tensors_are_refused_before_anything_is_built(tmp_path, key_format):
    good = make_checkpoint(tmp_path / "good.pt", "--preset", "tiny", "--key-format", key_format)
    saved = torch.load(good, weights_only=True)
    state = saved["state_dict"]
    # Every tensor a view of one number (torch.save keeps the 4-byte storage): refused before the original-format
    # conversion, whose concatenations would materialise them.
    expanded = {k: torch.zeros((1,) * v.dim()).expand(v.shape) for k, v in state.items()}
    key = max(state, key=lambda k: state[k].numel())
    overlapping = dict(state, **{key: torch.randn(state[key].numel()).as_strided(state[key].shape, (1,) * state[key].dim())})
    for name, tensors in (("expanded.pt", expanded), ("overlapping.pt", overlapping)):
        torch.save({"state_dict": tensors, "slimengine": saved["slimengine"]}, tmp_path / name)
        assert name != "expanded.pt" or (tmp_path / name).stat().st_size < good.stat().st_size / 4
        out = tmp_path / f"{name}.engine"
        proc = run_cli("export-engine", str(tmp_path / name), "-o", str(out), "-q", check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert name in lines[0] and "is an expanded, stride-0 or overlapping view" in lines[0], lines[0]
        assert name == "expanded.pt" or f"'{key}'" in lines[0]
        assert not out.exists() and not list(tmp_path.glob(f".{name}.engine*"))
    assert load_checkpoint(good).config.num_layers == 4  # the same file with its own tensors still loads


@pytest.mark.parametrize("sampling, message", [
    ({"skip_blocks": "1-2", "steps": 10_001}, "steps must be an integer from 1 to 10000"),  # 10**9: 7.5 GB of sigmas (see below)
    ({"skip_blocks": "1-2", "steps": "2"}, "steps must be an integer from 1 to 10000 (--steps or the checkpoint's sampling metadata), got '2'"),
    ({"skip_blocks": "1-2", "steps": True}, "steps must be an integer"),
    ({"skip_blocks": "1-2", "shift": float("nan")}, "shift must be a finite positive number"),  # went into the sigmas
    ({"skip_blocks": "1-2", "teacher_shift": -3.0}, "teacher_shift must be a finite positive number"),
    ({"skip_blocks": "1-2", "guidance_scale": float("nan")}, "guidance_scale must be a finite non-negative number"),  # a bundle no runtime opens
    ({"skip_blocks": 5}, "skip_blocks must be 'A-B' or two block indices, got 5"),
    ({"skip_blocks": ["1", "2"]}, "skip_blocks must be 'A-B' or two block indices"),
    ({"skip_blocks": "1-2", "xslim": 5}, "the checkpoint's sampling metadata 'xslim' must be a spec string, got 5"),
    ({"cache_blocks": "1-2", "cache": 5}, "the checkpoint's sampling metadata 'cache' must be a spec string, got 5"),  # legacy keys
    ({"skip_blocks": "1-2", "cache_blocks": "1-2"}, "has both 'skip_blocks' and its legacy spelling 'cache_blocks'"),
    ([1], "the checkpoint's sampling metadata must be an object, got list"),
])
def test_untrusted_sampling_metadata_is_checked_before_any_plan_is_computed(sampling, message):
    from slimengine.export.sampling_plan import make_plan

    with pytest.raises(ValueError, match=re.escape(message)):
        make_plan(4, True, {"sampling": sampling})


@pytest.mark.parametrize("sample_size", [0, -8, 3, True, "128"])
def test_a_metadata_sample_size_that_is_no_latent_size_is_refused(tmp_path, sample_size):
    """0 and True were a ZeroDivisionError deep in the export; -8 and 3 were exported into bundles whose
    default size no generation could use."""
    good = make_checkpoint(tmp_path / "good.pt", "--preset", "tiny")
    saved = torch.load(good, weights_only=True)
    torch.save({"state_dict": saved["state_dict"], "slimengine": dict(saved["slimengine"], sample_size=sample_size)}, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"the metadata's sample_size must be a positive multiple of the patch size (2), "
                                                        f"got {sample_size!r}")):
        load_checkpoint(tmp_path / "s.pt")


def test_a_checkpoint_claiming_a_billion_steps_fails_in_one_line_without_allocating(tmp_path):
    """In a child process (the export CLI) under a 4 GB address-space limit: the unchecked plan allocated
    7.5 GB of sigmas before failing with a traceback."""
    good = make_checkpoint(tmp_path / "good.pt", "--preset", "tiny-3.5")
    saved = torch.load(good, weights_only=True)
    meta = dict(saved["slimengine"], sampling=dict(saved["slimengine"].get("sampling", {}), steps=10**9))
    torch.save({"state_dict": saved["state_dict"], "slimengine": meta}, tmp_path / "steps.pt")
    command = f"ulimit -v 4000000; exec {sys.executable} -m slimengine.export.cli {tmp_path / 'steps.pt'} -o {tmp_path / 'o.engine'} -q"
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "steps must be an integer from 1 to 10000" in lines[0], proc.stderr[-3000:]
    assert not (tmp_path / "o.engine").exists()
