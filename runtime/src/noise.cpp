#include "noise.hpp"

#include <cmath>

namespace slim {
namespace {

struct Words {
    uint32_t w[4];
};

Words philox4x32_10(uint64_t counter, uint64_t seed) {
    uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
        uint64_t p0 = uint64_t(0xD2511F53) * c0, p1 = uint64_t(0xCD9E8D57) * c2;
        uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
        uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return {{c0, c1, c2, c3}};
}

}  // namespace

void gaussian_noise(float* out, size_t count, uint64_t seed) {
    const double two_pi = 2.0 * M_PI;
    for (size_t block = 0; block * 4 < count; ++block) {
        Words r = philox4x32_10(block, seed);
        double z[4];
        for (int pair = 0; pair < 2; ++pair) {
            double u1 = (static_cast<double>(r.w[2 * pair]) + 1.0) / 4294967296.0;
            double u2 = static_cast<double>(r.w[2 * pair + 1]) / 4294967296.0;
            double radius = std::sqrt(-2.0 * std::log(u1));
            z[2 * pair] = radius * std::cos(two_pi * u2);
            z[2 * pair + 1] = radius * std::sin(two_pi * u2);
        }
        for (size_t lane = 0; lane < 4 && block * 4 + lane < count; ++lane) out[block * 4 + lane] = static_cast<float>(z[lane]);
    }
}

}  // namespace slim
