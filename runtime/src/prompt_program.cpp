#include "prompt_program.hpp"

#include <algorithm>
#include <cmath>
#include <map>

#include "error.hpp"
#include "ort_backend.hpp"
#include "profiler.hpp"
#include "tokenizer.hpp"

namespace slim {
namespace {

slim_tensor tensor_of(void* data, slim_dtype dtype, const std::vector<int64_t>& shape) {
    slim_tensor t{};
    t.data = data;
    t.dtype = dtype;
    t.device_type = SLIM_DEVICE_CPU;
    t.ndim = static_cast<int32_t>(shape.size());
    t.shape = shape.data();
    return t;
}

// One prompt's conditioning, batch 1 as the Python binding encodes it.
struct Encoded {
    std::vector<float> embeds;  // [1, clip_length + max_sequence_length, joint_attention_dim]
    std::vector<float> pooled;  // [1, pooled_projection_dim]
};

class Encoder {
  public:
    Encoder(const Engine& engine, PromptStats& stats) : engine_(engine), p_(engine.manifest().pipeline), stats_(stats) {}

    // Conditioning as diffusers' encode_prompt assembles it (docs/pipeline.md, Conditioning).
    Encoded encode(const std::string& text) {
        const int64_t L = p_.clip_length, J = p_.joint_attention_dim, T = p_.max_sequence_length;
        Encoded e;
        e.embeds.assign(static_cast<size_t>((L + T) * J), 0.0f);
        e.pooled.reserve(p_.clip_l_pooled_dim + p_.clip_g_pooled_dim);
        int64_t offset = 0;  // feature offset of this CLIP's hidden states in the concatenation
        for (const bool g : {false, true}) {
            const int64_t D = g ? p_.clip_g_dim : p_.clip_l_dim, P = g ? p_.clip_g_pooled_dim : p_.clip_l_pooled_dim;
            std::vector<int64_t> ids = tokenize(g ? "clip_g" : "clip_l", text, L);
            std::vector<float> hidden(static_cast<size_t>(L * D)), pooled(static_cast<size_t>(P));
            const std::vector<int64_t> ids_shape{1, L}, hidden_shape{1, L, D}, pooled_shape{1, P};
            const slim_named_tensor in[] = {{"input_ids", tensor_of(ids.data(), SLIM_DTYPE_INT64, ids_shape)}};
            const slim_named_tensor out[] = {{"hidden_states", tensor_of(hidden.data(), SLIM_DTYPE_FLOAT32, hidden_shape)},
                                             {"pooled", tensor_of(pooled.data(), SLIM_DTYPE_FLOAT32, pooled_shape)}};
            run(g ? engine_.clip_g_stage : engine_.clip_l_stage, in, out, 2, g ? stats_.clip_g_ms : stats_.clip_l_ms);
            for (int64_t t = 0; t < L; ++t) std::copy_n(hidden.begin() + t * D, D, e.embeds.begin() + t * J + offset);
            e.pooled.insert(e.pooled.end(), pooled.begin(), pooled.end());
            offset += D;
        }
        if (p_.t5) {  // without T5 the rows stay zeros, as diffusers' _get_t5_prompt_embeds with no text_encoder_3
            std::vector<int64_t> ids = tokenize("t5", text, T);
            const std::vector<int64_t> ids_shape{1, T}, hidden_shape{1, T, J};
            const slim_named_tensor in[] = {{"input_ids", tensor_of(ids.data(), SLIM_DTYPE_INT64, ids_shape)}};
            const slim_named_tensor out[] = {{"hidden_states", tensor_of(e.embeds.data() + L * J, SLIM_DTYPE_FLOAT32, hidden_shape)}};
            run(engine_.t5_stage, in, out, 1, stats_.t5_ms);
        }
        return e;
    }

  private:
    std::vector<int64_t> tokenize(const char* role, const std::string& text, int64_t length) {
        const Clock::time_point start = Clock::now();
        const TokenizerDecl* decl = engine_.tokenizers().find(role);  // present: prompt_support checked
        if (decl->max_length != length)
            throw Error(SLIM_ERR_BUNDLE, std::string("tokenizer ") + role + " writes " + std::to_string(decl->max_length) +
                                             " ids, but the pipeline block says " + std::to_string(length));
        std::vector<int64_t> ids = engine_.tokenizers().tokenize(*decl, text.data(), text.size());
        stats_.tokenize_ms += ms_between(start, Clock::now());
        return ids;
    }

    void run(int stage, const slim_named_tensor* in, const slim_named_tensor* out, int32_t outputs, double& ms) {
        const Clock::time_point start = Clock::now();
        run_named(engine_.ort(), *engine_.stages()[stage], in, 1, out, outputs);
        ms += ms_between(start, Clock::now());
        ++stats_.encoder_calls;
    }

    const Engine& engine_;
    const PipelineConfig& p_;
    PromptStats& stats_;
};

}  // namespace

std::string prompt_support(const Engine& engine) {
    const Manifest& m = engine.manifest();
    if (m.kind != Family::Sd3) return "the engine's family is '" + m.family + "', not sd3";
    if (!m.has_pipeline)
        return "the bundle has no pipeline stages (no manifest pipeline block); export it with export-engine PIPELINE_FOLDER, or a "
               "transformer checkpoint with --pipeline PIPELINE_FOLDER";
    for (const char* role : {"clip_l", "clip_g", "t5"})
        if ((role[0] != 't' || m.pipeline.t5) && !engine.tokenizers().find(role))
            return std::string("the bundle has no ") + role +
                   " tokenizer; export it with export-engine PIPELINE_FOLDER, or a transformer checkpoint with --pipeline PIPELINE_FOLDER";
    return "";
}

void to_rgb8(const float* image, int batch, int height, int width, uint8_t* out) {
    const size_t plane = static_cast<size_t>(height) * width;
    for (int b = 0; b < batch; ++b)
        for (int c = 0; c < 3; ++c) {
            const float* src = image + (static_cast<size_t>(b) * 3 + c) * plane;
            uint8_t* dst = out + static_cast<size_t>(b) * plane * 3 + c;
            for (size_t i = 0; i < plane; ++i) {
                // float32 throughout; std::nearbyint rounds half to even in the default mode, as numpy's round.
                float x = std::min(std::max(src[i] * 0.5f + 0.5f, 0.0f), 1.0f);
                if (std::isnan(x)) x = 0.0f;  // a NaN pixel has no defined uint8 (numpy's cast gives 0 on x86)
                dst[i * 3] = static_cast<uint8_t>(std::nearbyint(x * 255.0f));
            }
        }
}

PromptStats generate_prompt(const Engine& engine, Sd3Session& session, const PromptRequest& request) {
    const Clock::time_point start = Clock::now();
    const PipelineConfig& p = engine.manifest().pipeline;
    const Sd3Config& c = engine.manifest().config;
    PromptStats stats;
    Encoder encoder(engine, stats);
    const bool cfg = request.guidance_scale > 1.0f;
    const int B = static_cast<int>(request.prompts.size());
    const int64_t text_len = p.clip_length + p.max_sequence_length;

    // Each distinct text of the call is encoded once (the negative "" of a batch, repeated prompts).
    std::map<std::string, Encoded> encoded;
    auto assemble = [&](const std::vector<std::string>& texts, std::vector<float>& embeds, std::vector<float>& pooled) {
        for (const std::string& text : texts) {
            auto it = encoded.find(text);
            if (it == encoded.end()) it = encoded.emplace(text, encoder.encode(text)).first;
            embeds.insert(embeds.end(), it->second.embeds.begin(), it->second.embeds.end());
            pooled.insert(pooled.end(), it->second.pooled.begin(), it->second.pooled.end());
        }
    };
    std::vector<float> embeds, pooled, neg_embeds, neg_pooled;
    assemble(request.prompts, embeds, pooled);
    if (cfg) assemble(request.negatives, neg_embeds, neg_pooled);

    const int h = request.height / p.scale_factor, w = request.width / p.scale_factor;
    std::vector<float> latents(static_cast<size_t>(B) * c.out_channels * h * w);
    GenerateRequest g;
    g.batch = B;
    g.text_len = static_cast<int>(text_len);
    g.height = h;
    g.width = w;
    g.prompt = embeds.data();
    g.pooled = pooled.data();
    if (cfg) {
        g.negative_prompt = neg_embeds.data();
        g.negative_pooled = neg_pooled.data();
    }
    g.latents = request.latents;
    g.seed = request.seed;
    g.guidance_scale = request.guidance_scale;
    g.cache = request.cache;
    g.program = request.program;
    g.out = latents.data();
    stats.generate = session.generate(g);
    if (request.latents_out) std::copy(latents.begin(), latents.end(), request.latents_out);

    // Decoding: latents / scaling_factor + shift_factor in float32 (as numpy does with float32 scalars), the VAE, RGB8.
    const Clock::time_point decode_start = Clock::now();
    for (float& v : latents) v = v / p.scaling_factor + p.shift_factor;
    std::vector<float> image(static_cast<size_t>(B) * 3 * request.height * request.width);
    const std::vector<int64_t> z_shape{B, c.out_channels, h, w}, image_shape{B, 3, request.height, request.width};
    const slim_named_tensor in[] = {{"latents", tensor_of(latents.data(), SLIM_DTYPE_FLOAT32, z_shape)}};
    const slim_named_tensor out[] = {{"image", tensor_of(image.data(), SLIM_DTYPE_FLOAT32, image_shape)}};
    run_named(engine.ort(), *engine.stages()[engine.vae_decode_stage], in, 1, out, 1);
    to_rgb8(image.data(), B, request.height, request.width, request.image);
    stats.vae_decode_ms = ms_between(decode_start, Clock::now());
    stats.total_ms = ms_between(start, Clock::now());
    return stats;
}

}  // namespace slim
