#include "prompt_program.hpp"

#include <algorithm>
#include <initializer_list>
#include <map>

#include "error.hpp"
#include "profiler.hpp"
#include "stage.hpp"
#include "tokenizer.hpp"

namespace slim {
namespace {

// One call of stage `stage` on OrtValues over the runner's buffers, its inputs and outputs in the graph's order (the
// manifest's names, which bind_sd3_stages checked): ONNX Runtime writes the outputs in place and refuses a shape other
// than the computed one. The ops' queued work is finished first: the stage may read or write what they touched.
void run_stage(const Engine& engine, DeviceOps& ops, int stage, std::initializer_list<const OrtValue*> inputs,
               std::initializer_list<OrtValue*> outputs) {
    ops.finish();
    const std::vector<const OrtValue*> in(inputs);
    const std::vector<OrtValue*> out(outputs);
    engine.stages()[stage]->run(in.data(), out.data());
}

class Encoder {
  public:
    Encoder(const Engine& engine, Sd3Runner& runner, PromptBuffers& buffers, Profiler& profiler, PromptStats& stats,
            const Progress& progress)
        : engine_(engine),
          stages_(runner.stages()),
          ops_(runner.ops()),
          allocator_(runner.allocator()),
          buffers_(buffers),
          p_(engine.manifest().pipeline),
          profiler_(profiler),
          stats_(stats),
          progress_(progress) {}

    // Conditioning as diffusers' encode_prompt assembles it (docs/pipeline.md, Conditioning), written in place: each
    // CLIP's hidden states into their columns, the pooled outputs side by side, T5's rows after the CLIP rows.
    std::shared_ptr<const Encoded> encode(const std::string& text) {
        const int64_t L = p_.clip_length, J = p_.joint_attention_dim, T = p_.max_sequence_length;
        auto e = std::make_shared<Encoded>();
        e->embeds.shape(allocator_, {1, L + T, J});
        e->pooled.shape(allocator_, {1, p_.clip_l_pooled_dim + p_.clip_g_pooled_dim});
        ops_.fill(e->embeds.f32(), 0.0f, e->embeds.count());  // the padding columns, and T5's rows for a bundle without T5
        int64_t offset = 0, pooled_offset = 0;                // this CLIP's columns in the concatenation, its pooled values'
        for (const bool g : {false, true}) {
            const int64_t D = g ? p_.clip_g_dim : p_.clip_l_dim, P = g ? p_.clip_g_pooled_dim : p_.clip_l_pooled_dim;
            const OrtValue* ids = tokenize(g ? "clip_g" : "clip_l", text, L);
            buffers_.hidden.shape(allocator_, {1, L, D});
            const TensorView pooled = e->pooled.view(pooled_offset * sizeof(float), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {1, P});
            run(g ? stages_.clip_g : stages_.clip_l, {ids}, {buffers_.hidden.value(), pooled.get()},
                g ? stats_.clip_g_ms : stats_.clip_l_ms);
            // diffusers pads the CLIP concatenation to J features with F.pad, which truncates when CLIP-L + CLIP-G are
            // wider than J (a negative pad): only the first J features of the concatenation are kept.
            const int64_t kept = std::clamp<int64_t>(J - offset, 0, D);
            if (kept > 0) ops_.copy_rows(e->embeds.f32() + offset, J, buffers_.hidden.f32(), D, L, kept);
            offset += D;
            pooled_offset += P;
        }
        if (p_.t5) {  // without T5 the rows stay zeros, as diffusers' _get_t5_prompt_embeds with no text_encoder_3
            const OrtValue* ids = tokenize("t5", text, T);
            const TensorView out = e->embeds.view(L * J * sizeof(float), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {1, T, J});
            run(stages_.t5, {ids}, {out.get()}, stats_.t5_ms);
        }
        ops_.finish();  // complete before the sampler's copies read it
        return e;
    }

  private:
    // The text's token ids from the role's tokenizer, uploaded into buffers_.ids ([1, length] int64).
    const OrtValue* tokenize(const char* role, const std::string& text, int64_t length) {
        const int calls = p_.t5 ? 3 : 2, call = role[0] == 't' ? 2 : role[5] == 'g';  // clip_l, clip_g, t5
        progress_.report(SLIM_PHASE_TOKENIZE, call, calls);
        const Clock::time_point start = Clock::now();
        const TokenizerDecl* decl = engine_.tokenizers().find(role);  // present: prompt_support checked
        if (decl->max_length != length)
            throw Error(SLIM_ERR_BUNDLE, std::string("tokenizer ") + role + " writes " + std::to_string(decl->max_length) +
                                             " ids, but the pipeline block says " + std::to_string(length));
        const std::vector<int64_t> ids = engine_.tokenizers().tokenize(*decl, text.data(), text.size());
        const Clock::time_point end = Clock::now();
        profiler_.tokenize(start, end);
        stats_.tokenize_ms += ms_between(start, end);
        buffers_.ids.shape(allocator_, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, {1, length});
        ops_.upload(buffers_.ids.data(), ids.data(), buffers_.ids.bytes());
        return buffers_.ids.value();
    }

    void run(int stage, std::initializer_list<const OrtValue*> in, std::initializer_list<OrtValue*> out, double& ms) {
        const Clock::time_point start = Clock::now();
        run_stage(engine_, ops_, stage, in, out);
        const Clock::time_point end = Clock::now();
        profiler_.stage(stage, start, end);
        ms += ms_between(start, end);
        ++stats_.encoder_calls;
    }

    const Engine& engine_;
    const Sd3Stages& stages_;
    DeviceOps& ops_;
    const DeviceAllocator& allocator_;
    PromptBuffers& buffers_;
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

PromptStats generate_prompt(const Engine& engine, Sd3Runner& runner, PromptState& state, const PromptRequest& request) {
    const Clock::time_point start = Clock::now();
    const PipelineConfig& p = engine.manifest().pipeline;
    const Sd3Config& c = engine.manifest().config;
    PromptStats stats;
    Profiler& profiler = runner.profiler();
    DeviceOps& ops = runner.ops();
    const DeviceAllocator& allocator = runner.allocator();
    PromptBuffers& buffers = state.buffers;
    const bool cfg = request.guidance_scale > 1.0f;
    const int B = static_cast<int>(request.prompts.size());
    // The record holds every tokenizer and encoder call of the texts, the decode's two events and the call's; the
    // sampling reserves its own.
    profiler.begin_generation(static_cast<size_t>(B) * (cfg ? 2 : 1) * 6 + 3);
    ops.reset_transfer_bytes();
    Encoder encoder(engine, runner, buffers, profiler, stats, request.progress);

    // Each distinct text is encoded once: found earlier in this call (the negative "" of a batch, repeated prompts) or in
    // the session's cache, else encoded and kept there. The sampler copies each row from its entry.
    std::map<std::string, std::shared_ptr<const Encoded>> encoded;
    auto assemble = [&](const std::vector<std::string>& texts, ConditioningRows& rows) {
        for (const std::string& text : texts) {
            auto it = encoded.find(text);
            if (it == encoded.end()) {
                std::shared_ptr<const Encoded> entry = state.cache.find(text);
                if (entry) {
                    ++stats.cache_hits;
                } else {
                    entry = encoder.encode(text);
                    ++stats.cache_misses;
                    state.cache.put(text, entry);
                }
                it = encoded.emplace(text, std::move(entry)).first;
            } else {
                ++stats.cache_hits;
            }
            rows.text.push_back(it->second->embeds.f32());
            rows.pooled.push_back(it->second->pooled.f32());
        }
    };
    request.progress.report(SLIM_PHASE_ENCODE, 0, 1);
    ConditioningRows rows, positive;  // the model batch: [negative; positive] under CFG
    assemble(request.prompts, positive);
    if (cfg) assemble(request.negatives, rows);
    rows.text.insert(rows.text.end(), positive.text.begin(), positive.text.end());
    rows.pooled.insert(rows.pooled.end(), positive.pooled.begin(), positive.pooled.end());

    const int h = request.height / p.scale_factor, w = request.width / p.scale_factor;
    GenerateRequest g;
    g.batch = B;
    g.text_len = static_cast<int>(p.clip_length + p.max_sequence_length);
    g.height = h;
    g.width = w;
    g.rows = &rows;
    g.latents = request.latents;
    g.seeds = request.seeds;
    g.guidance_scale = request.guidance_scale;
    g.xslim = request.xslim;
    g.program = request.program;
    g.progress = request.progress;
    g.continue_call = true;  // the latents stay in the runner's buffers (g.out is null)
    stats.generate = runner.generate(g);
    request.progress.report(SLIM_PHASE_DECODE, 0, 1);  // the last point a call may be cancelled: nothing is written before it
    const int64_t latent_count = static_cast<int64_t>(B) * c.out_channels * h * w;
    if (request.latents_out) ops.download(request.latents_out, runner.latents(), latent_count * sizeof(float));

    // Decoding: latents / scaling_factor + shift_factor in float32 (as numpy does with float32 scalars), the VAE, RGB8.
    const Clock::time_point decode_start = Clock::now();
    buffers.vae_in.shape(allocator, {B, c.out_channels, h, w});
    ops.unscale_latents(buffers.vae_in.f32(), runner.latents(), p.scaling_factor, p.shift_factor, latent_count);
    buffers.image.shape(allocator, {B, 3, request.height, request.width});
    const Clock::time_point vae_start = Clock::now();
    const int vae_decode = runner.stages().vae_decode;
    run_stage(engine, ops, vae_decode, {buffers.vae_in.value()}, {buffers.image.value()});
    profiler.stage(vae_decode, vae_start, Clock::now());
    buffers.rgb.shape(allocator, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, {B, request.height, request.width, 3});
    // The steps refuse NaN latents; a NaN pixel has no defined uint8 either (it would pass as black): refuse it too.
    if (!ops.to_rgb8(buffers.image.f32(), B, request.height, request.width, static_cast<uint8_t*>(buffers.rgb.data())))
        throw Error(SLIM_ERR_NUMERICS,
                    "stage vae_decode produced NaN from finite latents (NaN weights in the bundle's VAE, an fp16 overflow, or given "
                    "latents far outside the VAE's range); no image was written");
    ops.download(request.image, buffers.rgb.data(), buffers.rgb.bytes());
    const Clock::time_point end = Clock::now();
    profiler.decode(decode_start, end);
    profiler.image(start, end);
    stats.vae_decode_ms = ms_between(decode_start, end);
    stats.total_ms = ms_between(start, end);
    stats.transfer_bytes = ops.transfer_bytes();
    return stats;
}

}  // namespace slim
