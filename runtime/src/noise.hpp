// Seeded Gaussian noise, bit-compatible with slimengine/noise.py (Philox4x32-10 + Box-Muller).
#pragma once

#include <cstddef>
#include <cstdint>

namespace slim {

void gaussian_noise(float* out, size_t count, uint64_t seed);

}  // namespace slim
