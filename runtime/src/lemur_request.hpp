// slim_embed's and slim_score's arguments as the C boundary passes them on (params struct read, bank handle
// resolved), checked against the bundle's LemurConfig into the requests LemurRunner runs (lemur_program.hpp).
#pragma once

#include <cstdint>

#include "engine.hpp"
#include "lemur_program.hpp"
#include "memory_bank.hpp"
#include "slimengine.h"

namespace slim {

// slim_embed's arguments (slim_embed_params' and embeddings_out).
struct EmbedArgs {
    const slim_tensor *text_ids = nullptr, *segment_ids = nullptr, *frames = nullptr, *document_ids = nullptr;
    MemoryBank* bank = nullptr;  // optional
    int64_t model_version = -1;  // < 0: the bundle's
    const slim_tensor* out = nullptr;
};

// slim_score's arguments (slim_score_params' and scores_out).
struct ScoreArgs {
    const MemoryBank* bank = nullptr;  // required (checked at the boundary)
    const slim_tensor *history_ids = nullptr, *query_ids = nullptr;
    int32_t missing_policy = SLIM_MISSING_ERROR;
    int64_t min_model_version = 0;
    const slim_tensor* out = nullptr;
};

// Throw Error (INVALID_ARGUMENT, SHAPE, DTYPE, NUMERICS) naming the argument at fault.
EmbedRequest check_embed(const Engine& engine, const EmbedArgs& args);
ScoreRequest check_score(const Engine& engine, const ScoreArgs& args);

}  // namespace slim
