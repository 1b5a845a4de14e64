// The CPU kernels of slimengine: the token- and cache-reuse kernels (X-Slim building blocks), also
// registered with ONNX Runtime as the "ai.slimengine" custom-op domain, and the runtime's work between
// stages (Euler step with CFG, residual add/subtract, seeded noise), which the runtime calls through
// its device interface (runtime/src/device_ops.hpp).
// Every kernel takes contiguous row-major buffers; shapes are given explicitly. The CUDA versions
// (slim_kernels_cuda.h) take the same arguments plus a stream, under slim::kernels::cuda.
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
// order (ties broken by the lower index). idx has shape [batch, keep]. `order`: scratch of `tokens`
// values (the overload without it allocates its own).
void select_tokens(const float* score, int64_t batch, int64_t tokens, int64_t keep, int64_t* idx, int64_t* order);
void select_tokens(const float* score, int64_t batch, int64_t tokens, int64_t keep, int64_t* idx);

// out[b, j, :] = x[b, idx[b, j], :]. Returns false if an index is outside [0, tokens).
bool gather_tokens(const float* x, const int64_t* idx, int64_t batch, int64_t tokens, int64_t count, int64_t channels, float* out);

// cache[b, idx[b, j], :] = values[b, j, :] in place. Returns false if an index is outside [0, tokens).
bool scatter_tokens(float* cache, const int64_t* idx, const float* values, int64_t batch, int64_t tokens, int64_t count, int64_t channels);

// Number of tokens recomputed for a sample ratio rho in (0, 1]: round(rho * tokens), at least 1.
int64_t tokens_for_ratio(double ratio, int64_t tokens);

// ---- the runtime's work between stages (kernels/cpu/elementwise.cpp) ----

// One flow-matching Euler step with classifier-free guidance: v = v_neg + g (v_pos - v_neg) (v = v_pos
// when v_neg is null), x += dt * v, over `count` values; with x_copy non-null the new x is also written
// there (the second half of a CFG model batch). Returns false if any new value is NaN or Inf.
bool euler_cfg(float* x, float* x_copy, const float* v_neg, const float* v_pos, float guidance, float dt, int64_t count);

// dst[i] = value (a step's timestep for every batch row).
void fill(float* dst, float value, int64_t count);

// dst = a + b (a cached residual or compensated delta added to the hidden states); dst may be a or b.
void add(float* dst, const float* a, const float* b, int64_t count);

// dst = a - b; dst may be a or b (a residual or delta recorded in place).
void subtract(float* dst, const float* a, const float* b, int64_t count);

// Seeded standard normal noise: Philox4x32-10 + Box-Muller (slim_philox.h), bit-compatible with
// slimengine/noise.py; element k comes from lane k % 4 of Philox block k / 4.
void gaussian_noise(float* out, int64_t count, uint64_t seed);

// ---- the prompt path's decoding (docs/pipeline.md, Decoding) ----

// The VAE's input from sampled latents: dst = src / scaling + shift in float32 (diffusers' latents /
// scaling_factor + shift_factor); dst may be src.
void unscale_latents(float* dst, const float* src, float scaling, float shift, int64_t count);

// The VAE's output, float32 [batch, 3, height, width], as uint8 [batch, height, width, 3]:
// round-half-even(clamp(x * 0.5 + 0.5, 0, 1) * 255) in float32, as diffusers' VaeImageProcessor.postprocess
// then numpy_to_pil (numpy's round). Returns false when a value is NaN (written as 0: no uint8 means NaN).
bool image_to_rgb8(const float* image, int64_t batch, int64_t height, int64_t width, uint8_t* out);

}  // namespace slim::kernels::cpu
