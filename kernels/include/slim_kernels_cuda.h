// CUDA versions of the slimengine kernels: the same arguments as slim_kernels.h (device pointers)
// plus the stream they run on. Each returns the launch's cudaError_t; preconditions checked by the
// CPU entry points (indices in range, keep <= tokens) are the caller's duty here.
// Built wherever nvcc exists (CMake option SLIM_CUDA); not yet called by the runtime.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace slim::kernels::cuda {

cudaError_t l1_change(const float* a, const float* b, int64_t batch, int64_t per_batch, float* change, float* scale, cudaStream_t stream);
cudaError_t token_change_score(const float* r_last, const float* r_prev, int64_t batch, int64_t tokens, int64_t channels, float* score,
                               cudaStream_t stream);
// `flags` is device scratch of batch * tokens ints.
cudaError_t select_tokens(const float* score, int64_t batch, int64_t tokens, int64_t keep, int32_t* flags, int64_t* idx,
                          cudaStream_t stream);
cudaError_t gather_tokens(const float* x, const int64_t* idx, int64_t batch, int64_t tokens, int64_t count, int64_t channels, float* out,
                          cudaStream_t stream);
cudaError_t scatter_tokens(float* cache, const int64_t* idx, const float* values, int64_t batch, int64_t tokens, int64_t count,
                           int64_t channels, cudaStream_t stream);

// The runtime's work between stages.
// x[i] += dt * (v_neg[i] + g * (v_pos[i] - v_neg[i])), or dt * v_pos[i] when v_neg is null.
cudaError_t euler_step(float* x, const float* v_neg, const float* v_pos, float guidance, float dt, int64_t count, cudaStream_t stream);
cudaError_t add_into(float* dst, const float* src, int64_t count, cudaStream_t stream);
cudaError_t subtract(float* dst, const float* a, const float* b, int64_t count, cudaStream_t stream);
// The runtime's seeded noise (Philox4x32-10 + Box-Muller), element for element the CPU's.
cudaError_t gaussian_noise(float* out, int64_t count, uint64_t seed, cudaStream_t stream);

}  // namespace slim::kernels::cuda
