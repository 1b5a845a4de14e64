// The seeded Gaussian noise of slimengine, shared by the CPU runtime and the CUDA kernel, and
// mirrored in Python by slimengine/noise.py: Philox4x32-10 keyed by the seed, element k from lane
// k % 4 of the block at counter k / 4, Box-Muller over lane pairs (0, 1) and (2, 3) in double.
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define SLIM_HOST_DEVICE __host__ __device__
#else
#define SLIM_HOST_DEVICE
#endif

namespace slim::kernels {

// Four standard normal values of Philox block `counter` for `seed`.
SLIM_HOST_DEVICE inline void philox_normal4(uint64_t counter, uint64_t seed, double z[4]) {
    uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
        uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0, p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
        uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
        uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    const uint32_t w[4] = {c0, c1, c2, c3};
    const double two_pi = 6.283185307179586476925286766559;
    for (int pair = 0; pair < 2; ++pair) {
        double u1 = (static_cast<double>(w[2 * pair]) + 1.0) / 4294967296.0;
        double u2 = static_cast<double>(w[2 * pair + 1]) / 4294967296.0;
        double radius = sqrt(-2.0 * log(u1));
        z[2 * pair] = radius * cos(two_pi * u2);
        z[2 * pair + 1] = radius * sin(two_pi * u2);
    }
}

}  // namespace slim::kernels
