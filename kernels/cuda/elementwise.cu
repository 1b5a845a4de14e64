// CUDA versions of kernels/cpu/elementwise.cpp: the runtime's work between stages. The arithmetic
// uses explicitly rounded intrinsics (__fadd_rn, __fmul_rn, ...), which the compiler never fuses into
// FMAs, so each value is the CPU kernel's bit for bit.
#include <cmath>
#include <cstdint>

#include "slim_kernels_cuda.h"
#include "slim_philox.h"

namespace slim::kernels::cuda {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

__global__ void euler_cfg_kernel(float* x, float* x_copy, const float* v_neg, const float* v_pos, float guidance, float dt, int64_t n,
                                 int32_t* nonfinite) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = v_neg ? __fadd_rn(v_neg[i], __fmul_rn(guidance, __fsub_rn(v_pos[i], v_neg[i]))) : v_pos[i];
    const float xi = __fadd_rn(x[i], __fmul_rn(dt, v));
    x[i] = xi;
    if (x_copy) x_copy[i] = xi;
    if (!isfinite(xi)) *nonfinite = 1;  // a benign race: every writer stores 1
}

__global__ void fill_kernel(float* dst, float value, int64_t n) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = value;
}

__global__ void add_kernel(float* dst, const float* a, const float* b, int64_t n) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __fadd_rn(a[i], b[i]);
}

__global__ void subtract_kernel(float* dst, const float* a, const float* b, int64_t n) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __fsub_rn(a[i], b[i]);
}

// One Philox block (4 values) per thread, as kernels/cpu/elementwise.cpp.
__global__ void noise_kernel(float* out, int64_t count, uint64_t seed) {
    const uint64_t block = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (static_cast<int64_t>(block * 4) >= count) return;
    double z[4];
    philox_normal4(block, seed, z);
    for (int lane = 0; lane < 4; ++lane)
        if (static_cast<int64_t>(block * 4) + lane < count) out[block * 4 + lane] = static_cast<float>(z[lane]);
}

__global__ void unscale_kernel(float* dst, const float* src, float scaling, float shift, int64_t n) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __fadd_rn(__fdiv_rn(src[i], scaling), shift);
}

// One output pixel channel per thread: element i of the [B, 3, H, W] image goes to [b, y, x, c].
__global__ void rgb8_kernel(const float* image, int64_t plane, int64_t n, uint8_t* out, int32_t* nan) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int64_t b = i / (3 * plane), c = (i / plane) % 3, p = i % plane;
    const float v = image[i];
    uint8_t value = 0;
    if (isnan(v)) {
        *nan = 1;  // a benign race: every writer stores 1
    } else {
        const float x = fminf(fmaxf(__fadd_rn(__fmul_rn(v, 0.5f), 0.5f), 0.0f), 1.0f);
        value = static_cast<uint8_t>(rintf(__fmul_rn(x, 255.0f)));  // rintf: half to even, as the CPU's nearbyint
    }
    out[(b * plane + p) * 3 + c] = value;
}

}  // namespace

cudaError_t euler_cfg(float* x, float* x_copy, const float* v_neg, const float* v_pos, float guidance, float dt, int64_t count,
                      int32_t* nonfinite, cudaStream_t stream) {
    cudaError_t status = cudaMemsetAsync(nonfinite, 0, sizeof(int32_t), stream);
    if (status != cudaSuccess || count == 0) return status;
    euler_cfg_kernel<<<blocks_for(count), kThreads, 0, stream>>>(x, x_copy, v_neg, v_pos, guidance, dt, count, nonfinite);
    return cudaGetLastError();
}

cudaError_t fill(float* dst, float value, int64_t count, cudaStream_t stream) {
    if (count == 0) return cudaSuccess;
    fill_kernel<<<blocks_for(count), kThreads, 0, stream>>>(dst, value, count);
    return cudaGetLastError();
}

cudaError_t add(float* dst, const float* a, const float* b, int64_t count, cudaStream_t stream) {
    if (count == 0) return cudaSuccess;
    add_kernel<<<blocks_for(count), kThreads, 0, stream>>>(dst, a, b, count);
    return cudaGetLastError();
}

cudaError_t subtract(float* dst, const float* a, const float* b, int64_t count, cudaStream_t stream) {
    if (count == 0) return cudaSuccess;
    subtract_kernel<<<blocks_for(count), kThreads, 0, stream>>>(dst, a, b, count);
    return cudaGetLastError();
}

cudaError_t gaussian_noise(float* out, int64_t count, uint64_t seed, cudaStream_t stream) {
    if (count == 0) return cudaSuccess;
    noise_kernel<<<blocks_for((count + 3) / 4), kThreads, 0, stream>>>(out, count, seed);
    return cudaGetLastError();
}

cudaError_t unscale_latents(float* dst, const float* src, float scaling, float shift, int64_t count, cudaStream_t stream) {
    if (count == 0) return cudaSuccess;
    unscale_kernel<<<blocks_for(count), kThreads, 0, stream>>>(dst, src, scaling, shift, count);
    return cudaGetLastError();
}

cudaError_t image_to_rgb8(const float* image, int64_t batch, int64_t height, int64_t width, uint8_t* out, int32_t* nan,
                          cudaStream_t stream) {
    cudaError_t status = cudaMemsetAsync(nan, 0, sizeof(int32_t), stream);
    const int64_t n = batch * 3 * height * width;
    if (status != cudaSuccess || n == 0) return status;
    rgb8_kernel<<<blocks_for(n), kThreads, 0, stream>>>(image, height * width, n, out, nan);
    return cudaGetLastError();
}

}  // namespace slim::kernels::cuda
