"""The SD3 pipeline's text encoders and VAE decoder as bundle stages (export/pipeline_export.py, docs/pipeline.md),
against diffusers' and transformers' own modules on a tiny random pipeline folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slimengine import Engine
from tests.conftest import PIPELINE_T5_LENGTH, export, run_cli
from tests.pipeline_files import SCALING, SCHEDULER_SHIFT, SHIFT_FACTOR

PROMPTS = ["a red circle on a blue square", ""]
T5_LENGTH = PIPELINE_T5_LENGTH


@pytest.fixture(scope="module")
def folder(sd3_pipeline):
    return sd3_pipeline


@pytest.fixture(scope="module")
def bundle(sd3_pipeline_bundle):
    return sd3_pipeline_bundle


@pytest.fixture(scope="module")
def fp16_bundle(folder):
    """The 1.x student case: a transformer-only checkpoint plus --pipeline, fp16."""
    return export(folder / "transformer", folder.parent / "sd3-pipeline-fp16.engine", "--pipeline", str(folder), "--precision", "fp16",
                  "--max-sequence-length", str(T5_LENGTH))


@pytest.fixture(scope="module")
def reference(folder):
    """diffusers' SD3 pipeline from the same folder, T5 in eager attention as exported (the same math as SDPA)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(bundle, stage, feed):
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = next(s for s in manifest["stages"] if s["name"] == stage)
    return dict(zip([t["name"] for t in spec["outputs"]], _session(bundle / spec["file"]).run(None, feed)))


def _rel(got, want) -> float:
    want = np.asarray(want, dtype=np.float32)
    return float(np.abs(np.asarray(got) - want).max() / max(np.abs(want).max(), 1e-6))


def _ids(engine, role, prompts):
    return np.stack([engine.tokenize(role, p) for p in prompts]).astype(np.int64)


def test_manifest_roles_and_pipeline_block(bundle, folder):
    manifest = json.loads((bundle / "manifest.json").read_text())
    roles = {s["role"]: s for s in manifest["stages"]}
    assert {"clip_l", "clip_g", "t5", "vae_decode"} <= set(roles)
    assert roles["clip_l"]["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", 77]}]
    assert [t["name"] for t in roles["clip_g"]["outputs"]] == ["hidden_states", "pooled"]
    assert roles["t5"]["outputs"][0]["shape"] == ["batch", "text", 96]
    p = manifest["pipeline"]
    assert (p["clip_l_dim"], p["clip_g_dim"], p["clip_l_pooled_dim"], p["clip_g_pooled_dim"]) == (32, 48, 24, 40)
    assert (p["joint_attention_dim"], p["t5"], p["max_sequence_length"], p["clip_length"]) == (96, True, T5_LENGTH, 77)
    assert p["vae"] == {"latent_channels": 16, "scale_factor": 8, "scaling_factor": SCALING, "shift_factor": SHIFT_FACTOR}
    assert p["scheduler_shift"] == SCHEDULER_SHIFT
    assert [t["role"] for t in manifest["tokenizers"]] == ["clip_l", "clip_g", "t5"]
    # the scheduler config's shift made the sampling plan (not the default 3)
    from slimengine.export.sampling_plan import scheduler_sigmas

    sigmas = [s["sigma"] for s in manifest["program"]["steps"]]
    assert sigmas == pytest.approx(scheduler_sigmas(28, SCHEDULER_SHIFT)[:-1], rel=1e-6)
    assert sigmas[1] != pytest.approx(scheduler_sigmas(28, 3.0)[1], rel=1e-6)


def test_runtime_opens_and_verifies(bundle):
    proc = run_cli_verify(bundle)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with Engine(bundle) as engine:
        assert {"clip_l", "clip_g", "t5", "vae_decode"} <= set(engine.stage_names)


def run_cli_verify(bundle):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "slimengine.cli", "verify", str(bundle)], capture_output=True, text=True)


def test_encoders_match_diffusers_encode_prompt(bundle, reference):
    """Each encoder stage (ONNX Runtime, and the C runtime's slim_stage_run) against transformers' module, then the
    conditioning assembled as docs/pipeline.md says against diffusers' encode_prompt."""
    pipe = reference
    with Engine(bundle) as engine:
        session = engine.session()
        out = {}
        for role, encoder in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2), ("t5", pipe.text_encoder_3)):
            ids = _ids(engine, role, PROMPTS)
            got = _run(bundle, role, {"input_ids": ids})
            with torch.no_grad():
                r = encoder(torch.from_numpy(ids), output_hidden_states=True)
            want = {"hidden_states": r.hidden_states[-2], "pooled": r.text_embeds} if role != "t5" else {"hidden_states": r[0]}
            for name, w in want.items():
                assert got[name].shape == tuple(w.shape)
                assert _rel(got[name], w) < 1e-5, (role, name, _rel(got[name], w))
                native = session.run_stage(role, {"input_ids": ids}, {name: np.empty(w.shape, np.float32)})[name]
                assert _rel(native, w) < 1e-5, (role, name, "C runtime")
            out[role] = got
        session.close()
    clip = np.concatenate([out["clip_l"]["hidden_states"], out["clip_g"]["hidden_states"]], axis=-1)
    clip = np.pad(clip, ((0, 0), (0, 0), (0, 96 - clip.shape[-1])))
    embeds = np.concatenate([clip, out["t5"]["hidden_states"]], axis=1)
    pooled = np.concatenate([out["clip_l"]["pooled"], out["clip_g"]["pooled"]], axis=-1)
    with torch.no_grad():
        want_embeds, _, want_pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False,
                                                            max_sequence_length=T5_LENGTH)
    assert embeds.shape == (2, 77 + T5_LENGTH, 96) and _rel(embeds, want_embeds) < 1e-5
    assert _rel(pooled, want_pooled) < 1e-5


def test_t5_dynamic_length(bundle, reference):
    ids = np.random.default_rng(0).integers(0, reference.text_encoder_3.config.vocab_size, (3, 11)).astype(np.int64)
    got = _run(bundle, "t5", {"input_ids": ids})["hidden_states"]
    with torch.no_grad():
        want = reference.text_encoder_3(torch.from_numpy(ids))[0]
    assert got.shape == (3, 11, 96) and _rel(got, want) < 1e-5


def test_vae_decode_matches_diffusers(bundle, reference):
    latents = np.random.default_rng(1).standard_normal((2, 16, 5, 7)).astype(np.float32)
    scaled = latents / SCALING + SHIFT_FACTOR  # the runtime's step before the stage (docs/pipeline.md)
    got = _run(bundle, "vae_decode", {"latents": scaled})["image"]
    with torch.no_grad():
        want = reference.vae.decode(torch.from_numpy(scaled), return_dict=False)[0]
    assert got.shape == (2, 3, 40, 56) and _rel(got, want) < 1e-5
    with Engine(bundle) as engine:
        session = engine.session()
        native = session.run_stage("vae_decode", {"latents": scaled}, {"image": np.empty(got.shape, np.float32)})["image"]
        session.close()
    assert _rel(native, want) < 1e-5


FP16_TOLERANCE = 2e-2  # max |Δ| relative to the reference's max |value|


def test_fp16_stages_finite_and_close(fp16_bundle, reference):
    """fp16 encoders and VAE (T5 with its residual stream, norms, softmax and wo in float32; the VAE with its group norms
    in float32) against the float32 modules: finite and close."""
    rng = np.random.default_rng(2)
    for role, encoder in (("clip_l", reference.text_encoder), ("clip_g", reference.text_encoder_2), ("t5", reference.text_encoder_3)):
        ids = rng.integers(0, encoder.config.vocab_size, (2, 77 if role != "t5" else T5_LENGTH)).astype(np.int64)
        got = _run(fp16_bundle, role, {"input_ids": ids})
        with torch.no_grad():
            r = encoder(torch.from_numpy(ids), output_hidden_states=True)
        want = {"hidden_states": r.hidden_states[-2], "pooled": r.text_embeds} if role != "t5" else {"hidden_states": r[0]}
        for name, w in want.items():
            assert np.isfinite(got[name]).all(), (role, name)
            assert _rel(got[name], w) < FP16_TOLERANCE, (role, name, _rel(got[name], w))
    latents = rng.standard_normal((1, 16, 6, 4)).astype(np.float32)
    got = _run(fp16_bundle, "vae_decode", {"latents": latents})["image"]
    with torch.no_grad():
        want = reference.vae.decode(torch.from_numpy(latents), return_dict=False)[0]
    assert np.isfinite(got).all() and _rel(got, want) < FP16_TOLERANCE


def _weight_dtypes(stage_path) -> dict[str, int]:
    """onnx data type name -> elements, over the stage's weight initializers (more than 64 values)."""
    import onnx

    model = onnx.load(str(stage_path), load_external_data=False)
    counts: dict[str, int] = {}
    for init in model.graph.initializer:
        n = int(np.prod(init.dims))
        if n > 64:
            name = onnx.TensorProto.DataType.Name(init.data_type)
            counts[name] = counts.get(name, 0) + n
    return counts


def test_fp16_t5_stage_is_fp16(fp16_bundle, bundle):
    """The fp16 bundle's T5 keeps only nodes in float32, not weights: every weight is fp16 (half the float32 stage's
    bytes), the graph passes the ONNX checker with shape inference (no node with mixed input types) and loads in ONNX
    Runtime (test_fp16_stages_finite_and_close runs it)."""
    import onnx

    counts = _weight_dtypes(fp16_bundle / "stages" / "t5.onnx")
    assert set(counts) == {"FLOAT16"}, counts
    assert counts == {"FLOAT16": sum(_weight_dtypes(bundle / "stages" / "t5.onnx").values())}
    fp16_size = (fp16_bundle / "stages" / "t5.onnx.data").stat().st_size
    fp32_size = (bundle / "stages" / "t5.onnx.data").stat().st_size
    assert fp16_size <= 0.51 * fp32_size, (fp16_size, fp32_size)
    onnx.checker.check_model(str(fp16_bundle / "stages" / "t5.onnx"), full_check=True)
    assert onnx.TensorProto.FLOAT16 in {i.data_type for i in onnx.load(str(fp16_bundle / "stages" / "clip_l.onnx"),
                                                                       load_external_data=False).graph.initializer}


WO_SCALE = 1e5  # the tiny T5's feed-forward outputs then exceed fp16's 65504


def test_fp16_t5_survives_overflow(folder, tmp_path):
    """Regression: a T5 whose feed-forward output projections (`wo`) are scaled so that its activations exceed 65504.
    All in fp16 (transformers' module .half()) the feed-forward outputs are inf and the hidden states wrong; the fp16
    stage (residual stream, norms, softmax and wo in float32) stays finite and close to the float32 module."""
    from transformers import T5EncoderModel

    from slimengine.export.pipeline_export import export_t5
    from slimengine.export.t5_export import T5Source

    model = T5EncoderModel.from_pretrained(folder / "text_encoder_3", attn_implementation="eager").eval()
    with torch.no_grad():
        for block in model.encoder.block:
            block.layer[-1].DenseReluDense.wo.weight.mul_(WO_SCALE)
    model.save_pretrained(tmp_path / "t5")
    ids = torch.from_numpy(np.random.default_rng(3).integers(0, model.config.vocab_size, (2, T5_LENGTH)))
    with torch.no_grad():
        want = model(ids)[0].numpy()
        ff_outputs = []
        hooks = [b.layer[-1].DenseReluDense.register_forward_hook(lambda m, i, o: ff_outputs.append(o)) for b in model.encoder.block]
        naive = model.half()(ids)[0].float().numpy()
        for h in hooks:
            h.remove()
    assert np.isfinite(want).all()
    assert any(torch.isinf(o).any() for o in ff_outputs), "the naive fp16 module did not overflow: raise WO_SCALE"
    assert not np.isfinite(naive).all() or _rel(naive, want) > 0.2, _rel(naive, want)

    source = T5Source(tmp_path / "t5")
    export_t5(source.config, source.weights(), tmp_path / "t5.onnx", "fp16", T5_LENGTH)
    assert set(_weight_dtypes(tmp_path / "t5.onnx")) == {"FLOAT16"}
    got = _session(tmp_path / "t5.onnx").run(None, {"input_ids": ids.numpy()})[0]
    assert np.isfinite(got).all()
    assert _rel(got, want) < FP16_TOLERANCE, _rel(got, want)


def test_no_t5(folder, tmp_path):
    bundle = export(folder / "transformer", tmp_path / "no_t5.engine", "--pipeline", str(folder), "--no-t5")
    manifest = json.loads((bundle / "manifest.json").read_text())
    roles = [s["role"] for s in manifest["stages"]]
    assert "t5" not in roles and {"clip_l", "clip_g", "vae_decode"} <= set(roles)
    assert manifest["pipeline"]["t5"] is False
    assert [t["role"] for t in manifest["tokenizers"]] == ["clip_l", "clip_g"]
    with Engine(bundle) as engine:
        assert "t5" not in engine.stage_names


@pytest.mark.parametrize("remove, named", [("text_encoder_2", "text_encoder_2/ (CLIP-G text encoder)"), ("vae", "vae/ (VAE)"),
                                           ("tokenizer", "tokenizer/ (clip_l tokenizer)")])
def test_missing_component_refused(folder, tmp_path, remove, named):
    import shutil

    copy = tmp_path / "sd3"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns(remove))
    proc = run_cli("export-engine", str(copy), "-o", str(tmp_path / "x.engine"), "-q", check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("export-engine: error:")]
    assert len(lines) == 1 and named in lines[0] and "missing" in lines[0], proc.stderr
    assert not (tmp_path / "x.engine").exists()


def test_missing_t5_suggests_no_t5(folder, tmp_path):
    import shutil

    copy = tmp_path / "sd3"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("text_encoder_3"))
    proc = run_cli("export-engine", str(copy), "-o", str(tmp_path / "x.engine"), "-q", check=False)
    assert proc.returncode == 2 and "text_encoder_3/ (T5 text encoder)" in proc.stderr and "--no-t5" in proc.stderr


def test_no_t5_needs_a_pipeline(folder, tmp_path):
    proc = run_cli("export-engine", str(folder / "transformer"), "-o", str(tmp_path / "x.engine"), "--no-t5", check=False)
    assert proc.returncode == 2 and "--no-t5 needs a pipeline" in proc.stderr


def _clip_lengths(folder, lengths) -> None:
    for name, length in zip(("tokenizer", "tokenizer_2"), lengths):
        path = folder / name / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "model_max_length": length}))


def test_clip_length_comes_from_the_tokenizers(folder, tmp_path):
    """CLIP tokenizers with model_max_length 12 (diffusers' SD3 pipeline then pads and truncates CLIP prompts to 12): the
    encoder stages take 12 ids, the manifest says clip_length 12, the CLIP stages give diffusers' encoders' states, and
    the engine's image (one step, no CFG) is diffusers' StableDiffusion3Pipeline's from the same folder."""
    import shutil

    from diffusers import StableDiffusion3Pipeline

    copy = tmp_path / "sd3"
    shutil.copytree(folder, copy)
    _clip_lengths(copy, (12, 12))
    bundle = export(copy / "transformer", tmp_path / "short.engine", "--pipeline", str(copy), "--max-sequence-length", str(T5_LENGTH))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["pipeline"]["clip_length"] == 12
    for role in ("clip_l", "clip_g"):
        spec = next(s for s in manifest["stages"] if s["role"] == role)
        assert spec["inputs"][0]["shape"] == ["batch", 12] and spec["outputs"][0]["shape"][1] == 12
    assert {t["role"]: t["max_length"] for t in manifest["tokenizers"]} == {"clip_l": 12, "clip_g": 12, "t5": T5_LENGTH}
    pipe = StableDiffusion3Pipeline.from_pretrained(copy, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle on a blue square, and a long " + "very " * 20 + "long tail"
    noise = np.random.default_rng(3).standard_normal((1, 16, 8, 8)).astype(np.float32)
    with Engine(bundle) as engine:
        session = engine.session()
        result = session.generate(prompt=prompt, latents=noise, guidance_scale=1.0, num_steps=1)
        ids = engine.tokenize("clip_l", prompt)[None]
        hidden = session.run_stage("clip_l", {"input_ids": ids}, {"hidden_states": np.empty((1, 12, 32), np.float32),
                                                                   "pooled": np.empty((1, 24), np.float32)})["hidden_states"]
        session.close()
    with torch.no_grad():
        want_hidden = pipe.text_encoder(torch.from_numpy(ids), output_hidden_states=True).hidden_states[-2].numpy()
        want = pipe(prompt, latents=torch.from_numpy(noise), guidance_scale=1.0, num_inference_steps=1, height=64, width=64,
                    max_sequence_length=T5_LENGTH, output_type="np").images
    assert ids.shape == (1, 12) and _rel(hidden, want_hidden) < 1e-5
    diff = np.abs(result.image.astype(np.int16) - (want[0] * 255).round().astype(np.int16))
    assert result.image.shape == (64, 64, 3) and diff.mean() <= 0.5 and diff.max() <= 2, (diff.mean(), diff.max())


def test_t5_tokenizer_folder_with_only_tokenizer_json(folder, tmp_path):
    """A pipeline folder whose tokenizer_3/ holds only tokenizer.json (as T5TokenizerFast.save_pretrained writes it today,
    no spiece.model) exports, and the engine's image from a prompt is diffusers' StableDiffusion3Pipeline's from the
    same folder."""
    import shutil

    from diffusers import StableDiffusion3Pipeline

    from tests.tokenizer_files import make_t5_json_only

    copy = tmp_path / "sd3"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "tokenizer_3")
    make_t5_json_only(folder / "tokenizer_3", copy / "tokenizer_3")
    assert sorted(p.name for p in (copy / "tokenizer_3").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    bundle = export(copy / "transformer", tmp_path / "t5json.engine", "--pipeline", str(copy), "--max-sequence-length", str(T5_LENGTH))
    pipe = StableDiffusion3Pipeline.from_pretrained(copy, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle on a blue square </s> café, 東京 ﬁ  ramen"
    noise = np.random.default_rng(4).standard_normal((1, 16, 8, 8)).astype(np.float32)
    with Engine(bundle) as engine:
        result = engine.session().generate(prompt=prompt, latents=noise, guidance_scale=1.0, num_steps=1)
    with torch.no_grad():
        want = pipe(prompt, latents=torch.from_numpy(noise), guidance_scale=1.0, num_inference_steps=1, height=64, width=64,
                    max_sequence_length=T5_LENGTH, output_type="np").images
    diff = np.abs(result.image.astype(np.int16) - (want[0] * 255).round().astype(np.int16))
    assert result.image.shape == (64, 64, 3) and diff.mean() <= 0.5 and diff.max() <= 2, (diff.mean(), diff.max())


def test_clip_tokenizers_of_different_lengths_refused(folder, tmp_path):
    import shutil

    copy = tmp_path / "sd3"
    shutil.copytree(folder, copy)
    _clip_lengths(copy, (77, 12))
    proc = run_cli("export-engine", str(copy), "-o", str(tmp_path / "x.engine"), "-q", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "the CLIP tokenizers disagree on their length (model_max_length: tokenizer/ 77, tokenizer_2/ 12)" in proc.stderr
    assert not (tmp_path / "x.engine").exists()


@pytest.mark.parametrize("component, message", [("text_encoder", "the CLIP-L text encoder's weight"),
                                                ("text_encoder_3", "T5 weight"), ("vae", "the VAE's weight")])
def test_nan_weights_in_a_component_are_refused(folder, tmp_path, component, message):
    """A folder's encoder or VAE with a NaN weight was exported as it was: NaN conditioning (a NUMERICS error naming the
    sampling step), or with the VAE silently black images. Now refused, naming the weight; nothing is written."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "pipeline"
    shutil.copytree(folder, copy)
    weights = next((copy / component).glob("*.safetensors"))
    state = load_file(weights)
    key = next(k for k, v in state.items() if v.dim() >= 2)
    state[key][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    out = tmp_path / "x.engine"
    proc = run_cli("export-engine", str(copy), "-o", str(out), "-q", "--max-sequence-length", str(PIPELINE_T5_LENGTH), check=False)
    assert proc.returncode == 2 and message in proc.stderr and "contains NaN or Inf" in proc.stderr, proc.stderr[-1000:]
    assert not out.exists()


# --- usage errors: one line naming the file and the field, exit 2, nothing written, in seconds --------------------


def _export_in_process(capsys, folder, out, *args) -> tuple[int, list[str], float]:
    """export-engine's main(argv) in this process (no interpreter start): (exit code, its error lines, seconds)."""
    import time

    from slimengine.export.cli import main

    capsys.readouterr()
    start = time.perf_counter()
    code = main([str(folder), "-o", str(out), "-q", "--max-sequence-length", str(T5_LENGTH), *args])
    seconds = time.perf_counter() - start
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("export-engine: error:")]
    return code, errors, seconds


def _edit_json(path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _refused_quickly(capsys, copy, tmp_path, *needles, limit=5.0) -> str:
    out = tmp_path / "x.engine"
    code, errors, seconds = _export_in_process(capsys, copy, out)
    assert code == 2 and len(errors) == 1, (code, errors)
    assert all(n in errors[0] for n in needles), errors[0]
    assert seconds < limit, f"refused after {seconds:.1f} s: {errors[0]}"
    assert not out.exists() and not list(tmp_path.glob("x.engine*")) and not list(tmp_path.glob(".x.engine*"))
    return errors[0]


@pytest.mark.parametrize("component, field, value", [("text_encoder", "num_hidden_layers", 10**7), ("text_encoder_2", "num_hidden_layers", 4),
                                                     ("text_encoder_3", "num_layers", 10**6), ("vae", "layers_per_block", 10**6)])
def test_absurd_layer_count_refused_in_seconds(folder, tmp_path, capsys, component, field, value):
    """A component config claiming more (or other) layers than its weights hold was built first (a CLIP of 10^7 layers ran
    past 200 s, a T5 of 10^6 was refused after 178 s): now checked against the weights' keys before any module is built."""
    import shutil

    copy = tmp_path / "sd3"
    shutil.copytree(folder, copy)
    _edit_json(copy / component / "config.json", **{field: value})
    _refused_quickly(capsys, copy, tmp_path, f"{component}/config.json", f"{field} {value}")


def _edit_weights(folder, edit) -> str:
    from safetensors.torch import load_file, save_file

    weights = next(folder.glob("*.safetensors"))
    state = load_file(weights)
    key = edit(state)
    save_file(state, weights, metadata={"format": "pt"})
    return key


def _drop_one(state) -> str:
    key = sorted(k for k in state if "layers.1." in k or "block.1." in k or "up_blocks.1." in k)[0]
    del state[key]
    return key


def _add_one(state) -> str:
    state["encoder.extra.weight"] = torch.zeros(3)
    return "encoder.extra.weight"


@pytest.mark.parametrize("component, edit", [("text_encoder", _drop_one), ("text_encoder_2", _add_one), ("text_encoder_3", _drop_one),
                                             ("text_encoder_3", _add_one), ("vae", _drop_one), ("vae", _add_one)])
def test_missing_or_extra_component_weight_refused(folder, tmp_path, capsys, component, edit):
    """A folder's encoder or VAE with a weight missing (transformers initialised it at random) or one the model has no
    place for (dropped) exported silently: now refused, naming the key."""
    import shutil

    copy = tmp_path / "sd3"
    shutil.copytree(folder, copy)
    key = _edit_weights(copy / component, edit)
    line = _refused_quickly(capsys, copy, tmp_path, f"{component}", key)
    assert ("missing" if edit is _drop_one else "unexpected") in line, line


@pytest.mark.parametrize("name", ["vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "tokenizer_3/spiece.model"])
def test_a_fifo_in_a_component_folder_is_refused_at_once(folder, tmp_path, capsys, name):
    """A FIFO where a component's weights, config or vocab belong blocked the exporter's reader (the VAE's weights: past
    90 s); now one line naming it, exit 2, before any file is read."""
    import os
    import shutil

    copy = tmp_path / "sd3"
    shutil.copytree(folder, copy)
    (copy / name).unlink()
    os.mkfifo(copy / name)
    _refused_quickly(capsys, copy, tmp_path, name, "not a regular file")


@pytest.mark.parametrize("component, edit, needles", [
    ("vae", {"scaling_factor": 0}, ["vae/config.json", "scaling_factor"]),
    ("vae", {"scaling_factor": float("nan")}, ["vae/config.json", "scaling_factor"]),
    ("vae", {"scaling_factor": 1e-50}, ["vae/config.json", "scaling_factor"]),
    ("vae", {"shift_factor": float("inf")}, ["vae/config.json", "shift_factor"]),
    ("vae", {"block_out_channels": [8] * 8, "down_block_types": ["DownEncoderBlock2D"] * 8}, ["vae/config.json", "block_out_channels"]),
    ("tokenizer", {"model_max_length": 0}, ["tokenizer/tokenizer_config.json", "model_max_length 0"]),
    ("tokenizer", {"model_max_length": -5}, ["tokenizer/tokenizer_config.json", "model_max_length -5"]),
    ("tokenizer_2", {"model_max_length": 9.5}, ["tokenizer_2/tokenizer_config.json", "model_max_length 9.5"]),
])
def test_pipeline_numbers_the_runtime_refuses_are_refused_at_export(folder, tmp_path, capsys, component, edit, needles):
    """Numbers the runtime's open refuses (runtime/src/manifest.cpp: a VAE scaling_factor 0 or NaN, ...) or transformers
    and torch fail on late (model_max_length 0, -5, 9.5) exported, or failed with a traceback after 40-77 s: now one
    line naming the file and the field, before any work."""
    import shutil

    copy = tmp_path / "sd3"
    shutil.copytree(folder, copy)
    config = copy / component / ("config.json" if component == "vae" else "tokenizer_config.json")
    _edit_json(config, **edit)
    _refused_quickly(capsys, copy, tmp_path, *needles)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_spiece_model_refused_at_once(folder, tmp_path, capsys, damage):
    """A corrupt or truncated tokenizer_3/spiece.model failed after the whole export with transformers' "`tiktoken` is
    required...": now one line naming the file, before any work."""
    import shutil

    copy = tmp_path / "sd3"
    shutil.copytree(folder, copy)
    spiece = copy / "tokenizer_3" / "spiece.model"
    data = spiece.read_bytes()
    spiece.write_bytes(b"not a sentencepiece model \x00\xff" * 10 if damage == "garbage" else data[: len(data) // 2])
    _refused_quickly(capsys, copy, tmp_path, "tokenizer_3/spiece.model")


@pytest.mark.parametrize("length, args", [(0, ()), (513, ()), (1, ("--no-t5",))])
def test_max_sequence_length_out_of_range_refused_at_once(folder, tmp_path, capsys, length, args):
    """--max-sequence-length outside T5's 2..512 failed after the whole export (the T5 tokenizer's check), or with
    --no-t5 wrote a bundle whose pipeline.max_sequence_length the runtime's open refuses: now refused first."""
    out = tmp_path / "x.engine"
    code, errors, seconds = _export_in_process(capsys, folder, out, "--max-sequence-length", str(length), *args)
    assert code == 2 and errors == [f"export-engine: error: --max-sequence-length must be from 2 to 512 (T5 tokens), got {length}"], errors
    assert seconds < 5 and not out.exists()


def test_clip_wider_than_t5_matches_diffusers(tmp_path):
    """diffusers' own dummy SD3 components (CLIP-L + CLIP-G hidden 32 + 32 wider than T5's and joint_attention_dim 32)
    run in StableDiffusion3Pipeline: its encode_prompt pads the CLIP concatenation to T5's width with F.pad, and a
    negative pad truncates it. The exporter refused them; now the engine keeps the first joint_attention_dim features,
    and its image (two steps, CFG 5, as diffusers' dummy inputs) is diffusers' pipeline's from the same folder."""
    from diffusers import StableDiffusion3Pipeline

    from tests.pipeline_files import make_sd3_pipeline

    folder = make_sd3_pipeline(tmp_path / "dummy", preset="diffusers")
    bundle = export(folder, tmp_path / "dummy.engine", "--max-sequence-length", str(T5_LENGTH))
    pipeline = json.loads((bundle / "manifest.json").read_text())["pipeline"]
    assert (pipeline["clip_l_dim"], pipeline["clip_g_dim"], pipeline["joint_attention_dim"]) == (32, 32, 32)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompt = "A painting of a squirrel eating a burger"
    noise = np.random.default_rng(4).standard_normal((1, 4, 32, 32)).astype(np.float32)
    with Engine(bundle) as engine:
        session = engine.session()
        result = session.generate(prompt=prompt, latents=noise, guidance_scale=5.0, num_steps=2)
        session.close()
    with torch.no_grad():
        want = pipe(prompt, latents=torch.from_numpy(noise), guidance_scale=5.0, num_inference_steps=2, height=32, width=32,
                    max_sequence_length=T5_LENGTH, output_type="np").images
    diff = np.abs(result.image.astype(np.int16) - (want[0] * 255).round().astype(np.int16))
    assert result.image.shape == (32, 32, 3) and diff.mean() <= 0.5 and diff.max() <= 2, (diff.mean(), diff.max())
