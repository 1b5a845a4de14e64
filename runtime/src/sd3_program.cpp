#include "sd3_program.hpp"

#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "error.hpp"
#include "noise.hpp"
#include "slim_kernels.h"

namespace slim {
namespace {

void add_into(std::vector<float>& dst, const std::vector<float>& src, size_t n) {
    for (size_t i = 0; i < n; ++i) dst[i] += src[i];
}

void subtract(std::vector<float>& dst, const std::vector<float>& a, const std::vector<float>& b, size_t n) {
    for (size_t i = 0; i < n; ++i) dst[i] = a[i] - b[i];
}

int step_level(Level level, bool cached_range) {
    switch (level) {
        case Level::Skip:
            return SLIM_STEP_REUSED;
        case Level::Block:
            return SLIM_STEP_BLOCK_REFRESH;
        case Level::Token:
            return SLIM_STEP_TOKEN_REFRESH;
        default:
            return cached_range ? SLIM_STEP_CACHED_RANGE : SLIM_STEP_FULL;
    }
}

}  // namespace

Sd3Session::Sd3Session(const Engine& engine) : engine_(engine), stages_(engine.stages().size()), profiler_(engine.stage_blocks()) {}

void Sd3Session::run(int stage, std::initializer_list<const OrtValue*> inputs, std::initializer_list<OrtValue*> outputs) {
    backend_ms_ += run_stage(engine_, stage, inputs.begin(), outputs.begin(), stages_, profiler_);
    stage_calls_ += 1;
}

GenerateStats Sd3Session::generate(const GenerateRequest& r) {
    auto start = Clock::now();
    const Sd3Config& c = engine_.manifest().config;
    const Program& program = r.program ? *r.program : engine_.manifest().program;
    const OrtRuntime& ort = engine_.ort();
    const bool cfg = r.guidance_scale > 1.0f;
    const int64_t B = r.batch, Bm = cfg ? 2 * B : B, L = r.text_len, H = r.height, W = r.width;
    const int64_t N = (H / c.patch_size) * (W / c.patch_size), D = c.inner_dim, Dc = c.caption_projection_dim;
    const size_t latent_count = static_cast<size_t>(B * c.in_channels * H * W);
    const int layers = c.num_layers;

    steps_.clear();
    steps_.reserve(program.steps.size());
    for (auto& s : stages_) s = StageStats{};
    backend_ms_ = 0;
    stage_calls_ = 0;
    profiler_.begin_generation(1 + program.steps.size() * (1 + stages_.size()));  // each stage at most once a step

    // Inputs in model-batch layout: [negative; positive] under CFG.
    x_.resize(latent_count);
    if (r.latents)
        std::memcpy(x_.data(), r.latents, latent_count * sizeof(float));
    else
        gaussian_noise(x_.data(), latent_count, r.seed);
    auto stack = [&](std::vector<float>& dst, const float* negative, const float* positive, size_t per_batch) {
        dst.resize(Bm * per_batch);
        if (cfg) std::memcpy(dst.data(), negative, B * per_batch * sizeof(float));
        std::memcpy(dst.data() + (cfg ? B * per_batch : 0), positive, B * per_batch * sizeof(float));
    };
    stack(text_, r.negative_prompt, r.prompt, L * c.joint_attention_dim);
    stack(pooled_, r.negative_pooled, r.pooled, c.pooled_projection_dim);
    model_in_.resize(Bm * latent_count / B);
    timestep_.resize(Bm);
    temb_.resize(Bm * D);
    velocity_.resize(Bm * latent_count / B);
    for (auto& v : img_) v.resize(Bm * N * D);
    for (auto& v : txt_) v.resize(Bm * L * Dc);
    const size_t img_count = Bm * N * D, txt_count = Bm * L * Dc;
    const bool caches = program.cache_first >= 0;
    if (caches) {
        for (auto* v : {&before_img_, &delta_img_, &comp_img_}) v->resize(img_count);
        for (auto* v : {&before_txt_, &delta_txt_, &comp_txt_}) v->resize(txt_count);
    }

    // X-Slim: which caches full steps record, sized for this request.
    static const XSlimPolicy kOff;
    const XSlimPolicy& policy = r.cache ? *r.cache : kOff;
    Controller controller(policy, program.steps.size());
    const bool block_level = policy.uses(Level::Block), token_level = policy.uses(Level::Token);
    if (policy.enabled)
        for (auto* v : {&stack_in_, &residual_last_, &residual_prev_}) v->resize(img_count);
    block_scores_.assign(layers, std::numeric_limits<double>::quiet_NaN());
    block_res_img_.resize(layers);
    block_res_txt_.resize(layers);
    block_k_.resize(layers);
    block_v_.resize(layers);
    // Every cache is sized for this request exactly, or emptied: code below takes "not empty" to mean
    // "kept by this request" (a buffer left from an earlier, smaller request must not be written).
    auto size = [](std::vector<float>& v, bool needed, size_t count) { needed ? v.resize(count) : v.clear(); };
    bool any_kv = false;
    for (int b = 0; b < layers; ++b) {
        const bool token_block = token_level && engine_.token_stages[b] >= 0;
        size(block_res_img_[b], block_level || token_block, img_count);
        size(block_res_txt_[b], block_level && b + 1 < layers, txt_count);
        size(block_k_[b], token_block, img_count);
        size(block_v_[b], token_block, img_count);
        any_kv = any_kv || engine_.block_kv[b];
    }
    for (auto& v : kv_scratch_) size(v, any_kv, img_count);  // keys/values a step does not keep
    if (token_level) token_scores_.resize(Bm * N);

    // OrtValue views over the buffers, made once per call.
    const std::vector<int64_t> lat_shape{Bm, c.in_channels, H, W}, img_shape{Bm, N, D}, txt_shape{Bm, L, Dc};
    TensorView v_model_in(ort, model_in_.data(), lat_shape), v_timestep(ort, timestep_.data(), {Bm});
    TensorView v_pooled(ort, pooled_.data(), {Bm, c.pooled_projection_dim}), v_text(ort, text_.data(), {Bm, L, c.joint_attention_dim});
    TensorView v_temb(ort, temb_.data(), {Bm, D}), v_velocity(ort, velocity_.data(), {Bm, c.out_channels, H, W});
    TensorView v_img[2] = {TensorView(ort, img_[0].data(), img_shape), TensorView(ort, img_[1].data(), img_shape)};
    TensorView v_txt[2] = {TensorView(ort, txt_[0].data(), txt_shape), TensorView(ort, txt_[1].data(), txt_shape)};
    TensorView v_delta_img, v_delta_txt, v_comp_img, v_comp_txt, v_scratch[2];
    if (caches) {
        v_delta_img = TensorView(ort, delta_img_.data(), img_shape);
        v_delta_txt = TensorView(ort, delta_txt_.data(), txt_shape);
        v_comp_img = TensorView(ort, comp_img_.data(), img_shape);
        v_comp_txt = TensorView(ort, comp_txt_.data(), txt_shape);
    }
    if (!kv_scratch_[0].empty())
        for (int i = 0; i < 2; ++i) v_scratch[i] = TensorView(ort, kv_scratch_[i].data(), img_shape);
    std::vector<TensorView> v_k(layers), v_v(layers), v_res(layers);
    for (int b = 0; b < layers; ++b)
        if (!block_k_[b].empty()) {
            v_k[b] = TensorView(ort, block_k_[b].data(), img_shape);
            v_v[b] = TensorView(ort, block_v_[b].data(), img_shape);
            v_res[b] = TensorView(ort, block_res_img_[b].data(), img_shape);
        }

    bool compensated = false;
    const double full_block_flops = block_flops(N, N, L, D);
    double flops = 0;
    GenerateStats stats;
    profiler_.prepared(start);
    for (size_t step = 0; step < program.steps.size(); ++step) {
        const StepPlan& plan = program.steps[step];
        auto step_start = Clock::now();
        const double flops_before = flops;
        profiler_.set_step(static_cast<int>(step));
        for (int64_t copy = 0; copy < Bm / B; ++copy)
            std::memcpy(model_in_.data() + copy * latent_count, x_.data(), latent_count * sizeof(float));
        std::fill(timestep_.begin(), timestep_.end(), static_cast<float>(plan.timestep));
        run(engine_.embed_stage, {v_model_in.get(), v_timestep.get(), v_pooled.get(), v_text.get()},
            {v_img[0].get(), v_txt[0].get(), v_temb.get()});

        const Level level = controller.level(step, plan.record_delta);
        const bool record = level == Level::Full && policy.enabled;
        int cur = 0;
        StepStats st{plan.sigma, plan.sigma_next, 0, 0, 0, static_cast<int>(N), 0, step_level(level, plan.skip_cached_blocks)};
        if (record) std::memcpy(stack_in_.data(), img_[0].data(), img_count * sizeof(float));
        if (level == Level::Skip) add_into(img_[0], residual_last_, img_count);  // the whole stack as its last residual
        std::vector<bool> skip_block(layers, false);
        if (level == Level::Block) skip_block = skippable_blocks(block_scores_, controller.block_threshold(step), policy.first_blocks);
        TensorView v_index;
        int64_t keep = N;
        if (level == Level::Token) {  // the tokens whose residual changed most between the last two full steps
            keep = kernels::cpu::tokens_for_ratio(controller.ratio(step), N);
            token_index_.resize(Bm * keep);
            kernels::cpu::select_tokens(token_scores_.data(), Bm, N, keep, token_index_.data());
            v_index = TensorView(ort, token_index_.data(), ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, {Bm, keep});
            st.tokens_computed = static_cast<int>(keep);
        }

        for (int b = 0; b < (level == Level::Skip ? 0 : layers); ++b) {
            const bool in_range = caches && b >= program.cache_first && b <= program.cache_last;
            if (plan.skip_cached_blocks && in_range) {
                if (b == program.cache_last) {  // end of the skipped range: add the compensated Δ
                    if (!compensated && program.compensation == Compensation::Mlp)
                        run(engine_.compensate_stage, {v_delta_img.get(), v_delta_txt.get()}, {v_comp_img.get(), v_comp_txt.get()});
                    compensated = true;
                    const bool mlp = program.compensation == Compensation::Mlp;
                    add_into(img_[cur], mlp ? comp_img_ : delta_img_, img_count);
                    add_into(txt_[cur], mlp ? comp_txt_ : delta_txt_, txt_count);
                }
                continue;
            }
            if (plan.record_delta && b == program.cache_first) {
                std::memcpy(before_img_.data(), img_[cur].data(), img_count * sizeof(float));
                std::memcpy(before_txt_.data(), txt_[cur].data(), txt_count * sizeof(float));
            }
            const bool last = b == layers - 1;
            if (skip_block[b]) {  // X-Slim block level: the block's residual from the last full step
                add_into(img_[cur], block_res_img_[b], img_count);
                if (!last) add_into(txt_[cur], block_res_txt_[b], txt_count);
                st.blocks_reused += 1;
                continue;
            }
            if (level == Level::Token && engine_.token_stages[b] >= 0) {
                std::initializer_list<const OrtValue*> in = {v_img[cur].get(), v_txt[cur].get(), v_temb.get(),  v_index.get(),
                                                             v_k[b].get(),     v_v[b].get(),     v_res[b].get()};
                if (last)
                    run(engine_.token_stages[b], in, {v_img[1 - cur].get()});
                else
                    run(engine_.token_stages[b], in, {v_img[1 - cur].get(), v_txt[1 - cur].get()});
                flops += block_flops(N, keep, L, D);
            } else {
                std::initializer_list<const OrtValue*> in = {v_img[cur].get(), v_txt[cur].get(), v_temb.get()};
                OrtValue* k = nullptr;
                OrtValue* v = nullptr;
                if (engine_.block_kv[b]) {  // keys/values into the token cache, or into scratch when not needed
                    const bool keep_kv = record && !block_k_[b].empty();
                    k = keep_kv ? v_k[b].get() : v_scratch[0].get();
                    v = keep_kv ? v_v[b].get() : v_scratch[1].get();
                }
                if (last && k)
                    run(engine_.block_stages[b], in, {v_img[1 - cur].get(), k, v});
                else if (last)
                    run(engine_.block_stages[b], in, {v_img[1 - cur].get()});
                else if (k)
                    run(engine_.block_stages[b], in, {v_img[1 - cur].get(), v_txt[1 - cur].get(), k, v});
                else
                    run(engine_.block_stages[b], in, {v_img[1 - cur].get(), v_txt[1 - cur].get()});
                flops += full_block_flops;
                if (record && (block_level || token_level)) {
                    if (!block_res_img_[b].empty()) subtract(block_res_img_[b], img_[1 - cur], img_[cur], img_count);
                    if (!block_res_txt_[b].empty()) subtract(block_res_txt_[b], txt_[1 - cur], txt_[cur], txt_count);
                    block_scores_[b] = relative_change(img_[1 - cur].data(), img_[cur].data(), img_count);
                }
            }
            cur = 1 - cur;
            ++st.blocks_run;
            if (plan.record_delta && b == program.cache_last) {
                subtract(delta_img_, img_[cur], before_img_, img_count);
                subtract(delta_txt_, txt_[cur], before_txt_, txt_count);
                compensated = false;
            }
        }
        if (record) {
            residual_prev_.swap(residual_last_);
            subtract(residual_last_, img_[cur], stack_in_, img_count);
            const bool two = controller.full_steps() >= 1;
            controller.full_step_done(step, two ? relative_change(residual_last_.data(), residual_prev_.data(), img_count) : -1);
            // Token scores change only here: every token step until the next full step selects from them.
            if (token_level && two)
                kernels::cpu::token_change_score(residual_last_.data(), residual_prev_.data(), Bm, N, D, token_scores_.data());
        }
        run(engine_.final_stage, {v_img[cur].get(), v_temb.get(), v_model_in.get()}, {v_velocity.get()});

        // Euler step, with classifier-free guidance v = v_neg + g (v_pos - v_neg).
        const float dt = static_cast<float>(plan.sigma_next - plan.sigma);
        const float* v_neg = velocity_.data();
        const float* v_pos = velocity_.data() + (cfg ? latent_count : 0);
        const float g = r.guidance_scale;
        bool finite = true;
        for (size_t i = 0; i < latent_count; ++i) {
            float v = cfg ? v_neg[i] + g * (v_pos[i] - v_neg[i]) : v_pos[i];
            x_[i] += dt * v;
            finite = finite && std::isfinite(x_[i]);
        }
        if (!finite) throw Error(SLIM_ERR_NUMERICS, "step " + std::to_string(step) + " produced NaN or Inf latents");

        const auto step_end = Clock::now();
        profiler_.step(st.level, step_start, step_end);
        st.ms = ms_between(step_start, step_end);
        st.flop_fraction = (flops - flops_before) / (full_block_flops * layers);
        steps_.push_back(st);
        stats.blocks_run += st.blocks_run;
    }
    std::memcpy(r.out, x_.data(), latent_count * sizeof(float));
    stats.steps = static_cast<int>(program.steps.size());
    stats.stage_calls = stage_calls_;
    stats.effective_nfe = flops / (full_block_flops * layers) * (cfg ? 2 : 1);
    stats.flop_fraction = flops / (full_block_flops * layers * static_cast<double>(program.steps.size()));
    stats.backend_ms = backend_ms_;
    const auto end = Clock::now();
    profiler_.generation(start, end);
    stats.total_ms = ms_between(start, end);
    return stats;
}

}  // namespace slim
