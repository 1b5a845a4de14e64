// The runtime's element-wise work between stages. Plain loops the compiler vectorizes; each element
// is computed with the same operations in the same order as the runtime always did, so results are
// bit-identical to the earlier in-line loops (no FMA contraction: the build targets baseline x86-64).
#include <cmath>

#include "slim_kernels.h"
#include "slim_philox.h"

namespace slim::kernels::cpu {

bool euler_cfg(float* x, float* x_copy, const float* v_neg, const float* v_pos, float guidance, float dt, int64_t count) {
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

void fill(float* dst, float value, int64_t count) {
    for (int64_t i = 0; i < count; ++i) dst[i] = value;
}

void add(float* dst, const float* a, const float* b, int64_t count) {
    for (int64_t i = 0; i < count; ++i) dst[i] = a[i] + b[i];
}

void subtract(float* dst, const float* a, const float* b, int64_t count) {
    for (int64_t i = 0; i < count; ++i) dst[i] = a[i] - b[i];
}

void gaussian_noise(float* out, int64_t count, uint64_t seed) {
    double z[4];
    for (int64_t block = 0; block * 4 < count; ++block) {
        philox_normal4(static_cast<uint64_t>(block), seed, z);
        for (int64_t lane = 0; lane < 4 && block * 4 + lane < count; ++lane) out[block * 4 + lane] = static_cast<float>(z[lane]);
    }
}

}  // namespace slim::kernels::cpu
