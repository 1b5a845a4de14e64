// The LEMUR programs over an engine's stages: batched document embedding (optionally written to a
// memory bank) and scoring, where each user's history is assembled from the bank by document id.
#pragma once

#include <cstdint>
#include <vector>

#include "engine.hpp"
#include "memory_bank.hpp"
#include "profiler.hpp"

namespace slim {

// Inputs already validated at the C boundary: shapes agree with the manifest, ids in range, data finite.
struct EmbedRequest {
    int64_t batch = 0, text_len = 0, frames = 0;
    const int64_t* text_ids = nullptr;     // [B, L]
    const int64_t* segment_ids = nullptr;  // [B, L] or nullptr (all title)
    const float* frames_data = nullptr;    // [B, F, 3, S, S]
    float* out = nullptr;                  // [B, embed_dim]
    MemoryBank* bank = nullptr;            // optional: upsert the results under document_ids
    const int64_t* document_ids = nullptr;
    uint32_t model_version = 0;
};

struct ScoreRequest {
    int64_t batch = 0, history_len = 0, query_len = 0;
    const MemoryBank* bank = nullptr;
    const int64_t* history_ids = nullptr;  // [B, H], -1 pads
    const int64_t* query_ids = nullptr;    // [B, Lq]
    bool skip_missing = false;             // missing or stale ids: skipped (masked out) instead of an error
    int64_t min_model_version = 0;         // entries of an older model version count as missing
    float* out = nullptr;                  // [B]
};

struct LemurStats {
    int64_t batch = 0, history_found = 0, history_missing = 0;
    double total_ms = 0, backend_ms = 0, bank_ms = 0;
};

class LemurSession {
  public:
    explicit LemurSession(const Engine& engine);

    // Throws Error(SLIM_ERR_BACKEND) if a stage fails, Error(SLIM_ERR_NUMERICS) on a non-finite result.
    LemurStats embed(const EmbedRequest& request);
    // Throws Error(SLIM_ERR_NOT_FOUND) naming the first missing or stale id unless skip_missing.
    LemurStats score(const ScoreRequest& request);

    const std::vector<StageStats>& stage_stats() const { return stages_; }
    // Events of the last embed/score call when profiling is on: the call (SLIM_EVENT_GENERATION), its
    // stage call and its bank work (SLIM_EVENT_BANK), with the clock reads of LemurStats.
    Profiler& profiler() { return profiler_; }
    const Profiler& profiler() const { return profiler_; }

  private:
    double run(int stage, std::initializer_list<const OrtValue*> inputs, std::initializer_list<OrtValue*> outputs);

    const Engine& engine_;
    std::vector<StageStats> stages_;
    Profiler profiler_;
    // Buffers, grown on demand and reused across calls.
    std::vector<int64_t> zero_segments_, versions_;
    std::vector<float> history_, mask_;
    std::vector<float> result_;  // embeddings or scores, copied out once the call has succeeded
};

}  // namespace slim
