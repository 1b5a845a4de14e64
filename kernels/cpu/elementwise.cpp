// The runtime's element-wise work between stages. Plain loops the compiler vectorizes; each element
// is computed with the same operations in the same order as the runtime always did, so results are
// bit-identical to the earlier in-line loops. This file is compiled without FMA contraction
// (CMakeLists.txt), so the SSE2 and AVX2 versions below give the same bits, as do the CUDA kernels.
#include <algorithm>
#include <cmath>

#include "slim_kernels.h"
#include "slim_philox.h"

namespace slim::kernels::cpu {
namespace {

// Each loop body once, instantiated for the baseline target and for AVX2 (8 floats an instruction:
// the Euler step on L2-resident latents is compute-bound at SSE's 4), chosen at run time by the CPU.
#define SLIM_INLINE inline __attribute__((always_inline))

SLIM_INLINE bool euler_body(float* x, float* x_copy, const float* v_neg, const float* v_pos, float guidance, float dt, int64_t count) {
    // Finiteness as an int flag: |x| <= FLT_MAX is false for NaN and Inf, and the loop stays vectorizable.
    int bad = 0;
    if (v_neg) {
        for (int64_t i = 0; i < count; ++i) {
            const float v = v_neg[i] + guidance * (v_pos[i] - v_neg[i]);
            const float xi = x[i] + dt * v;
            x[i] = xi;
            bad |= !(std::fabs(xi) <= 3.402823466e+38f);
        }
    } else {
        for (int64_t i = 0; i < count; ++i) {
            const float xi = x[i] + dt * v_pos[i];
            x[i] = xi;
            bad |= !(std::fabs(xi) <= 3.402823466e+38f);
        }
    }
    if (x_copy)
        for (int64_t i = 0; i < count; ++i) x_copy[i] = x[i];
    return bad == 0;
}

SLIM_INLINE void add_body(float* dst, const float* a, const float* b, int64_t count) {
    for (int64_t i = 0; i < count; ++i) dst[i] = a[i] + b[i];
}

SLIM_INLINE void subtract_body(float* dst, const float* a, const float* b, int64_t count) {
    for (int64_t i = 0; i < count; ++i) dst[i] = a[i] - b[i];
}

#if defined(__x86_64__) && defined(__GNUC__)
#define SLIM_AVX2 __attribute__((target("avx2")))
SLIM_AVX2 bool euler_avx2(float* x, float* x_copy, const float* v_neg, const float* v_pos, float guidance, float dt, int64_t count) {
    return euler_body(x, x_copy, v_neg, v_pos, guidance, dt, count);
}
SLIM_AVX2 void add_avx2(float* dst, const float* a, const float* b, int64_t count) { add_body(dst, a, b, count); }
SLIM_AVX2 void subtract_avx2(float* dst, const float* a, const float* b, int64_t count) { subtract_body(dst, a, b, count); }
const bool kAvx2 = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
#else
bool euler_avx2(float*, float*, const float*, const float*, float, float, int64_t) { return false; }
void add_avx2(float*, const float*, const float*, int64_t) {}
void subtract_avx2(float*, const float*, const float*, int64_t) {}
const bool kAvx2 = false;
#endif

}  // namespace

bool euler_cfg(float* x, float* x_copy, const float* v_neg, const float* v_pos, float guidance, float dt, int64_t count) {
    return kAvx2 ? euler_avx2(x, x_copy, v_neg, v_pos, guidance, dt, count) : euler_body(x, x_copy, v_neg, v_pos, guidance, dt, count);
}

void fill(float* dst, float value, int64_t count) {
    for (int64_t i = 0; i < count; ++i) dst[i] = value;
}

void add(float* dst, const float* a, const float* b, int64_t count) { kAvx2 ? add_avx2(dst, a, b, count) : add_body(dst, a, b, count); }

void subtract(float* dst, const float* a, const float* b, int64_t count) {
    kAvx2 ? subtract_avx2(dst, a, b, count) : subtract_body(dst, a, b, count);
}

void gaussian_noise(float* out, int64_t count, uint64_t seed) {
    double z[4];
    for (int64_t block = 0; block * 4 < count; ++block) {
        philox_normal4(static_cast<uint64_t>(block), seed, z);
        for (int64_t lane = 0; lane < 4 && block * 4 + lane < count; ++lane) out[block * 4 + lane] = static_cast<float>(z[lane]);
    }
}

void unscale_latents(float* dst, const float* src, float scaling, float shift, int64_t count) {
    for (int64_t i = 0; i < count; ++i) dst[i] = src[i] / scaling + shift;
}

bool image_to_rgb8(const float* image, int64_t batch, int64_t height, int64_t width, uint8_t* out) {
    const int64_t plane = height * width;
    bool finite = true;
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t c = 0; c < 3; ++c) {
            const float* src = image + (b * 3 + c) * plane;
            uint8_t* dst = out + b * plane * 3 + c;
            for (int64_t i = 0; i < plane; ++i) {
                if (std::isnan(src[i])) {
                    dst[i * 3] = 0;
                    finite = false;
                    continue;
                }
                // float32 throughout; std::nearbyint rounds half to even in the default mode, as numpy's round.
                const float x = std::min(std::max(src[i] * 0.5f + 0.5f, 0.0f), 1.0f);
                dst[i * 3] = static_cast<uint8_t>(std::nearbyint(x * 255.0f));
            }
        }
    return finite;
}

}  // namespace slim::kernels::cpu
