// The LEMUR programs over an engine's stages: batched document embedding (optionally written to a
// memory bank) and scoring, where each user's history is assembled from the bank by document id.
#pragma once

#include <cstdint>
#include <vector>

#include "engine.hpp"
#include "memory_bank.hpp"
#include "profiler.hpp"
#include "program.hpp"

namespace slim {

// An embed request as check_embed makes it (lemur_request.hpp): shapes agree with the manifest, ids in range, data finite.
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

// The stages the LEMUR programs call, bound by their manifest roles.
struct LemurStages {
    int embed = -1, score = -1;
};

// Binds a lemur manifest's stages and checks their inputs, outputs and dtypes: Error(SLIM_ERR_BUNDLE) naming what is wrong.
LemurStages bind_lemur_stages(const Manifest& manifest);

// Profiling events of an embed/score call: the call (SLIM_EVENT_GENERATION), its stage call and its
// bank work (SLIM_EVENT_BANK), with the clock reads of LemurStats.
class LemurRunner final : public Runner {
  public:
    explicit LemurRunner(const Engine& engine);

    // Run a checked request (lemur_request.hpp). embed: Error(SLIM_ERR_BACKEND) if the stage fails,
    // Error(SLIM_ERR_NUMERICS) on a non-finite result.
    LemurStats embed(const EmbedRequest& request);
    // score: also Error(SLIM_ERR_NOT_FOUND) naming the first missing or stale id unless the request skips them.
    LemurStats score(const ScoreRequest& request);

  private:
    double run(int stage, std::initializer_list<const OrtValue*> inputs, std::initializer_list<OrtValue*> outputs);

    const Engine& engine_;
    const LemurStages stage_of_;
    // Buffers, grown on demand and reused across calls.
    std::vector<int64_t> zero_segments_, versions_;
    std::vector<float> history_, mask_;
    std::vector<float> result_;  // embeddings or scores, copied out once the call has succeeded
};

}  // namespace slim
