#include <cstdint>

#include "slim_kernels_cuda.h"
#include "slim_philox.h"

namespace slim::kernels::cuda {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

__device__ double block_sum(double v) {
    __shared__ double partial[kThreads / 32];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffff, v, offset);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    v = threadIdx.x < kThreads / 32 ? partial[threadIdx.x] : 0.0;
    if (threadIdx.x < 32)
        for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffff, v, offset);
    return v;
}

// One block per batch element.
__global__ void l1_change_kernel(const float* a, const float* b, int64_t per_batch, float* change, float* scale) {
    const float* pa = a + blockIdx.x * per_batch;
    const float* pb = b + blockIdx.x * per_batch;
    double diff = 0, mag = 0;
    for (int64_t k = threadIdx.x; k < per_batch; k += blockDim.x) {
        diff += fabsf(pa[k] - pb[k]);
        mag += fabsf(pb[k]);
    }
    diff = block_sum(diff);
    __syncthreads();
    mag = block_sum(mag);
    if (threadIdx.x == 0) {
        change[blockIdx.x] = static_cast<float>(diff / per_batch);
        scale[blockIdx.x] = static_cast<float>(mag / per_batch);
    }
}

// One warp per token row.
__global__ void token_change_score_kernel(const float* r_last, const float* r_prev, int64_t rows, int64_t channels, float* score) {
    int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    double sum = 0;
    for (int64_t c = lane; c < channels; c += 32) sum += fabsf(r_last[row * channels + c] - r_prev[row * channels + c]);
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffff, sum, offset);
    if (lane == 0) score[row] = static_cast<float>(sum / channels);
}

// flags[b, i] = 1 when token i is among the `keep` highest scores (ties: the lower index wins).
__global__ void rank_kernel(const float* score, int64_t batch, int64_t tokens, int64_t keep, int32_t* flags) {
    int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (t >= batch * tokens) return;
    const float* s = score + (t / tokens) * tokens;
    int64_t i = t % tokens, rank = 0;
    for (int64_t j = 0; j < tokens; ++j) rank += (s[j] > s[i]) || (s[j] == s[i] && j < i);
    flags[t] = rank < keep;
}

// One thread per batch element writes the selected indices in ascending order.
__global__ void compact_kernel(const int32_t* flags, int64_t batch, int64_t tokens, int64_t keep, int64_t* idx) {
    int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (b >= batch) return;
    int64_t out = 0;
    for (int64_t i = 0; i < tokens && out < keep; ++i)
        if (flags[b * tokens + i]) idx[b * keep + out++] = i;
}

// One thread per element of the moved rows; `to_cache` picks the direction.
__global__ void move_rows_kernel(const float* src, const int64_t* idx, float* dst, int64_t batch, int64_t tokens, int64_t count,
                                 int64_t channels, bool to_cache) {
    int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (e >= batch * count * channels) return;
    int64_t c = e % channels, row = e / channels, b = row / count;
    int64_t token_row = b * tokens + idx[row];
    if (to_cache)
        dst[token_row * channels + c] = src[e];
    else
        dst[e] = src[token_row * channels + c];
}

__global__ void euler_kernel(float* x, const float* v_neg, const float* v_pos, float guidance, float dt, int64_t n) {
    int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = v_neg ? v_neg[i] + guidance * (v_pos[i] - v_neg[i]) : v_pos[i];
    x[i] += dt * v;
}

__global__ void add_kernel(float* dst, const float* src, int64_t n) {
    int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) dst[i] += src[i];
}

__global__ void subtract_kernel(float* dst, const float* a, const float* b, int64_t n) {
    int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = a[i] - b[i];
}

// One Philox block (4 values) per thread, as runtime/src/noise.cpp.
__global__ void noise_kernel(float* out, int64_t count, uint64_t seed) {
    uint64_t block = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (static_cast<int64_t>(block * 4) >= count) return;
    double z[4];
    philox_normal4(block, seed, z);
    for (int lane = 0; lane < 4; ++lane)
        if (static_cast<int64_t>(block * 4) + lane < count) out[block * 4 + lane] = static_cast<float>(z[lane]);
}

}  // namespace

cudaError_t l1_change(const float* a, const float* b, int64_t batch, int64_t per_batch, float* change, float* scale, cudaStream_t stream) {
    l1_change_kernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(a, b, per_batch, change, scale);
    return cudaGetLastError();
}

cudaError_t token_change_score(const float* r_last, const float* r_prev, int64_t batch, int64_t tokens, int64_t channels, float* score,
                               cudaStream_t stream) {
    token_change_score_kernel<<<blocks_for(batch * tokens * 32), kThreads, 0, stream>>>(r_last, r_prev, batch * tokens, channels, score);
    return cudaGetLastError();
}

cudaError_t select_tokens(const float* score, int64_t batch, int64_t tokens, int64_t keep, int32_t* flags, int64_t* idx,
                          cudaStream_t stream) {
    rank_kernel<<<blocks_for(batch * tokens), kThreads, 0, stream>>>(score, batch, tokens, keep, flags);
    compact_kernel<<<blocks_for(batch), kThreads, 0, stream>>>(flags, batch, tokens, keep, idx);
    return cudaGetLastError();
}

cudaError_t gather_tokens(const float* x, const int64_t* idx, int64_t batch, int64_t tokens, int64_t count, int64_t channels, float* out,
                          cudaStream_t stream) {
    move_rows_kernel<<<blocks_for(batch * count * channels), kThreads, 0, stream>>>(x, idx, out, batch, tokens, count, channels, false);
    return cudaGetLastError();
}

cudaError_t scatter_tokens(float* cache, const int64_t* idx, const float* values, int64_t batch, int64_t tokens, int64_t count,
                           int64_t channels, cudaStream_t stream) {
    move_rows_kernel<<<blocks_for(batch * count * channels), kThreads, 0, stream>>>(values, idx, cache, batch, tokens, count, channels,
                                                                                    true);
    return cudaGetLastError();
}

cudaError_t euler_step(float* x, const float* v_neg, const float* v_pos, float guidance, float dt, int64_t count, cudaStream_t stream) {
    euler_kernel<<<blocks_for(count), kThreads, 0, stream>>>(x, v_neg, v_pos, guidance, dt, count);
    return cudaGetLastError();
}

cudaError_t add_into(float* dst, const float* src, int64_t count, cudaStream_t stream) {
    add_kernel<<<blocks_for(count), kThreads, 0, stream>>>(dst, src, count);
    return cudaGetLastError();
}

cudaError_t subtract(float* dst, const float* a, const float* b, int64_t count, cudaStream_t stream) {
    subtract_kernel<<<blocks_for(count), kThreads, 0, stream>>>(dst, a, b, count);
    return cudaGetLastError();
}

cudaError_t gaussian_noise(float* out, int64_t count, uint64_t seed, cudaStream_t stream) {
    noise_kernel<<<blocks_for((count + 3) / 4), kThreads, 0, stream>>>(out, count, seed);
    return cudaGetLastError();
}

}  // namespace slim::kernels::cuda
