"""X-Slim token-level reuse of a joint block (export/token_block.py) against diffusers' own block.

diffusers' `JointTransformerBlock` is the ground truth for every output; the image tokens' keys and
values are taken from hooks on the block's own attention modules. Tolerances are absolute, on
outputs of magnitude ~10.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from diffusers.models.attention import JointTransformerBlock

from slimengine import _native
from slimengine.export.sd3_model import DistilledSD3, SD3Config
from slimengine.export.token_block import (
    DOMAIN,
    KVBlockStage,
    TokenBlockStage,
    gather_tokens,
    kv_stage_spec,
    scatter_tokens,
    token_example_inputs,
    token_stage_spec,
    trace_kv_block,
    trace_token_block,
)

LAST = 2  # num_layers 3: blocks 0 and 1 are plain, 2 is the last (context_pre_only)


def small_model(qk_norm: str | None) -> DistilledSD3:
    config = SD3Config(num_layers=3, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2,
                       joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=16, pos_embed_max_size=16, qk_norm=qk_norm)
    torch.manual_seed(0)
    model = DistilledSD3(config, with_compensation=False).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # no zero-initialised weights: random everywhere, qk-norm scales around 1
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15 + (1.0 if ".norm_" in name else 0.0))
    return model


@pytest.fixture(scope="module")
def models() -> dict:
    return {qk: small_model(qk) for qk in (None, "rms_norm")}


def block_inputs(model: DistilledSD3, batch: int, tokens: int, text: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    d, dc = model.config.inner_dim, model.config.caption_projection_dim
    return torch.randn(batch, tokens, d, generator=g), torch.randn(batch, text, dc, generator=g), torch.randn(batch, d, generator=g)


def diffusers_block(block, img, txt, temb):
    """diffusers' output (img, txt or None) and the image tokens' K and V as its attention used them, [B, N, D]."""
    attn, seen = block.attn, {}

    def keep(name):
        def hook(module, args, out):
            seen[name] = out if out.dim() == 3 else out.transpose(1, 2).flatten(2)  # norm_k works on [B, H, N, d]
        return hook

    handles = [(attn.norm_k or attn.to_k).register_forward_hook(keep("k")), attn.to_v.register_forward_hook(keep("v"))]
    try:
        with torch.no_grad():
            txt_out, img_out = block(hidden_states=img, encoder_hidden_states=txt, temb=temb)
    finally:
        for h in handles:
            h.remove()
    return img_out, txt_out, seen["k"], seen["v"]


def random_subsets(batch: int, tokens: int, count: int, seed: int, ascending: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(tokens, generator=g)[:count] for _ in range(batch)]
    return torch.stack([r.sort().values if ascending else r for r in rows])


def rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))


def other_rows_mask(idx: torch.Tensor, tokens: int) -> torch.Tensor:
    mask = torch.ones(idx.shape[0], tokens, dtype=torch.bool)
    mask[torch.arange(idx.shape[0])[:, None], idx] = False
    return mask


def max_err(got, expected) -> float:
    return float((torch.as_tensor(got) - torch.as_tensor(expected)).abs().max())


def test_gather_and_scatter_ops_move_token_rows_like_the_kernels():
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((2, 10, 4), dtype=np.float32)
    idx = np.array([[9, 1, 4], [0, 3, 2]], np.int64)
    values = rng.standard_normal((2, 3, 4), dtype=np.float32)
    gathered = gather_tokens(torch.from_numpy(cache), torch.from_numpy(idx))
    np.testing.assert_array_equal(gathered.numpy(), np.take_along_axis(cache, idx[:, :, None], axis=1))
    expected = cache.copy()
    for b in range(2):
        expected[b, idx[b]] = values[b]
    scattered = scatter_tokens(torch.from_numpy(cache), torch.from_numpy(idx), torch.from_numpy(values))
    np.testing.assert_array_equal(scattered.numpy(), expected)
    assert not np.array_equal(cache, expected), "scatter must not write into its cache input"
    with pytest.raises((IndexError, RuntimeError)):
        gather_tokens(torch.from_numpy(cache), torch.tensor([[10]]).expand(2, 1).contiguous())


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
@pytest.mark.parametrize("index", [0, LAST])
def test_kv_stage_gives_diffusers_block_output_and_its_image_keys_values(models, qk_norm, index):
    model = models[qk_norm]
    block = model.transformer.transformer_blocks[index]
    img, txt, temb = block_inputs(model, batch=2, tokens=20, text=7, seed=index)
    ref_img, ref_txt, ref_k, ref_v = diffusers_block(block, img, txt, temb)
    with torch.no_grad():
        out = KVBlockStage(block, torch.float32)(img, txt, temb)
    if index == LAST:
        assert ref_txt is None and len(out) == 3
    else:
        assert len(out) == 4
        err = max_err(out[1], ref_txt)
        print(f"txt_out vs diffusers: {err:.2e}")
        assert err <= 1e-5
    errs = [max_err(out[0], ref_img), max_err(out[-2], ref_k), max_err(out[-1], ref_v)]
    print(f"img_out / img_k / img_v vs diffusers: {errs}")
    assert max(errs) <= 1e-5 and out[-2].shape == img.shape


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
@pytest.mark.parametrize("index", [0, LAST])
@pytest.mark.parametrize("ascending", [True, False])
def test_token_stage_recomputes_the_subset_exactly_and_reuses_the_residual_elsewhere(models, qk_norm, index, ascending):
    """With K/V caches from the same input, the selected rows equal the full block's; the others are
    img + residual_cache; the text stream equals diffusers'. Index order is free (distinct indices)."""
    model = models[qk_norm]
    block = model.transformer.transformer_blocks[index]
    img, txt, temb = block_inputs(model, batch=2, tokens=24, text=6, seed=10 + index)
    ref_img, ref_txt, _, _ = diffusers_block(block, img, txt, temb)
    idx = random_subsets(2, 24, 9, seed=3, ascending=ascending)
    residual = torch.randn(img.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        k_cache, v_cache = KVBlockStage(block, torch.float32)(img, txt, temb)[-2:]
        out = TokenBlockStage(block, torch.float32)(img, txt, temb, idx, k_cache, v_cache, residual)
    assert len(out) == (1 if index == LAST else 2) and out[0].shape == img.shape
    subset_err = max_err(rows(out[0], idx), rows(ref_img, idx))
    mask = other_rows_mask(idx, 24)
    reuse_err = max_err(out[0][mask], (img + residual)[mask])
    print(f"subset rows vs diffusers: {subset_err:.2e}; other rows vs img + residual: {reuse_err:.2e}")
    assert subset_err <= 1e-5 and reuse_err <= 1e-6
    if index != LAST:
        txt_err = max_err(out[1], ref_txt)
        print(f"txt_out vs diffusers: {txt_err:.2e}")
        assert txt_err <= 1e-5


@pytest.mark.parametrize("index", [0, LAST])
def test_token_stage_attends_over_the_cached_keys_values(models, index):
    """Caches from another input change the recomputed tokens: the cache inputs are really used."""
    model = models["rms_norm"]
    block = model.transformer.transformer_blocks[index]
    img, txt, temb = block_inputs(model, batch=2, tokens=24, text=6, seed=20)
    stale_img, _, _ = block_inputs(model, batch=2, tokens=24, text=6, seed=21)
    ref_img, ref_txt, _, _ = diffusers_block(block, img, txt, temb)
    idx = random_subsets(2, 24, 8, seed=5, ascending=True)
    with torch.no_grad():
        k_stale, v_stale = KVBlockStage(block, torch.float32)(stale_img, txt, temb)[-2:]
        fresh_k, fresh_v = KVBlockStage(block, torch.float32)(img, txt, temb)[-2:]
        stage = TokenBlockStage(block, torch.float32)
        zeros = torch.zeros_like(img)
        with_stale_k = stage(img, txt, temb, idx, k_stale, fresh_v, zeros)
        with_stale_v = stage(img, txt, temb, idx, fresh_k, v_stale, zeros)
    for out in (with_stale_k, with_stale_v):
        diff = max_err(rows(out[0], idx), rows(ref_img, idx))
        print(f"subset rows with a stale cache vs the full block: {diff:.2e}")
        assert diff > 1e-2
        if index != LAST:
            assert max_err(out[1], ref_txt) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_stages_keep_float32_boundaries_and_agree_on_the_subset(models, dtype):
    """The custom ops see float32 only; the subset rows of the token stage equal the KV stage's in the
    same precision, and both stay close to diffusers in float32."""
    import copy

    model = copy.deepcopy(models["rms_norm"]).to(dtype)
    block, block32 = model.transformer.transformer_blocks[0], models["rms_norm"].transformer.transformer_blocks[0]
    img, txt, temb = block_inputs(model, batch=2, tokens=24, text=6, seed=30)
    ref_img, _, _, _ = diffusers_block(block32, img, txt, temb)
    idx = random_subsets(2, 24, 9, seed=6, ascending=True)
    with torch.no_grad():
        kv = KVBlockStage(block, dtype)(img, txt, temb)
        out = TokenBlockStage(block, dtype)(img, txt, temb, idx, kv[-2], kv[-1], torch.zeros_like(img))
    assert all(t.dtype == torch.float32 for t in (*kv, *out))
    same_precision = max_err(rows(out[0], idx), rows(kv[0], idx))
    relative = float((kv[0] - ref_img).norm() / ref_img.norm())
    print(f"{dtype}: token vs kv subset rows {same_precision:.2e}; kv vs fp32 diffusers relative {relative:.2e}")
    assert same_precision <= 1e-2 and relative <= 1e-2


def test_dual_attention_blocks_are_rejected():
    block = JointTransformerBlock(dim=32, num_attention_heads=2, attention_head_dim=16, use_dual_attention=True)
    with pytest.raises(ValueError, match="dual-attention"):
        TokenBlockStage(block, torch.float32)


def ort_session(program) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.register_custom_ops_library(str(_native.ops_library_path()))
    return ort.InferenceSession(program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def graph_dims(program) -> dict[str, list]:
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in program.model_proto.graph.input}


@pytest.mark.parametrize("qk_norm,index", [("rms_norm", 0), (None, LAST)])
def test_onnx_stages_run_in_onnx_runtime_with_the_custom_ops_on_new_shapes(models, qk_norm, index):
    model = models[qk_norm]
    block = model.transformer.transformer_blocks[index]
    # Traced at batch 2, 8x6 = 48 tokens, text 5, 16 selected; run at batch 3, 35 tokens, text 9, 11 selected.
    kv_program, token_program = trace_kv_block(model, index), trace_token_block(model, index)

    kv_spec, token_spec = kv_stage_spec(model, index), token_stage_spec(model, index)
    proto = token_program.model_proto
    custom = sorted({n.op_type for n in proto.graph.node if n.domain == DOMAIN})
    assert custom == ["GatherTokens", "ScatterTokens"] and {o.domain: o.version for o in proto.opset_import}[DOMAIN] == 1
    dims = graph_dims(token_program)
    assert dims["token_index"] == ["batch", "selected"] and dims["k_cache"][:2] == ["batch", "tokens"] and dims["txt"][:2] == ["batch", "text"]
    assert proto.graph.input[3].type.tensor_type.elem_type == 7  # int64
    assert token_spec.inputs[3].to_json()["dtype"] == "int64" and [t.name for t in proto.graph.output] == [t.name for t in token_spec.outputs]

    img, txt, temb, idx, _, _, residual = token_example_inputs(model, index, batch=3, height=5, width=7, text=9, selected=11, seed=7)
    with torch.no_grad():
        kv_expected = KVBlockStage(block, torch.float32)(img, txt, temb)
    kv_got = ort_session(kv_program).run(None, {"img": img.numpy(), "txt": txt.numpy(), "temb": temb.numpy()})
    assert [o.name for o in kv_program.model_proto.graph.output] == [t.name for t in kv_spec.outputs]
    kv_err = max(max_err(g, e) for g, e in zip(kv_got, kv_expected))

    k_cache, v_cache = (torch.from_numpy(a) for a in kv_got[-2:])
    args = (img, txt, temb, idx, k_cache, v_cache, residual)
    with torch.no_grad():
        token_expected = TokenBlockStage(block, torch.float32)(*args)
    token_got = ort_session(token_program).run(None, {t.name: a.numpy() for t, a in zip(token_spec.inputs, args)})
    token_err = max(max_err(g, e) for g, e in zip(token_got, token_expected))
    print(f"max |ORT - PyTorch|: kv stage {kv_err:.2e}, token stage {token_err:.2e}")
    assert len(kv_got) == len(kv_expected) and len(token_got) == len(token_expected)
    assert kv_err <= 1e-4 and token_err <= 1e-4
    ref_img, _, _, _ = diffusers_block(block, img, txt, temb)
    assert max_err(rows(torch.from_numpy(token_got[0]), idx), rows(ref_img, idx)) <= 1e-4
