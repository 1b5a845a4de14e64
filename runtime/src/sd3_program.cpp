#include "sd3_program.hpp"

#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "error.hpp"
#include "noise.hpp"

namespace slim {
namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point start, Clock::time_point end) { return std::chrono::duration<double, std::milli>(end - start).count(); }

std::vector<std::string> stage_names(const Engine& engine) {
    std::vector<std::string> names;
    for (const auto& stage : engine.stages()) names.push_back(stage->name());
    return names;
}

void add_into(std::vector<float>& dst, const std::vector<float>& src, size_t n) {
    for (size_t i = 0; i < n; ++i) dst[i] += src[i];
}

void subtract(std::vector<float>& dst, const std::vector<float>& a, const std::vector<float>& b, size_t n) {
    for (size_t i = 0; i < n; ++i) dst[i] = a[i] - b[i];
}

// sum |a - b| / sum |b|: the relative L1 change of the stack residual (export/xslim.py).
double relative_change(const std::vector<float>& a, const std::vector<float>& b, size_t n) {
    double diff = 0, mag = 0;
    for (size_t i = 0; i < n; ++i) {
        diff += std::fabs(static_cast<double>(a[i]) - b[i]);
        mag += std::fabs(static_cast<double>(b[i]));
    }
    // A zero residual has no relative change: infinity, so the step is computed (as 0/0 in xslim.py).
    return mag > 0 ? diff / mag : std::numeric_limits<double>::infinity();
}

}  // namespace

Sd3Session::Sd3Session(const Engine& engine) : engine_(engine), stages_(engine.stages().size()), profiler_(stage_names(engine)) {}

void Sd3Session::run(int stage, std::initializer_list<const OrtValue*> inputs, std::initializer_list<OrtValue*> outputs) {
    auto start = Clock::now();
    engine_.stages()[stage]->run(inputs.begin(), outputs.begin());
    auto end = Clock::now();
    profiler_.stage(stage, start, end);
    double ms = ms_between(start, end);
    stages_[stage].calls += 1;
    stages_[stage].ms += ms;
    backend_ms_ += ms;
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
    const bool step_cache = r.step_cache_threshold > 0;
    if (step_cache)
        for (auto* v : {&stack_in_, &residual_, &new_residual_}) v->resize(img_count);

    // OrtValue views over the buffers, made once per call.
    const std::vector<int64_t> lat_shape{Bm, c.in_channels, H, W}, img_shape{Bm, N, D}, txt_shape{Bm, L, Dc};
    TensorView v_model_in(ort, model_in_.data(), lat_shape), v_timestep(ort, timestep_.data(), {Bm});
    TensorView v_pooled(ort, pooled_.data(), {Bm, c.pooled_projection_dim}), v_text(ort, text_.data(), {Bm, L, c.joint_attention_dim});
    TensorView v_temb(ort, temb_.data(), {Bm, D}), v_velocity(ort, velocity_.data(), {Bm, c.out_channels, H, W});
    TensorView v_img[2] = {TensorView(ort, img_[0].data(), img_shape), TensorView(ort, img_[1].data(), img_shape)};
    TensorView v_txt[2] = {TensorView(ort, txt_[0].data(), txt_shape), TensorView(ort, txt_[1].data(), txt_shape)};
    TensorView v_delta_img, v_delta_txt, v_comp_img, v_comp_txt;
    if (caches) {
        v_delta_img = TensorView(ort, delta_img_.data(), img_shape);
        v_delta_txt = TensorView(ort, delta_txt_.data(), txt_shape);
        v_comp_img = TensorView(ort, comp_img_.data(), img_shape);
        v_comp_txt = TensorView(ort, comp_txt_.data(), txt_shape);
    }

    bool compensated = false;
    // X-Slim step level: the decision rule of export/xslim.py.
    bool have_residual = false, have_rate = false;
    double rate = 0, accumulated = 0;
    size_t last_computed = 0;
    GenerateStats stats;
    profiler_.prepared(start);
    for (size_t step = 0; step < program.steps.size(); ++step) {
        const StepPlan& plan = program.steps[step];
        auto step_start = Clock::now();
        profiler_.set_step(static_cast<int>(step));
        for (int64_t copy = 0; copy < Bm / B; ++copy)
            std::memcpy(model_in_.data() + copy * latent_count, x_.data(), latent_count * sizeof(float));
        std::fill(timestep_.begin(), timestep_.end(), static_cast<float>(plan.timestep));
        run(engine_.embed_stage, {v_model_in.get(), v_timestep.get(), v_pooled.get(), v_text.get()},
            {v_img[0].get(), v_txt[0].get(), v_temb.get()});

        int cur = 0, blocks_run = 0;
        const bool reuse = step_cache && have_rate && !plan.record_delta && static_cast<int>(step) >= r.step_cache_warmup &&
                           step + 1 != program.steps.size() && accumulated + rate < r.step_cache_threshold;
        if (reuse) {  // the whole stack as its last residual
            add_into(img_[0], residual_, img_count);
            accumulated += rate;
        } else if (step_cache) {
            std::memcpy(stack_in_.data(), img_[0].data(), img_count * sizeof(float));
        }
        for (int b = 0; b < (reuse ? 0 : c.num_layers); ++b) {
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
            const bool last = b == c.num_layers - 1;
            if (last)
                run(engine_.block_stages[b], {v_img[cur].get(), v_txt[cur].get(), v_temb.get()}, {v_img[1 - cur].get()});
            else
                run(engine_.block_stages[b], {v_img[cur].get(), v_txt[cur].get(), v_temb.get()},
                    {v_img[1 - cur].get(), v_txt[1 - cur].get()});
            cur = 1 - cur;
            ++blocks_run;
            if (plan.record_delta && b == program.cache_last) {
                subtract(delta_img_, img_[cur], before_img_, img_count);
                subtract(delta_txt_, txt_[cur], before_txt_, txt_count);
                compensated = false;
            }
        }
        if (step_cache && !reuse) {
            subtract(new_residual_, img_[cur], stack_in_, img_count);
            if (have_residual) {
                rate = relative_change(new_residual_, residual_, img_count) / static_cast<double>(step - last_computed);
                have_rate = true;
            }
            residual_.swap(new_residual_);
            have_residual = true;
            last_computed = step;
            accumulated = 0;
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

        const int level = reuse ? SLIM_STEP_REUSED : plan.skip_cached_blocks ? SLIM_STEP_CACHED_RANGE : SLIM_STEP_FULL;
        const auto step_end = Clock::now();
        profiler_.step(level, step_start, step_end);
        steps_.push_back(StepStats{plan.sigma, plan.sigma_next, ms_between(step_start, step_end), blocks_run, level});
        stats.blocks_run += blocks_run;
    }
    std::memcpy(r.out, x_.data(), latent_count * sizeof(float));
    stats.steps = static_cast<int>(program.steps.size());
    stats.stage_calls = stage_calls_;
    stats.effective_nfe = static_cast<double>(stats.blocks_run) / c.num_layers * (cfg ? 2 : 1);
    stats.backend_ms = backend_ms_;
    const auto end = Clock::now();
    profiler_.generation(start, end);
    stats.total_ms = ms_between(start, end);
    return stats;
}

}  // namespace slim
