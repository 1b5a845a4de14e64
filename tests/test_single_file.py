"""SD3 single-file checkpoints with the text encoders and the VAE (export/single_file.py, docs/pipeline.md): a file in the
original layout (model.diffusion_model.*, text_encoders.clip_l/clip_g/t5xxl.transformer.*, first_stage_model.*) written
here from the tiny pipeline's components, exported with --tokenizers, against the folder's bundle and diffusers' modules."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from slimengine import Engine
from slimengine.tools.make_sd3_checkpoint import to_original_keys
from tests.conftest import PIPELINE_T5_LENGTH, export, run_cli
from tests.pipeline_files import NEGATIVES, PROMPTS, SCALING, SCHEDULER_SHIFT, SHIFT_FACTOR

T5_LENGTH = PIPELINE_T5_LENGTH
# What the tiny components' shapes cannot tell (SD3's own values are the defaults): the file's metadata says it.
COMPONENT_METADATA = {"clip_l": {"num_attention_heads": 2, "hidden_act": "gelu"}, "clip_g": {"num_attention_heads": 2, "hidden_act": "gelu"},
                      "vae": {"norm_num_groups": 4}}


def vae_to_ldm(state: dict, blocks: int) -> dict:
    """diffusers AutoencoderKL names -> the original LDM names under first_stage_model. (the inverse of diffusers'
    convert_ldm_vae_checkpoint, written from the tables of diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py:
    up blocks numbered in reverse, resnets as block, mid resnets as block_1/2, attention as 1x1 convolutions)."""
    out = {}
    for key, value in state.items():
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", key)
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", n)
        m = re.match(r"^decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\.(.*)$", n)
        if m:
            up = blocks - 1 - int(m.group(1))
            n = f"decoder.up.{up}." + (f"block.{m.group(2)}." if m.group(2) is not None else "upsample.") + m.group(3)
        n = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", n)
        n = n.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if ".mid_block.attentions.0." in n:
            n = n.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            for a, b in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")):
                n = n.replace(a, b)
            if value.ndim == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + n] = value
    return out


def single_file_state(folder) -> dict:
    """The tiny pipeline's transformer, CLIP-L, CLIP-G, T5 and VAE in the original single-file layout."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    transformer = SD3Transformer2DModel.from_pretrained(folder / "transformer")
    state = {k: v for k, v in to_original_keys(transformer.state_dict(), transformer.config.num_layers).items()}
    for name, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        for k, v in CLIPTextModelWithProjection.from_pretrained(folder / sub).state_dict().items():
            state[f"text_encoders.{name}.transformer.{k}"] = v
    for k, v in T5EncoderModel.from_pretrained(folder / "text_encoder_3").state_dict().items():
        if k != "encoder.embed_tokens.weight":  # tied to shared.weight; SD3 files store it once
            state[f"text_encoders.t5xxl.transformer.{k}"] = v
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    state.update(vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    return {k: v.contiguous().clone() for k, v in state.items()}


def write_single_file(path, state: dict, components: dict | None = COMPONENT_METADATA):
    from safetensors.torch import save_file

    metadata = {"num_attention_heads": 2, "sample_size": 8, **({"components": components} if components else {})}
    save_file(state, str(path), metadata={"slimengine": json.dumps(metadata)})
    return path


@pytest.fixture(scope="module")
def state(sd3_pipeline):
    return single_file_state(sd3_pipeline)


@pytest.fixture(scope="module")
def single_file(sd3_pipeline, state):
    return write_single_file(sd3_pipeline.parent / "sd3-incl-encoders.safetensors", state)


@pytest.fixture(scope="module")
def bundle(sd3_pipeline, single_file):
    """The single file with the folder's tokenizers, and the folder's scheduler shift (a single file has none); --verify
    runs every stage, T5 included (whose weights the single file gives as a loaded module, not a folder), against PyTorch."""
    return export(single_file, single_file.parent / "sd3-single.engine", "--tokenizers", str(sd3_pipeline), "--shift", str(SCHEDULER_SHIFT),
                  "--max-sequence-length", str(T5_LENGTH), "--verify")


def _run(bundle, stage, feed):
    import onnxruntime as ort

    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = next(s for s in manifest["stages"] if s["name"] == stage)
    session = ort.InferenceSession(str(bundle / spec["file"]), providers=["CPUExecutionProvider"])
    return dict(zip([t["name"] for t in spec["outputs"]], session.run(None, feed)))


def _rel(got, want) -> float:
    want = np.asarray(want, dtype=np.float32)
    return float(np.abs(np.asarray(got) - want).max() / max(np.abs(want).max(), 1e-6))


def test_manifest_like_the_folder_bundle(bundle, sd3_pipeline_bundle, single_file):
    got, want = (json.loads((b / "manifest.json").read_text()) for b in (bundle, sd3_pipeline_bundle))
    assert [(s["name"], s["role"], s["inputs"], s["outputs"]) for s in got["stages"]] == \
           [(s["name"], s["role"], s["inputs"], s["outputs"]) for s in want["stages"]]
    assert got["pipeline"] == {**want["pipeline"], "source": str(single_file)}
    assert got["tokenizers"] == want["tokenizers"] and got["config"] == want["config"]
    assert got["program"] == want["program"]  # --shift gave the folder scheduler's shift


def test_stages_equal_the_folder_export_and_diffusers(bundle, sd3_pipeline_bundle, sd3_pipeline):
    """tokens -> hidden states for each encoder, latents -> image for the VAE: the single file's stages against the
    folder bundle's and against transformers' / diffusers' modules loaded from the folder."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    rng = np.random.default_rng(0)
    with Engine(bundle) as engine:
        for role, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5", "text_encoder_3")):
            ids = np.stack([engine.tokenize(role, p) for p in PROMPTS + NEGATIVES]).astype(np.int64)
            got, folder = _run(bundle, role, {"input_ids": ids}), _run(sd3_pipeline_bundle, role, {"input_ids": ids})
            if role == "t5":
                module = T5EncoderModel.from_pretrained(sd3_pipeline / sub, attn_implementation="eager").eval()
                with torch.no_grad():
                    want = {"hidden_states": module(torch.from_numpy(ids))[0]}
            else:
                module = CLIPTextModelWithProjection.from_pretrained(sd3_pipeline / sub).eval()
                with torch.no_grad():
                    r = module(torch.from_numpy(ids), output_hidden_states=True)
                want = {"hidden_states": r.hidden_states[-2], "pooled": r.text_embeds}
            for name, w in want.items():
                assert _rel(got[name], w) < 1e-5, (role, name, _rel(got[name], w))
                assert _rel(got[name], folder[name]) < 1e-5, (role, name)
    latents = rng.standard_normal((2, 16, 5, 7)).astype(np.float32) / SCALING + SHIFT_FACTOR
    got, folder = _run(bundle, "vae_decode", {"latents": latents})["image"], _run(sd3_pipeline_bundle, "vae_decode", {"latents": latents})["image"]
    with torch.no_grad():
        want = AutoencoderKL.from_pretrained(sd3_pipeline / "vae").decode(torch.from_numpy(latents), return_dict=False)[0]
    assert got.shape == (2, 3, 40, 56) and _rel(got, want) < 1e-5 and _rel(got, folder) < 1e-5


def test_prompt_to_image_equals_the_folder_bundle(bundle, sd3_pipeline_bundle):
    """The same weights through the single file: the same bits as the folder's bundle, prompts to uint8 image, CFG on."""
    noise = np.random.default_rng(3).standard_normal((2, 16, 8, 10)).astype(np.float32)
    results = []
    for b in (bundle, sd3_pipeline_bundle):
        with Engine(b) as engine:
            session = engine.session()
            results.append(session.generate(prompt=PROMPTS, negative_prompt=NEGATIVES, latents=noise, guidance_scale=5.0, num_steps=4))
            session.close()
    assert results[0].image.shape == (2, 64, 80, 3)
    assert np.array_equal(results[0].image, results[1].image) and np.array_equal(results[0].latents, results[1].latents)


def test_half_precision_pt_file_and_no_t5(sd3_pipeline, sd3_pipeline_bundle, state, tmp_path):
    """A .pt file (torch.load weights_only) in float16, as released files are, with --no-t5: the file's T5 is dropped;
    the encoders are read as float32 from the float16 weights, so they equal the folder's within float16's rounding."""
    path = tmp_path / "sd3-incl-encoders-fp16.pt"
    torch.save({"state_dict": {k: v.half() for k, v in state.items()},
                "slimengine": {"num_attention_heads": 2, "sample_size": 8, "components": COMPONENT_METADATA}}, path)
    bundle = export(path, tmp_path / "no-t5.engine", "--tokenizers", str(sd3_pipeline), "--no-t5", "--max-sequence-length", str(T5_LENGTH))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "t5" not in [s["role"] for s in manifest["stages"]] and manifest["pipeline"]["t5"] is False
    assert [t["role"] for t in manifest["tokenizers"]] == ["clip_l", "clip_g"] and manifest["precision"] == "fp32"
    with Engine(bundle) as engine:
        ids = np.stack([engine.tokenize("clip_g", p) for p in PROMPTS]).astype(np.int64)
        result = engine.session().generate(prompt=PROMPTS[0], seed=1, num_steps=2, guidance_scale=3.0)
    got, want = _run(bundle, "clip_g", {"input_ids": ids}), _run(sd3_pipeline_bundle, "clip_g", {"input_ids": ids})
    assert 0 < _rel(got["hidden_states"], want["hidden_states"]) < 1e-2 and _rel(got["pooled"], want["pooled"]) < 1e-2
    assert set(result.stats["encoder_calls"]) == {"clip_l", "clip_g"} and result.image.shape == (64, 64, 3)


def _refused(path, tmp_path, *args) -> str:
    proc = run_cli("export-engine", str(path), "-o", str(tmp_path / "x.engine"), "-q", *args, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("export-engine: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert not (tmp_path / "x.engine").exists()
    return lines[0]


def _variant(tmp_path, state, drop=(), replace=None, components=COMPONENT_METADATA):
    kept = {k: v for k, v in state.items() if not k.startswith(tuple(drop))}
    kept.update(replace or {})
    return write_single_file(tmp_path / "variant.safetensors", kept, components)


@pytest.mark.parametrize("drop, named", [(("text_encoders.clip_g.",), "not CLIP-G (text_encoders.clip_g.transformer.*)"),
                                         (("first_stage_model.", "text_encoders.clip_l."), "has CLIP-G, T5 but not CLIP-L")])
def test_some_encoders_but_not_others(tmp_path, state, sd3_pipeline, drop, named):
    line = _refused(_variant(tmp_path, state, drop), tmp_path, "--tokenizers", str(sd3_pipeline))
    assert named in line and "CLIP-L, CLIP-G and the VAE together" in line, line


def test_no_t5_in_the_file_needs_no_t5(tmp_path, state, sd3_pipeline):
    line = _refused(_variant(tmp_path, state, ("text_encoders.t5xxl.",)), tmp_path, "--tokenizers", str(sd3_pipeline))
    assert "has no T5 encoder" in line and "--no-t5" in line


def test_encoders_without_tokenizers(single_file, tmp_path):
    line = _refused(single_file, tmp_path)
    assert "carries no tokenizers" in line and "--tokenizers FOLDER" in line


def test_tokenizer_folder_lacking_t5(single_file, sd3_pipeline, tmp_path):
    import shutil

    shutil.copytree(sd3_pipeline / "tokenizer", tmp_path / "toks" / "tokenizer")
    shutil.copytree(sd3_pipeline / "tokenizer_2", tmp_path / "toks" / "tokenizer_2")
    line = _refused(single_file, tmp_path, "--tokenizers", str(tmp_path / "toks"))
    assert "missing tokenizer_3/" in line and "--no-t5" in line


def test_pipeline_flag_with_a_complete_file(single_file, sd3_pipeline, tmp_path):
    line = _refused(single_file, tmp_path, "--pipeline", str(sd3_pipeline))
    assert "has its own text encoders and VAE" in line and "--tokenizers FOLDER" in line


def test_contradicting_shapes(tmp_path, state, sd3_pipeline):
    # one CLIP-G layer wider than the others imply
    key = "text_encoders.clip_g.transformer.text_model.encoder.layers.1.mlp.fc1.weight"
    line = _refused(_variant(tmp_path, state, replace={key: torch.zeros(7, 48)}), tmp_path, "--tokenizers", str(sd3_pipeline))
    assert key in line and "has shape [7, 48], expected [96, 48] for the CLIP-G" in line, line
    # a T5 of its own, consistent, but 80 wide where the transformer takes 96
    from transformers import T5Config, T5EncoderModel

    t5 = T5EncoderModel(T5Config(vocab_size=state["text_encoders.t5xxl.transformer.shared.weight"].shape[0], d_model=80, d_kv=16, d_ff=64,
                                 num_layers=2, num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu"))
    other = {f"text_encoders.t5xxl.transformer.{k}": v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    line = _refused(_variant(tmp_path, state, drop=("text_encoders.t5xxl.",), replace=other), tmp_path, "--tokenizers", str(sd3_pipeline))
    assert "T5's d_model 80 is not the transformer's joint_attention_dim 96" in line, line
    # the VAE's latent channels against the transformer's
    vae = {k: v for k, v in state.items() if k.startswith("first_stage_model.decoder.conv_in.")}
    wrong = {"first_stage_model.decoder.conv_in.weight": torch.zeros(vae["first_stage_model.decoder.conv_in.weight"].shape[0], 8, 3, 3)}
    line = _refused(_variant(tmp_path, state, replace=wrong), tmp_path, "--tokenizers", str(sd3_pipeline))
    assert "VAE" in line and "expected" in line, line


@pytest.mark.parametrize("field, value", [("scaling_factor", 0), ("scaling_factor", "NaN"), ("shift_factor", 1e300)])
def test_vae_numbers_the_runtime_refuses_are_refused_at_export(tmp_path, state, sd3_pipeline, field, value):
    """A VAE scaling_factor 0 (or NaN, or a shift_factor beyond float32) from the file's metadata was exported into a
    bundle that the runtime's open refuses: now one line naming the metadata field, before any work."""
    components = {**COMPONENT_METADATA, "vae": {**COMPONENT_METADATA["vae"], field: float(value)}}
    line = _refused(_variant(tmp_path, state, components=components), tmp_path, "--tokenizers", str(sd3_pipeline),
                    "--max-sequence-length", str(T5_LENGTH))
    assert f"metadata components.vae.{field}" in line and "float32" in line, line


def test_heads_the_shapes_cannot_tell(tmp_path, state, sd3_pipeline):
    """Without the metadata, CLIP's heads are 64 wide (SD3's): a width of 32 cannot be split, said in one line."""
    line = _refused(_variant(tmp_path, state, components=None), tmp_path, "--tokenizers", str(sd3_pipeline))
    assert "CLIP-L's width 32 cannot be split into heads of 64" in line and "components.clip_l.num_attention_heads" in line


def test_sd3_shapes_give_sd3_configs(sd3_pipeline, tmp_path):
    """Weights of SD3 Medium's shapes (on the meta device: no memory) give its configs for CLIP-L/G, T5-XXL and the
    VAE, with no metadata: what the shapes cannot tell defaults to SD3's values."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from slimengine.export.single_file import clip_config, t5_config, vae_config

    path = tmp_path / "sd3_medium_incl_clips_t5xxlfp16.safetensors"
    clip = {"clip_l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"),
            "clip_g": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu")}
    for role, real in clip.items():
        with torch.device("meta"):
            model = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, projection_dim=real["hidden_size"], **real))
        raw = {f"text_encoders.{role}.transformer.{k}": v for k, v in model.state_dict().items()}
        if role == "clip_l":  # SD3's CLIP-L is used unprojected: a file may have no projection
            raw.pop("text_encoders.clip_l.transformer.text_projection.weight")
        config, weights = clip_config(path, role, raw, sd3_pipeline / "tokenizer", {})
        assert {k: getattr(config, k) for k in real} == real, role
        assert (config.vocab_size, config.projection_dim, config.max_position_embeddings, config.layer_norm_eps) == (49408, real["hidden_size"], 77, 1e-5)
        if role == "clip_l":
            assert torch.equal(weights["text_projection.weight"], torch.eye(768))
    real = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
                relative_attention_max_distance=128, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**real))
    raw = {f"text_encoders.t5xxl.transformer.{k}": v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    config, _ = t5_config(path, raw, {})
    assert {k: getattr(config, k) for k in real} == real and config.dense_act_fn == "gelu_new" and config.is_gated_act
    real = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                norm_num_groups=32, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    with torch.device("meta"):
        model = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **real)
    config, weights = vae_config(path, vae_to_ldm(model.state_dict(), 4), {})
    assert {k: config[k] for k in real} == real and set(weights) == set(model.state_dict())
