#include <cmath>
#include <cstdint>

#include "slim_kernels_cuda.h"

namespace slim::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowThreads = 128;            // gather/scatter: one block per token row
constexpr int64_t kMaxSharedTokens = 8192;  // select_tokens ranks from shared memory up to this many tokens

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Sum over a block of kThreads threads; the result is valid in thread 0.
__device__ double block_sum(double v) {
    __shared__ double partial[kThreads / 32];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffff, v, offset);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    v = threadIdx.x < kThreads / 32 ? partial[threadIdx.x] : 0.0;
    if (threadIdx.x < 32)
        for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffff, v, offset);
    __syncthreads();  // partial may be reused by the next call
    return v;
}

// Pass 1: grid (kL1BlocksPerSample, batch); each block sums a strided share of one sample.
__global__ void l1_partial_kernel(const float* a, const float* b, int64_t per_batch, double* partial) {
    const float* pa = a + blockIdx.y * per_batch;
    const float* pb = b + blockIdx.y * per_batch;
    double diff = 0, mag = 0;
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < per_batch;
         k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        diff += fabsf(pa[k] - pb[k]);
        mag += fabsf(pb[k]);
    }
    diff = block_sum(diff);
    mag = block_sum(mag);
    if (threadIdx.x == 0) {
        double* out = partial + (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * 2;
        out[0] = diff;
        out[1] = mag;
    }
}

// Pass 2: one block per sample adds the partial sums.
__global__ void l1_finish_kernel(const double* partial, int64_t per_batch, float* change, float* scale) {
    const double* p = partial + static_cast<int64_t>(blockIdx.x) * kL1BlocksPerSample * 2;
    double diff = threadIdx.x < kL1BlocksPerSample ? p[threadIdx.x * 2] : 0.0;
    double mag = threadIdx.x < kL1BlocksPerSample ? p[threadIdx.x * 2 + 1] : 0.0;
    diff = block_sum(diff);
    mag = block_sum(mag);
    if (threadIdx.x == 0) {
        change[blockIdx.x] = static_cast<float>(diff / per_batch);
        scale[blockIdx.x] = static_cast<float>(mag / per_batch);
    }
}

// One warp per token row; Vec is float4 when rows are 16-byte aligned multiples of 4 floats.
template <typename Vec>
__global__ void token_change_score_kernel(const float* r_last, const float* r_prev, int64_t rows, int64_t channels, float* score) {
    constexpr int kWidth = sizeof(Vec) / sizeof(float);
    int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;  // whole warps leave together
    const Vec* x = reinterpret_cast<const Vec*>(r_last + row * channels);
    const Vec* y = reinterpret_cast<const Vec*>(r_prev + row * channels);
    double sum = 0;
    for (int64_t c = lane; c < channels / kWidth; c += 32) {
        Vec u = x[c], v = y[c];
        const float* pu = reinterpret_cast<const float*>(&u);
        const float* pv = reinterpret_cast<const float*>(&v);
        for (int k = 0; k < kWidth; ++k) sum += fabsf(pu[k] - pv[k]);
    }
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffff, sum, offset);
    if (lane == 0) score[row] = static_cast<float>(sum / channels);
}

// flags[b, i] = 1 when token i is among the `keep` highest scores of row b (ties: the lower index
// wins), exactly the CPU's order. Grid (ceil(tokens / kThreads), batch); the row is staged in shared
// memory when it fits (dynamic shared size tokens * 4 bytes), else read from global memory.
__global__ void rank_kernel(const float* score, int64_t tokens, int64_t keep, bool use_shared, int32_t* flags) {
    extern __shared__ float row_scores[];
    const float* s = score + blockIdx.y * tokens;
    if (use_shared) {
        for (int64_t j = threadIdx.x; j < tokens; j += blockDim.x) row_scores[j] = s[j];
        __syncthreads();
        s = row_scores;
    }
    int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= tokens) return;
    const float si = s[i];
    int64_t rank = 0;
    for (int64_t j = 0; j < tokens; ++j) {
        const float sj = s[j];
        rank += (sj > si) || (sj == si && j < i);
    }
    flags[blockIdx.y * tokens + i] = rank < keep;
}

// One block of kThreads per batch element writes the flagged indices in ascending order: a
// block-wide prefix count over chunks of kThreads tokens.
__global__ void compact_kernel(const int32_t* flags, int64_t tokens, int64_t keep, int64_t* idx) {
    __shared__ int warp_counts[kThreads / 32];
    const int32_t* f = flags + blockIdx.x * tokens;
    int64_t* out = idx + blockIdx.x * keep;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int64_t base = 0;
    for (int64_t start = 0; start < tokens; start += kThreads) {
        const int64_t i = start + threadIdx.x;
        const bool flag = i < tokens && f[i] != 0;
        const unsigned ballot = __ballot_sync(0xffffffff, flag);
        if (lane == 0) warp_counts[warp] = __popc(ballot);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < kThreads / 32; ++w) {
            before += w < warp ? warp_counts[w] : 0;
            total += warp_counts[w];
        }
        const int64_t position = base + before + __popc(ballot & ((1u << lane) - 1));
        if (flag && position < keep) out[position] = i;
        base += total;
        __syncthreads();  // warp_counts is rewritten by the next chunk
    }
}

// One block per moved row (batch * count of them); Vec as in token_change_score_kernel.
template <typename Vec, bool kToCache>
__global__ void move_rows_kernel(const float* src, const int64_t* idx, float* dst, int64_t tokens, int64_t count, int64_t channels) {
    constexpr int kWidth = sizeof(Vec) / sizeof(float);
    const int64_t row = blockIdx.x, b = row / count, t = idx[row];
    const bool valid = t >= 0 && t < tokens;
    const int64_t token_row = b * tokens + t;
    const int64_t n = channels / kWidth;
    if (kToCache) {
        if (!valid) return;
        const Vec* s = reinterpret_cast<const Vec*>(src + row * channels);
        Vec* d = reinterpret_cast<Vec*>(dst + token_row * channels);
        for (int64_t c = threadIdx.x; c < n; c += blockDim.x) d[c] = s[c];
    } else if (valid) {
        const Vec* s = reinterpret_cast<const Vec*>(src + token_row * channels);
        Vec* d = reinterpret_cast<Vec*>(dst + row * channels);
        for (int64_t c = threadIdx.x; c < n; c += blockDim.x) d[c] = s[c];
    } else {
        float* d = dst + row * channels;
        for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) d[c] = NAN;
    }
}

template <bool kToCache>
cudaError_t move_rows(const float* src, const int64_t* idx, float* dst, int64_t batch, int64_t tokens, int64_t count, int64_t channels,
                      cudaStream_t stream) {
    const int64_t rows = batch * count;
    if (rows == 0 || channels == 0) return cudaSuccess;
    if (channels % 4 == 0 && aligned16(src) && aligned16(dst))
        move_rows_kernel<float4, kToCache><<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(src, idx, dst, tokens, count, channels);
    else
        move_rows_kernel<float, kToCache><<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(src, idx, dst, tokens, count, channels);
    return cudaGetLastError();
}

}  // namespace

cudaError_t l1_change(const float* a, const float* b, int64_t batch, int64_t per_batch, float* change, float* scale, double* partial,
                      cudaStream_t stream) {
    if (batch == 0) return cudaSuccess;
    l1_partial_kernel<<<dim3(kL1BlocksPerSample, static_cast<unsigned>(batch)), kThreads, 0, stream>>>(a, b, per_batch, partial);
    l1_finish_kernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(partial, per_batch, change, scale);
    return cudaGetLastError();
}

cudaError_t token_change_score(const float* r_last, const float* r_prev, int64_t batch, int64_t tokens, int64_t channels, float* score,
                               cudaStream_t stream) {
    const int64_t rows = batch * tokens;
    if (rows == 0) return cudaSuccess;
    if (channels % 4 == 0 && aligned16(r_last) && aligned16(r_prev))
        token_change_score_kernel<float4><<<blocks_for(rows * 32), kThreads, 0, stream>>>(r_last, r_prev, rows, channels, score);
    else
        token_change_score_kernel<float><<<blocks_for(rows * 32), kThreads, 0, stream>>>(r_last, r_prev, rows, channels, score);
    return cudaGetLastError();
}

cudaError_t select_tokens(const float* score, int64_t batch, int64_t tokens, int64_t keep, int32_t* flags, int64_t* idx,
                          cudaStream_t stream) {
    if (batch == 0 || tokens == 0) return cudaSuccess;
    const bool use_shared = tokens <= kMaxSharedTokens;
    const size_t shared = use_shared ? static_cast<size_t>(tokens) * sizeof(float) : 0;
    rank_kernel<<<dim3(blocks_for(tokens), static_cast<unsigned>(batch)), kThreads, shared, stream>>>(score, tokens, keep, use_shared,
                                                                                                      flags);
    compact_kernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(flags, tokens, keep, idx);
    return cudaGetLastError();
}

cudaError_t gather_tokens(const float* x, const int64_t* idx, int64_t batch, int64_t tokens, int64_t count, int64_t channels, float* out,
                          cudaStream_t stream) {
    return move_rows<false>(x, idx, out, batch, tokens, count, channels, stream);
}

cudaError_t scatter_tokens(float* cache, const int64_t* idx, const float* values, int64_t batch, int64_t tokens, int64_t count,
                           int64_t channels, cudaStream_t stream) {
    return move_rows<true>(values, idx, cache, batch, tokens, count, channels, stream);
}

}  // namespace slim::kernels::cuda
