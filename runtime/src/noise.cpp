#include "noise.hpp"

#include "slim_philox.h"

namespace slim {

void gaussian_noise(float* out, size_t count, uint64_t seed) {
    double z[4];
    for (size_t block = 0; block * 4 < count; ++block) {
        kernels::philox_normal4(block, seed, z);
        for (size_t lane = 0; lane < 4 && block * 4 + lane < count; ++lane) out[block * 4 + lane] = static_cast<float>(z[lane]);
    }
}

}  // namespace slim
