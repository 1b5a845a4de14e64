// CUDA versions of the slimengine kernels: the same arguments as slim_kernels.h (device pointers)
// plus the stream they run on, and device scratch where a kernel needs it. Each returns the launch's
// cudaError_t. Preconditions the CPU entry points check are the caller's duty here, except token
// indices: gather_tokens writes NaN rows and scatter_tokens skips rows for an index outside
// [0, tokens) (no out-of-bounds access; the CPU versions return false instead).
// Built wherever nvcc exists (CMake option SLIM_CUDA); checked against the CPU versions on a GPU by
// kernels/tests/cuda_kernel_check.cu. The runtime calls them through its CUDA device interface
// (runtime/src/device_ops_cuda.cpp), compiled but not yet run on a GPU (see docs/gpu.md).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace slim::kernels::cuda {

// Blocks per batch element of l1_change's first pass; its scratch holds two doubles per block.
constexpr int64_t kL1BlocksPerSample = 64;
inline int64_t l1_change_scratch_count(int64_t batch) { return batch * kL1BlocksPerSample * 2; }

// `partial`: device scratch of l1_change_scratch_count(batch) doubles.
cudaError_t l1_change(const float* a, const float* b, int64_t batch, int64_t per_batch, float* change, float* scale, double* partial,
                      cudaStream_t stream);
cudaError_t token_change_score(const float* r_last, const float* r_prev, int64_t batch, int64_t tokens, int64_t channels, float* score,
                               cudaStream_t stream);
// `flags` is device scratch of batch * tokens ints; requires 1 <= keep <= tokens.
cudaError_t select_tokens(const float* score, int64_t batch, int64_t tokens, int64_t keep, int32_t* flags, int64_t* idx,
                          cudaStream_t stream);
cudaError_t gather_tokens(const float* x, const int64_t* idx, int64_t batch, int64_t tokens, int64_t count, int64_t channels, float* out,
                          cudaStream_t stream);
// Indices within a batch element must be distinct (as select_tokens gives them): duplicates race.
cudaError_t scatter_tokens(float* cache, const int64_t* idx, const float* values, int64_t batch, int64_t tokens, int64_t count,
                           int64_t channels, cudaStream_t stream);

// The runtime's work between stages (kernels/cuda/elementwise.cu; the CPU's in kernels/cpu/elementwise.cpp),
// bit for bit the CPU kernels' results (no FMA contraction).
// euler_cfg: as the CPU's; `nonfinite` is a device int32 set to 1 when a new value is NaN or Inf, else 0.
cudaError_t euler_cfg(float* x, float* x_copy, const float* v_neg, const float* v_pos, float guidance, float dt, int64_t count,
                      int32_t* nonfinite, cudaStream_t stream);
cudaError_t fill(float* dst, float value, int64_t count, cudaStream_t stream);
// add: dst = a + b; subtract: dst = a - b; dst may be a or b.
cudaError_t add(float* dst, const float* a, const float* b, int64_t count, cudaStream_t stream);
cudaError_t subtract(float* dst, const float* a, const float* b, int64_t count, cudaStream_t stream);
// The runtime's seeded noise (Philox4x32-10 + Box-Muller), element for element the CPU's.
cudaError_t gaussian_noise(float* out, int64_t count, uint64_t seed, cudaStream_t stream);
// The prompt path's decoding, as the CPU's; image_to_rgb8 sets the device int32 `nan` to 1 when a value is NaN, else 0.
cudaError_t unscale_latents(float* dst, const float* src, float scaling, float shift, int64_t count, cudaStream_t stream);
cudaError_t image_to_rgb8(const float* image, int64_t batch, int64_t height, int64_t width, uint8_t* out, int32_t* nan,
                          cudaStream_t stream);

}  // namespace slim::kernels::cuda
