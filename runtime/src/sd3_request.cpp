#include "sd3_request.hpp"

#include <cmath>
#include <cstring>
#include <string>

#include "error.hpp"
#include "sampling_plan.hpp"
#include "tensor_args.hpp"
#include "tokenizer.hpp"
#include "unicode_text.hpp"

namespace slim {

namespace {
constexpr int32_t kMaxSteps = 10000;  // steps of a plain plan; the Python binding checks the same bound (MAX_STEPS)
// Limits of the exported graphs' dynamic dimensions (export/onnx_export.py); the binding checks the batch too (MAX_BATCH).
constexpr int64_t kMaxBatch = 4096, kMaxText = 8192;
}  // namespace

Sd3Resolved resolve_sd3(const Sd3Runner& runner, const Sd3Settings& s, int64_t batch) {
    const Manifest& m = runner.engine().manifest();
    if (!std::isfinite(s.guidance_scale)) throw Error(SLIM_ERR_INVALID_ARGUMENT, "guidance_scale must be finite");
    if (!std::isfinite(s.xslim_threshold)) throw Error(SLIM_ERR_INVALID_ARGUMENT, "xslim_threshold must be finite");
    if (s.num_steps < 0 || s.num_steps > kMaxSteps)
        throw Error(SLIM_ERR_INVALID_ARGUMENT, "num_steps must be 0 (the bundle's program) or 1 to " + std::to_string(kMaxSteps) +
                                                   ", got " + std::to_string(s.num_steps));
    if (!(std::isfinite(s.shift) && s.shift >= 0))
        throw Error(SLIM_ERR_INVALID_ARGUMENT,
                    "shift must be 0 (the pipeline's scheduler shift, else 3) or a positive number, got " + std::to_string(s.shift));
    Sd3Resolved r;
    r.bundle = &m.program;
    if (s.num_steps > 0) {
        const double shift = s.shift > 0 ? s.shift : m.pipeline.scheduler_shift > 0 ? m.pipeline.scheduler_shift : 3.0;
        r.plain = plain_program(m.program, s.num_steps, shift);
    }
    r.xslim =
        resolve_policy(m.program.xslim, s.xslim_policy, s.xslim_threshold, r.program().steps.size(), runner.stages().has_token_stages);
    r.guidance = s.guidance_scale < 0 ? m.program.guidance_scale : s.guidance_scale;
    r.seeds.resize(static_cast<size_t>(batch));
    for (int64_t b = 0; b < batch; ++b) r.seeds[b] = s.seeds ? s.seeds[b] : s.seed + static_cast<uint64_t>(b);
    return r;
}

GenerateCall::GenerateCall(const Sd3Runner& runner, const GenerateArgs& a) {
    const Sd3Config& c = runner.engine().manifest().config;
    const std::string J = std::to_string(c.joint_attention_dim), P = std::to_string(c.pooled_projection_dim);
    auto prompt = check_tensor(a.prompt_embeds, "prompt_embeds", {-1, -1, c.joint_attention_dim}, "[B,L," + J + "]");
    const int64_t B = prompt[0], L = prompt[1];
    if (B > kMaxBatch || L > kMaxText)
        throw Error(SLIM_ERR_SHAPE, "prompt_embeds: batch must be <= " + std::to_string(kMaxBatch) +
                                        " and text length <= " + std::to_string(kMaxText) + ", got " + shape_text(*a.prompt_embeds));
    auto pooled = check_tensor(a.pooled_embeds, "pooled_embeds", {B, c.pooled_projection_dim}, "[" + std::to_string(B) + "," + P + "]");
    plan_ = resolve_sd3(runner, a.settings, B);
    const bool cfg = plan_.cfg();
    if (cfg && (!a.negative_prompt_embeds || !a.negative_pooled_embeds))
        throw Error(SLIM_ERR_INVALID_ARGUMENT,
                    "guidance scale " + std::to_string(plan_.guidance) + " > 1 needs negative_prompt_embeds and negative_pooled_embeds");
    auto out = check_tensor(a.out, "latents_out", {B, c.out_channels, -1, -1},
                            "[" + std::to_string(B) + "," + std::to_string(c.out_channels) + ",H,W]");
    const int64_t H = out[2], W = out[3];
    if (H % c.patch_size || W % c.patch_size || H > c.max_latent_size || W > c.max_latent_size)
        throw Error(SLIM_ERR_SHAPE, "latents: height and width must be multiples of " + std::to_string(c.patch_size) + " up to " +
                                        std::to_string(c.max_latent_size) + ", got " + std::to_string(H) + "x" + std::to_string(W));
    if (c.in_channels != c.out_channels) throw Error(SLIM_ERR_BUNDLE, "in_channels != out_channels: not a sampling model");
    check_finite(a.prompt_embeds, prompt, "prompt_embeds");
    check_finite(a.pooled_embeds, pooled, "pooled_embeds");
    if (cfg) {
        auto neg =
            check_tensor(a.negative_prompt_embeds, "negative_prompt_embeds", prompt, shape_text(*a.prompt_embeds) + " (as prompt_embeds)");
        auto neg_pooled =
            check_tensor(a.negative_pooled_embeds, "negative_pooled_embeds", pooled, shape_text(*a.pooled_embeds) + " (as pooled_embeds)");
        check_finite(a.negative_prompt_embeds, neg, "negative_prompt_embeds");
        check_finite(a.negative_pooled_embeds, neg_pooled, "negative_pooled_embeds");
        request_.negative_prompt = static_cast<const float*>(a.negative_prompt_embeds->data);
        request_.negative_pooled = static_cast<const float*>(a.negative_pooled_embeds->data);
    }
    if (a.latents) {
        auto lat = check_tensor(a.latents, "latents", out, shape_text(*a.out) + " (as latents_out)");
        check_finite(a.latents, lat, "latents");
        request_.latents = static_cast<const float*>(a.latents->data);
    }
    request_.batch = static_cast<int>(B);
    request_.text_len = static_cast<int>(L);
    request_.height = static_cast<int>(H);
    request_.width = static_cast<int>(W);
    request_.prompt = static_cast<const float*>(a.prompt_embeds->data);
    request_.pooled = static_cast<const float*>(a.pooled_embeds->data);
    request_.seeds = plan_.seeds.data();
    request_.guidance_scale = plan_.guidance;
    request_.xslim = &plan_.xslim;
    request_.program = &plan_.program();
    request_.out = static_cast<float*>(a.out->data);
    request_.progress = a.progress;
}

namespace {

// Image pixels of one side: 0 is the bundle's default; else a multiple of the VAE's scale factor x the patch size.
int64_t image_side(const Sd3Config& c, int64_t f, int32_t given, const char* name) {
    if (given == 0) {
        if (c.default_latent_size <= 0)
            throw Error(SLIM_ERR_INVALID_ARGUMENT, std::string("slim_generate_prompt: the bundle states no default size; set ") + name);
        return c.default_latent_size * f;
    }
    const int64_t step = f * c.patch_size, limit = f * c.max_latent_size;
    if (given < 0 || given % step || given > limit)
        throw Error(SLIM_ERR_INVALID_ARGUMENT, std::string("slim_generate_prompt: ") + name + " must be a multiple of " +
                                                   std::to_string(step) + " (the VAE's scale factor " + std::to_string(f) +
                                                   " x the patch size " + std::to_string(c.patch_size) + ") up to " +
                                                   std::to_string(limit) + " image pixels, got " + std::to_string(given));
    return given;
}

// Prompt i's text and negative text, bounded reads (a text past the limit is refused without reading all of it).
void add_texts(PromptRequest& request, const PromptArgs& a, int32_t i) {
    const std::string which = "[" + std::to_string(i) + "]";
    if (!a.prompts[i]) throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_generate_prompt: prompts" + which + " is NULL");
    request.prompts.emplace_back(a.prompts[i], strnlen(a.prompts[i], kMaxPromptBytes + 1));
    const char* negative = a.negative_prompts && a.negative_prompts[i] ? a.negative_prompts[i] : "";
    request.negatives.emplace_back(negative, strnlen(negative, kMaxPromptBytes + 1));
    for (const std::string* text : {&request.prompts.back(), &request.negatives.back()})
        if (text->size() > kMaxPromptBytes || !unicode::is_utf8(text->data(), text->size()))
            throw Error(SLIM_ERR_INVALID_ARGUMENT, std::string("slim_generate_prompt: ") +
                                                       (text == &request.prompts.back() ? "prompts" : "negative_prompts") + which +
                                                       " is not UTF-8 or is longer than " + std::to_string(kMaxPromptBytes) + " bytes");
}

}  // namespace

PromptCall::PromptCall(const Sd3Runner& runner, const PromptArgs& a) {
    const Engine& engine = runner.engine();
    const std::string unsupported = prompt_support(engine);
    if (!unsupported.empty()) throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_generate_prompt: " + unsupported);
    const Sd3Config& c = engine.manifest().config;
    if (!a.prompts || a.prompt_count < 1 || a.prompt_count > kMaxBatch)
        throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_generate_prompt: prompts must not be NULL and prompt_count must be 1 to " +
                                                   std::to_string(kMaxBatch) + ", got " + std::to_string(a.prompt_count));
    for (int32_t i = 0; i < a.prompt_count; ++i) add_texts(request_, a, i);
    const int64_t B = a.prompt_count, f = engine.manifest().pipeline.scale_factor;
    const int64_t H = image_side(c, f, a.height, "height"), W = image_side(c, f, a.width, "width");
    plan_ = resolve_sd3(runner, a.settings, B);
    const int64_t image_bytes = B * H * W * 3, latent_count = B * c.out_channels * (H / f) * (W / f);
    if (!a.image_out) throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_generate_prompt: image_out is NULL");
    if (a.image_capacity < static_cast<size_t>(image_bytes))
        throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_generate_prompt: image_out must hold uint8 [" + std::to_string(B) + "," +
                                                   std::to_string(H) + "," + std::to_string(W) + ",3] = " + std::to_string(image_bytes) +
                                                   " bytes, image_capacity is " + std::to_string(a.image_capacity));
    if (a.latents_out && a.latents_capacity < static_cast<size_t>(latent_count))
        throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_generate_prompt: latents_out must hold " + std::to_string(latent_count) +
                                                   " floats, latents_capacity is " + std::to_string(a.latents_capacity));
    if (a.latents) {
        const std::vector<int64_t> shape{B, c.out_channels, H / f, W / f};
        auto lat = check_tensor(a.latents, "latents", shape,
                                "[" + std::to_string(B) + "," + std::to_string(c.out_channels) + "," + std::to_string(H / f) + "," +
                                    std::to_string(W / f) + "] (height and width / " + std::to_string(f) + ")");
        check_finite(a.latents, lat, "latents");
        request_.latents = static_cast<const float*>(a.latents->data);
    }
    request_.seeds = plan_.seeds.data();
    request_.height = static_cast<int>(H);
    request_.width = static_cast<int>(W);
    request_.guidance_scale = plan_.guidance;
    request_.xslim = &plan_.xslim;
    request_.program = &plan_.program();
    request_.image = a.image_out;
    request_.latents_out = a.latents_out;
    request_.progress = a.progress;
}

}  // namespace slim
