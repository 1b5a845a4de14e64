#include "prompt_program.hpp"

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <map>

#include "error.hpp"
#include "profiler.hpp"
#include "stage.hpp"
#include "tokenizer.hpp"

namespace slim {
namespace {

// One call of stage `stage` on host tensors, its inputs and outputs in the graph's order (the manifest's names, which
// bind_sd3_stages checked): ONNX Runtime writes the outputs in place and refuses a shape other than the computed one.
void run_host(const Engine& engine, int stage, std::initializer_list<const TensorView*> inputs,
              std::initializer_list<const TensorView*> outputs) {
    std::vector<const OrtValue*> in;
    std::vector<OrtValue*> out;
    for (const TensorView* t : inputs) in.push_back(t->get());
    for (const TensorView* t : outputs) out.push_back(t->get());
    engine.stages()[stage]->run(in.data(), out.data());
}

class Encoder {
  public:
    Encoder(const Engine& engine, const Sd3Stages& stages, Profiler& profiler, PromptStats& stats, const Progress& progress)
        : engine_(engine), stages_(stages), p_(engine.manifest().pipeline), profiler_(profiler), stats_(stats), progress_(progress) {}

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
            const OrtRuntime& ort = engine_.ort();
            const TensorView in(ort, ids.data(), ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, ids_shape);
            const TensorView out_hidden(ort, hidden.data(), hidden_shape), out_pooled(ort, pooled.data(), pooled_shape);
            run(g ? stages_.clip_g : stages_.clip_l, {&in}, {&out_hidden, &out_pooled}, g ? stats_.clip_g_ms : stats_.clip_l_ms);
            // diffusers pads the CLIP concatenation to J features with F.pad, which truncates when CLIP-L + CLIP-G are
            // wider than J (a negative pad): only the first J features of the concatenation are kept.
            const int64_t kept = std::clamp<int64_t>(J - offset, 0, D);
            for (int64_t t = 0; t < L; ++t) std::copy_n(hidden.begin() + t * D, kept, e.embeds.begin() + t * J + offset);
            e.pooled.insert(e.pooled.end(), pooled.begin(), pooled.end());
            offset += D;
        }
        if (p_.t5) {  // without T5 the rows stay zeros, as diffusers' _get_t5_prompt_embeds with no text_encoder_3
            std::vector<int64_t> ids = tokenize("t5", text, T);
            const std::vector<int64_t> ids_shape{1, T}, hidden_shape{1, T, J};
            const TensorView in(engine_.ort(), ids.data(), ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, ids_shape);
            const TensorView out(engine_.ort(), e.embeds.data() + L * J, hidden_shape);
            run(stages_.t5, {&in}, {&out}, stats_.t5_ms);
        }
        return e;
    }

  private:
    std::vector<int64_t> tokenize(const char* role, const std::string& text, int64_t length) {
        const int calls = p_.t5 ? 3 : 2, call = role[0] == 't' ? 2 : role[5] == 'g';  // clip_l, clip_g, t5
        progress_.report(SLIM_PHASE_TOKENIZE, call, calls);
        const Clock::time_point start = Clock::now();
        const TokenizerDecl* decl = engine_.tokenizers().find(role);  // present: prompt_support checked
        if (decl->max_length != length)
            throw Error(SLIM_ERR_BUNDLE, std::string("tokenizer ") + role + " writes " + std::to_string(decl->max_length) +
                                             " ids, but the pipeline block says " + std::to_string(length));
        std::vector<int64_t> ids = engine_.tokenizers().tokenize(*decl, text.data(), text.size());
        const Clock::time_point end = Clock::now();
        profiler_.tokenize(start, end);
        stats_.tokenize_ms += ms_between(start, end);
        return ids;
    }

    void run(int stage, std::initializer_list<const TensorView*> in, std::initializer_list<const TensorView*> out, double& ms) {
        const Clock::time_point start = Clock::now();
        run_host(engine_, stage, in, out);
        const Clock::time_point end = Clock::now();
        profiler_.stage(stage, start, end);
        ms += ms_between(start, end);
        ++stats_.encoder_calls;
    }

    const Engine& engine_;
    const Sd3Stages& stages_;
    const PipelineConfig& p_;
    Profiler& profiler_;
    PromptStats& stats_;
    const Progress& progress_;
};

}  // namespace

void PromptCache::set_capacity(int capacity) {
    capacity_ = capacity;
    trim();
}

void PromptCache::clear() {
    order_.clear();
    index_.clear();
}

std::shared_ptr<const Encoded> PromptCache::find(const std::string& text) {
    const auto it = index_.find(text);
    if (it == index_.end()) return nullptr;
    order_.splice(order_.begin(), order_, it->second);  // the most recently used first; iterators stay valid
    return it->second->second;
}

void PromptCache::put(const std::string& text, std::shared_ptr<const Encoded> entry) {
    if (capacity_ <= 0) return;
    const auto it = index_.find(text);
    if (it != index_.end()) {
        it->second->second = std::move(entry);
        order_.splice(order_.begin(), order_, it->second);
        return;
    }
    order_.emplace_front(text, std::move(entry));
    index_.emplace(text, order_.begin());
    trim();
}

void PromptCache::trim() {
    while (static_cast<int>(order_.size()) > std::max(capacity_, 0)) {
        index_.erase(order_.back().first);
        order_.pop_back();
    }
}

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

PromptStats generate_prompt(const Engine& engine, Sd3Runner& session, PromptCache& cache, const PromptRequest& request) {
    const Clock::time_point start = Clock::now();
    const PipelineConfig& p = engine.manifest().pipeline;
    const Sd3Config& c = engine.manifest().config;
    PromptStats stats;
    Profiler& profiler = session.profiler();
    const bool cfg = request.guidance_scale > 1.0f;
    const int B = static_cast<int>(request.prompts.size());
    // The record holds every tokenizer and encoder call of the texts, the decode's two events and the call's; the
    // sampling reserves its own.
    profiler.begin_generation(static_cast<size_t>(B) * (cfg ? 2 : 1) * 6 + 3);
    Encoder encoder(engine, session.stages(), profiler, stats, request.progress);
    const int64_t text_len = p.clip_length + p.max_sequence_length;

    // Each distinct text is encoded once: found earlier in this call (the negative "" of a batch, repeated prompts) or in
    // the session's cache, else encoded and kept there.
    std::map<std::string, std::shared_ptr<const Encoded>> encoded;
    auto assemble = [&](const std::vector<std::string>& texts, std::vector<float>& embeds, std::vector<float>& pooled) {
        for (const std::string& text : texts) {
            auto it = encoded.find(text);
            if (it == encoded.end()) {
                std::shared_ptr<const Encoded> entry = cache.find(text);
                if (entry) {
                    ++stats.cache_hits;
                } else {
                    entry = std::make_shared<const Encoded>(encoder.encode(text));
                    ++stats.cache_misses;
                    cache.put(text, entry);
                }
                it = encoded.emplace(text, std::move(entry)).first;
            } else {
                ++stats.cache_hits;
            }
            embeds.insert(embeds.end(), it->second->embeds.begin(), it->second->embeds.end());
            pooled.insert(pooled.end(), it->second->pooled.begin(), it->second->pooled.end());
        }
    };
    request.progress.report(SLIM_PHASE_ENCODE, 0, 1);
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
    g.seeds = request.seeds;
    g.guidance_scale = request.guidance_scale;
    g.xslim = request.xslim;
    g.program = request.program;
    g.out = latents.data();
    g.progress = request.progress;
    g.continue_record = true;
    stats.generate = session.generate(g);
    request.progress.report(SLIM_PHASE_DECODE, 0, 1);  // the last point a call may be cancelled: nothing is written before it
    if (request.latents_out) std::copy(latents.begin(), latents.end(), request.latents_out);

    // Decoding: latents / scaling_factor + shift_factor in float32 (as numpy does with float32 scalars), the VAE, RGB8.
    const Clock::time_point decode_start = Clock::now();
    for (float& v : latents) v = v / p.scaling_factor + p.shift_factor;
    std::vector<float> image(static_cast<size_t>(B) * 3 * request.height * request.width);
    const std::vector<int64_t> z_shape{B, c.out_channels, h, w}, image_shape{B, 3, request.height, request.width};
    const TensorView in(engine.ort(), latents.data(), z_shape), out(engine.ort(), image.data(), image_shape);
    const Clock::time_point vae_start = Clock::now();
    const int vae_decode = session.stages().vae_decode;
    run_host(engine, vae_decode, {&in}, {&out});
    profiler.stage(vae_decode, vae_start, Clock::now());
    // The steps refuse NaN latents; a NaN pixel has no defined uint8 either (it would pass as black): refuse it too.
    for (size_t i = 0; i < image.size(); ++i)
        if (std::isnan(image[i]))
            throw Error(SLIM_ERR_NUMERICS, "stage vae_decode produced NaN (element " + std::to_string(i) +
                                               ") from finite latents: the bundle's VAE is broken (NaN weights, or an fp16 overflow); "
                                               "no image was written");
    to_rgb8(image.data(), B, request.height, request.width, request.image);
    const Clock::time_point end = Clock::now();
    profiler.decode(decode_start, end);
    profiler.image(start, end);
    stats.vae_decode_ms = ms_between(decode_start, end);
    stats.total_ms = ms_between(start, end);
    return stats;
}

}  // namespace slim
