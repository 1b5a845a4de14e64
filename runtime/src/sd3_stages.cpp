#include "sd3_stages.hpp"

#include <string>

#include "error.hpp"

namespace slim {
namespace {
using Names = std::vector<std::string>;
}  // namespace

Sd3Stages bind_sd3_stages(const Manifest& manifest) {
    Sd3Stages st;
    const Sd3Config& c = manifest.config;
    st.block.assign(c.num_layers, -1);
    st.tokens.assign(c.num_layers, -1);
    std::vector<bool> block_kv(c.num_layers, false);
    // The one-per-bundle roles: a second stage of the same role is an error, not silently preferred.
    const auto bind = [](int& slot, const StageDecl& s, int index) {
        if (slot >= 0) throw Error(SLIM_ERR_BUNDLE, "manifest: stage " + s.name + " repeats the role of another stage");
        slot = index;
    };
    for (size_t i = 0; i < manifest.stages.size(); ++i) {
        const StageDecl& s = manifest.stages[i];
        const int index = static_cast<int>(i);
        switch (s.role) {
            case Role::Embed:
                expect_stage_io(s, {"latents", "timestep", "pooled", "text"}, {"img", "txt", "temb"});
                bind(st.embed, s, index);
                break;
            case Role::Final:
                expect_stage_io(s, {"img", "temb", "latents"}, {"velocity"});
                bind(st.final, s, index);
                break;
            case Role::Compensate:
                expect_stage_io(s, {"delta_img", "delta_txt"}, {"comp_img", "comp_txt"});
                bind(st.compensate, s, index);
                break;
            case Role::ClipL:
            case Role::ClipG:
                expect_stage_io(s, {"input_ids"}, {"hidden_states", "pooled"});
                bind(s.role == Role::ClipL ? st.clip_l : st.clip_g, s, index);
                break;
            case Role::T5:
                expect_stage_io(s, {"input_ids"}, {"hidden_states"});
                bind(st.t5, s, index);
                break;
            case Role::VaeDecode:
                expect_stage_io(s, {"latents"}, {"image"});
                bind(st.vae_decode, s, index);
                break;
            case Role::Block:
            case Role::BlockTokens: {
                const int b = s.block;  // in [0, num_layers): checked with the manifest
                const bool last = b == c.num_layers - 1;
                const Names outputs = last ? Names{"img_out"} : Names{"img_out", "txt_out"};
                if (s.role == Role::BlockTokens) {
                    expect_stage_io(s, {"img", "txt", "temb", "token_index", "k_cache", "v_cache", "residual_cache"}, outputs);
                    bind(st.tokens[b], s, index);
                } else {
                    Names with_kv = outputs;
                    with_kv.insert(with_kv.end(), {"img_k", "img_v"});
                    expect_stage_io(s, {"img", "txt", "temb"}, s.outputs == with_kv ? with_kv : outputs);
                    bind(st.block[b], s, index);
                    block_kv[b] = s.outputs == with_kv;
                }
                break;
            }
            default:  // the manifest allows only these roles in an sd3 bundle
                throw Error(SLIM_ERR_INTERNAL, "stage " + s.name + " has a role the SD3 program does not bind");
        }
    }
    if (st.embed < 0 || st.final < 0) throw Error(SLIM_ERR_BUNDLE, "manifest: the embed and final stages are required");
    for (int b = 0; b < c.num_layers; ++b)
        if (st.block[b] < 0)
            throw Error(SLIM_ERR_BUNDLE, "manifest: stage block_" + std::to_string(b) + " is missing (no stage has role block, block " +
                                             std::to_string(b) + ")");
    for (int b = 0; b < c.num_layers; ++b) {
        if (st.tokens[b] >= 0 && !block_kv[b])
            throw Error(SLIM_ERR_BUNDLE, "manifest: the block_tokens stage of block " + std::to_string(b) + " needs block " +
                                             std::to_string(b) + "'s block stage to output img_k and img_v");
        st.has_token_stages = st.has_token_stages || st.tokens[b] >= 0;
    }
    if (st.has_token_stages && !manifest.uses_custom_ops)
        throw Error(SLIM_ERR_BUNDLE, "manifest: token stages need custom_op_library (the ai.slimengine ops)");
    if (manifest.program.xslim.uses(Level::Token) && !st.has_token_stages)
        throw Error(SLIM_ERR_BUNDLE, "manifest: the default X-Slim policy uses the token level but the bundle has no block_tokens stages");
    if (manifest.program.compensation == Compensation::Mlp && st.compensate < 0)
        throw Error(SLIM_ERR_BUNDLE, "manifest: the program uses MLP compensation but there is no compensate stage");
    for (int b = 0; b < c.num_layers; ++b) {
        st.blocks.has_tokens.push_back(st.tokens[b] >= 0);
        st.blocks.outputs_kv.push_back(block_kv[b]);
    }
    return st;
}

}  // namespace slim
