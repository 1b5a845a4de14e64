#include "lemur_request.hpp"

#include <string>

#include "error.hpp"
#include "tensor_args.hpp"

namespace slim {

EmbedRequest check_embed(const Engine& engine, const EmbedArgs& p) {
    const LemurConfig& c = engine.manifest().lemur;
    auto text = check_tensor(p.text_ids, "text_ids", {-1, -1}, "[B,L]", SLIM_DTYPE_INT64);
    const int64_t B = text[0], L = text[1];
    if (B > c.max_batch || L > c.max_text_len)
        throw Error(SLIM_ERR_SHAPE, "text_ids: batch must be <= " + std::to_string(c.max_batch) +
                                        " and text length <= " + std::to_string(c.max_text_len) + ", got " + shape_text(*p.text_ids));
    const std::string Bs = std::to_string(B), S = std::to_string(c.image_size);
    check_range(p.text_ids, text, "text_ids", 0, c.vocab_size);
    if (p.segment_ids) {
        auto seg = check_tensor(p.segment_ids, "segment_ids", text, shape_text(*p.text_ids) + " (as text_ids)", SLIM_DTYPE_INT64);
        check_range(p.segment_ids, seg, "segment_ids", 0, c.num_segments);
    }
    auto frames = check_tensor(p.frames, "frames", {B, -1, 3, c.image_size, c.image_size}, "[" + Bs + ",F,3," + S + "," + S + "]");
    if (frames[1] > c.max_frames)
        throw Error(SLIM_ERR_SHAPE, "frames: at most " + std::to_string(c.max_frames) + " frames, got " + shape_text(*p.frames));
    check_finite(p.frames, frames, "frames");
    check_tensor(p.out, "embeddings_out", {B, c.embed_dim}, "[" + Bs + "," + std::to_string(c.embed_dim) + "]");
    EmbedRequest request;
    if (p.bank) {
        if (p.bank->read_only()) throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_embed: the bank is open read-only");
        if (p.bank->dim() != c.embed_dim)
            throw Error(SLIM_ERR_SHAPE, "slim_embed: the bank holds " + std::to_string(p.bank->dim()) +
                                            "-d embeddings but this model makes " + std::to_string(c.embed_dim) + "-d ones");
        auto ids = check_tensor(p.document_ids, "document_ids", {B}, "[" + Bs + "]", SLIM_DTYPE_INT64);
        check_range(p.document_ids, ids, "document_ids", 0, kMaxId);
        if (p.model_version < -1 || p.model_version > int64_t(UINT32_MAX))
            throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_embed_params.model_version must be -1 (the bundle's) or in [0, 2^32), got " +
                                                       std::to_string(p.model_version));
        request.bank = p.bank;
        request.document_ids = static_cast<const int64_t*>(p.document_ids->data);
        request.model_version = static_cast<uint32_t>(p.model_version < 0 ? c.model_version : p.model_version);
    }
    request.batch = B;
    request.text_len = L;
    request.frames = frames[1];
    request.text_ids = static_cast<const int64_t*>(p.text_ids->data);
    request.segment_ids = p.segment_ids ? static_cast<const int64_t*>(p.segment_ids->data) : nullptr;
    request.frames_data = static_cast<const float*>(p.frames->data);
    request.out = static_cast<float*>(p.out->data);
    return request;
}

ScoreRequest check_score(const Engine& engine, const ScoreArgs& p) {
    const LemurConfig& c = engine.manifest().lemur;
    if (p.bank->dim() != c.embed_dim)
        throw Error(SLIM_ERR_SHAPE, "slim_score: the bank holds " + std::to_string(p.bank->dim()) + "-d embeddings but this model takes " +
                                        std::to_string(c.embed_dim) + "-d ones");
    if (p.missing_policy != SLIM_MISSING_ERROR && p.missing_policy != SLIM_MISSING_SKIP)
        throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_score_params.missing_policy must be SLIM_MISSING_ERROR (0) or SLIM_MISSING_SKIP (1)");
    auto history = check_tensor(p.history_ids, "history_ids", {-1, -1}, "[B,H]", SLIM_DTYPE_INT64);
    const int64_t B = history[0], H = history[1];
    if (B > c.max_batch || H > c.max_history)
        throw Error(SLIM_ERR_SHAPE, "history_ids: batch must be <= " + std::to_string(c.max_batch) +
                                        " and history length <= " + std::to_string(c.max_history) + ", got " + shape_text(*p.history_ids));
    check_range(p.history_ids, history, "history_ids (-1 pads)", -1, kMaxId);
    auto query = check_tensor(p.query_ids, "query_ids", {B, -1}, "[" + std::to_string(B) + ",Lq]", SLIM_DTYPE_INT64);
    if (query[1] > c.max_query_len)
        throw Error(SLIM_ERR_SHAPE, "query_ids: at most " + std::to_string(c.max_query_len) + " tokens, got " + shape_text(*p.query_ids));
    check_range(p.query_ids, query, "query_ids", 0, c.vocab_size);
    check_tensor(p.out, "scores_out", {B}, "[" + std::to_string(B) + "]");
    ScoreRequest request;
    request.batch = B;
    request.history_len = H;
    request.query_len = query[1];
    request.bank = p.bank;
    request.history_ids = static_cast<const int64_t*>(p.history_ids->data);
    request.query_ids = static_cast<const int64_t*>(p.query_ids->data);
    request.skip_missing = p.missing_policy == SLIM_MISSING_SKIP;
    request.min_model_version = p.min_model_version;
    request.out = static_cast<float*>(p.out->data);
    return request;
}

}  // namespace slim
