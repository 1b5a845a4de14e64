#include "lemur_program.hpp"

#include <chrono>
#include <cmath>
#include <cstring>
#include <string>

#include "error.hpp"

namespace slim {
namespace {

// Events of one embed/score: the call, its stage call and its bank work (at most one of each).
constexpr size_t kEventsPerCall = 3;

}  // namespace

namespace {
using Names = std::vector<std::string>;
}  // namespace

LemurStages bind_lemur_stages(const Manifest& manifest) {
    LemurStages st;
    for (size_t i = 0; i < manifest.stages.size(); ++i) {
        const StageDecl& s = manifest.stages[i];
        if (s.role == Role::LemurEmbed) {
            if (st.embed >= 0) throw Error(SLIM_ERR_BUNDLE, "manifest: stage " + s.name + " is a second lemur_embed stage");
            expect_stage_io(s, {"text_ids", "segment_ids", "frames"}, {"doc_embedding"}, "LEMUR embed");
            if (s.input_dtypes != Names{"int64", "int64", "float32"})
                throw Error(SLIM_ERR_BUNDLE, "manifest: stage embed inputs (text_ids, segment_ids, frames) must be int64, int64, float32");
            st.embed = static_cast<int>(i);
        } else {  // Role::LemurScore: the manifest allows no other role in a lemur bundle
            if (st.score >= 0) throw Error(SLIM_ERR_BUNDLE, "manifest: stage " + s.name + " is a second lemur_score stage");
            expect_stage_io(s, {"history", "history_mask", "query_ids"}, {"score"}, "LEMUR score");
            if (s.input_dtypes != Names{"float32", "float32", "int64"})
                throw Error(SLIM_ERR_BUNDLE,
                            "manifest: stage score inputs (history, history_mask, query_ids) must be float32, float32, int64");
            st.score = static_cast<int>(i);
        }
    }
    if (st.embed < 0 || st.score < 0)
        throw Error(SLIM_ERR_BUNDLE, "manifest: a lemur bundle needs the embed and score stages (roles lemur_embed and lemur_score)");
    return st;
}

LemurRunner::LemurRunner(const Engine& engine) : Runner(engine), engine_(engine), stage_of_(bind_lemur_stages(engine.manifest())) {}

double LemurRunner::run(int stage, std::initializer_list<const OrtValue*> inputs, std::initializer_list<OrtValue*> outputs) {
    return run_stage(engine_, stage, inputs.begin(), outputs.begin(), stages_, profiler_);
}

LemurStats LemurRunner::embed(const EmbedRequest& r) {
    auto start = Clock::now();
    profiler_.begin_generation(kEventsPerCall);
    const LemurConfig& c = engine_.manifest().lemur;
    const OrtRuntime& ort = engine_.ort();
    for (auto& s : stages_) s = StageStats{};
    const int64_t B = r.batch, L = r.text_len, E = c.embed_dim;
    const int64_t* segments = r.segment_ids;
    if (!segments) {
        zero_segments_.assign(static_cast<size_t>(B * L), 0);
        segments = zero_segments_.data();
    }
    // ONNX Runtime only reads inputs; its API takes non-const pointers.
    TensorView text(ort, const_cast<int64_t*>(r.text_ids), ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, {B, L});
    TensorView segment(ort, const_cast<int64_t*>(segments), ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, {B, L});
    TensorView frames(ort, const_cast<float*>(r.frames_data), {B, r.frames, 3, c.image_size, c.image_size});
    // Into our buffer first: a call that fails (NaN, bank error) leaves the caller's output untouched.
    result_.resize(static_cast<size_t>(B * E));
    TensorView out(ort, result_.data(), {B, E});
    LemurStats stats;
    stats.batch = B;
    stats.backend_ms = run(stage_of_.embed, {text.get(), segment.get(), frames.get()}, {out.get()});
    for (int64_t i = 0; i < B * E; ++i)
        if (!std::isfinite(result_[i]))
            throw Error(SLIM_ERR_NUMERICS, "embed: the model produced NaN or Inf for document " + std::to_string(i / E));
    if (r.bank) {
        auto bank_start = Clock::now();
        const int64_t now =
            std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
        r.bank->upsert(r.document_ids, result_.data(), static_cast<size_t>(B), r.model_version, now);
        auto bank_end = Clock::now();
        profiler_.bank(bank_start, bank_end);
        stats.bank_ms = ms_between(bank_start, bank_end);
    }
    std::memcpy(r.out, result_.data(), result_.size() * sizeof(float));
    auto end = Clock::now();
    profiler_.generation(start, end);
    stats.total_ms = ms_between(start, end);
    return stats;
}

LemurStats LemurRunner::score(const ScoreRequest& r) {
    auto start = Clock::now();
    profiler_.begin_generation(kEventsPerCall);
    const LemurConfig& c = engine_.manifest().lemur;
    const OrtRuntime& ort = engine_.ort();
    for (auto& s : stages_) s = StageStats{};
    const int64_t B = r.batch, H = r.history_len, E = c.embed_dim;
    const size_t slots = static_cast<size_t>(B * H);
    history_.resize(slots * E);
    mask_.resize(slots);
    versions_.resize(slots);

    // History assembly: one bulk lookup, then the missing-id policy (docs/memory-bank.md).
    LemurStats stats;
    stats.batch = B;
    auto bank_start = Clock::now();
    r.bank->lookup(r.history_ids, slots, history_.data(), nullptr, versions_.data());
    for (size_t i = 0; i < slots; ++i) {
        const int64_t id = r.history_ids[i];
        const bool usable = versions_[i] >= 0 && versions_[i] >= r.min_model_version;
        mask_[i] = usable ? 1.0f : 0.0f;
        if (id < 0 || usable) {
            stats.history_found += usable;
            continue;
        }
        stats.history_missing += 1;
        if (!r.skip_missing) {
            std::string where = "history_ids[" + std::to_string(i / H) + "," + std::to_string(i % H) + "] = " + std::to_string(id);
            if (versions_[i] < 0)
                throw Error(SLIM_ERR_NOT_FOUND, where + " is not in the memory bank (embed it first, or score with missing_policy SKIP)");
            throw Error(SLIM_ERR_NOT_FOUND, where + " was written by model version " + std::to_string(versions_[i]) + ", older than " +
                                                "min_model_version " + std::to_string(r.min_model_version));
        }
    }
    auto bank_end = Clock::now();
    profiler_.bank(bank_start, bank_end);
    stats.bank_ms = ms_between(bank_start, bank_end);

    TensorView history(ort, history_.data(), {B, H, E});
    TensorView mask(ort, mask_.data(), {B, H});
    TensorView query(ort, const_cast<int64_t*>(r.query_ids), ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, {B, r.query_len});
    result_.resize(static_cast<size_t>(B));
    TensorView out(ort, result_.data(), {B});
    stats.backend_ms = run(stage_of_.score, {history.get(), mask.get(), query.get()}, {out.get()});
    for (int64_t i = 0; i < B; ++i)
        if (!std::isfinite(result_[i])) throw Error(SLIM_ERR_NUMERICS, "score: the model produced NaN or Inf for row " + std::to_string(i));
    std::memcpy(r.out, result_.data(), result_.size() * sizeof(float));
    auto end = Clock::now();
    profiler_.generation(start, end);
    stats.total_ms = ms_between(start, end);
    return stats;
}

}  // namespace slim
