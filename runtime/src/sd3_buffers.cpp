#include "sd3_buffers.hpp"

#include <algorithm>
#include <limits>

#include "slim_kernels.h"

namespace slim {

bool Sd3Buffers::size_for(const DeviceAllocator& a, const Sd3Config& c, const RequestDims& d, const Program& program,
                          const XSlimPolicy& policy, const Controller& controller, const BlockStages& stages) {
    const int64_t Bm = d.model_batch, N = d.tokens, L = d.text, D = c.inner_dim, Dc = c.caption_projection_dim;
    const std::vector<int64_t> img{Bm, N, D}, txt{Bm, L, Dc};
    const int layers = c.num_layers;
    bool changed = false;
    auto size = [&](DeviceBuffer& buffer, bool needed, const std::vector<int64_t>& shape) {
        changed = (needed ? buffer.shape(a, shape) : buffer.unuse()) || changed;
    };

    // The request and the stages' fixed inputs and outputs.
    size(in.latents, true, {Bm, c.in_channels, d.height, d.width});
    size(in.text, !d.embeddings_in_place, {Bm, L, c.joint_attention_dim});
    size(in.pooled, !d.embeddings_in_place, {Bm, c.pooled_projection_dim});
    size(in.timestep, true, {Bm});
    size(in.temb, true, {Bm, D});
    size(in.velocity, true, {Bm, c.out_channels, d.height, d.width});

    // The stack's ping-pong, and scratch for keys/values a step does not keep.
    for (auto& b : stack.img) size(b, true, img);
    for (auto& b : stack.txt) size(b, true, txt);
    const bool any_kv = std::find(stages.outputs_kv.begin(), stages.outputs_kv.end(), true) != stages.outputs_kv.end();
    size(stack.k_scratch, any_kv, img);
    size(stack.v_scratch, any_kv, img);

    // 1.x: the skipped range's Δ and its compensation.
    const bool range_skipped = program.skip_first >= 0;
    size(range.delta_img, range_skipped, img);
    size(range.delta_txt, range_skipped, txt);
    size(range.comp_img, range_skipped && program.compensation == Compensation::Mlp, img);
    size(range.comp_txt, range_skipped && program.compensation == Compensation::Mlp, txt);
    range.compensated = false;

    // X-Slim caches: what full steps record for the levels this policy uses.
    const bool block_level = policy.uses(Level::Block), token_level = policy.uses(Level::Token);
    size(xslim.stack_in, policy.enabled, img);
    size(xslim.residual_last, policy.enabled, img);
    size(xslim.residual_prev, policy.enabled, img);
    xslim.block_res_img.resize(layers);
    xslim.block_res_txt.resize(layers);
    xslim.block_k.resize(layers);
    xslim.block_v.resize(layers);
    for (int b = 0; b < layers; ++b) {
        const bool token_block = token_level && stages.has_tokens[b];
        size(xslim.block_res_img[b], block_level || token_block, img);
        size(xslim.block_res_txt[b], block_level && b + 1 < layers, txt);
        size(xslim.block_k[b], token_block, img);
        size(xslim.block_v[b], token_block, img);
    }
    xslim.block_scores.assign(layers, std::numeric_limits<double>::quiet_NaN());
    size(xslim.token_scores, token_level, {Bm, N});
    const bool index_changed =
        token_level ? xslim.token_index.shape(a, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, {Bm, N}) : xslim.token_index.unuse();
    // The token index as each token step's [Bm, keep] (the planner's keep: tokens_for_ratio of the step's ratio).
    std::vector<int64_t> keeps;
    for (size_t s = 0; token_level && s < d.steps; ++s) {
        const int64_t keep = kernels::cpu::tokens_for_ratio(controller.ratio(s), N);
        if (std::find(keeps.begin(), keeps.end(), keep) == keeps.end()) keeps.push_back(keep);
    }
    if (index_changed || keeps != keeps_ || index_batch_ != Bm) {
        xslim.index_views.clear();
        for (int64_t keep : keeps)
            xslim.index_views.emplace_back(keep, xslim.token_index.view(0, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, {Bm, keep}));
        keeps_ = keeps;
        index_batch_ = Bm;
        changed = true;
    }
    return changed || index_changed;
}

}  // namespace slim
