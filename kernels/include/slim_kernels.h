// Token- and cache-reuse kernels of slimengine (X-Slim building blocks), callable by the runtime
// directly and registered with ONNX Runtime as the "ai.slimengine" custom-op domain.
// Every kernel takes contiguous row-major buffers; shapes are given explicitly. The CUDA versions
// will take the same arguments plus a stream, under slim::kernels::cuda.
#pragma once

#include <cstddef>
#include <cstdint>

namespace slim::kernels::cpu {

// Per batch element b: change[b] = mean |a - b|, scale[b] = mean |b| over the other `per_batch` values.
// The X-Slim step- and block-level indicators (relative change = change / scale).
void l1_change(const float* a, const float* b, int64_t batch, int64_t per_batch, float* change, float* scale);

// score[b, n] = mean over c of |r_last[b, n, c] - r_prev[b, n, c]|: the per-token change score.
void token_change_score(const float* r_last, const float* r_prev, int64_t batch, int64_t tokens, int64_t channels, float* score);

// Tokens to recompute: for each batch element the `keep` highest scores, their indices in ascending
// order (ties broken by the lower index). idx has shape [batch, keep].
void select_tokens(const float* score, int64_t batch, int64_t tokens, int64_t keep, int64_t* idx);

// out[b, j, :] = x[b, idx[b, j], :]. Returns false if an index is outside [0, tokens).
bool gather_tokens(const float* x, const int64_t* idx, int64_t batch, int64_t tokens, int64_t count, int64_t channels, float* out);

// cache[b, idx[b, j], :] = values[b, j, :] in place. Returns false if an index is outside [0, tokens).
bool scatter_tokens(float* cache, const int64_t* idx, const float* values, int64_t batch, int64_t tokens, int64_t count, int64_t channels);

// Number of tokens recomputed for a sample ratio rho in (0, 1]: round(rho * tokens), at least 1.
int64_t tokens_for_ratio(double ratio, int64_t tokens);

}  // namespace slim::kernels::cpu
