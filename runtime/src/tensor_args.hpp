// Checks of caller tensors (slim_tensor) shared by the C boundary, the programs' request checks and
// the generic stage call: dtype, device, layout, shape against what a call expects, values.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "slimengine.h"

namespace slim {

// Largest element count of one caller tensor: no size computed from a checked shape overflows.
constexpr int64_t kMaxElements = int64_t(1) << 40;
// Document ids (banks, LEMUR) are in [0, kMaxId).
constexpr int64_t kMaxId = INT64_MAX;

// "[2,3,4]": a caller tensor's shape for error messages.
std::string shape_text(const slim_tensor& t);

// Checks dtype/device/layout and that the shape matches `expected` (-1: any positive size); returns
// the shape. Throws Error: INVALID_ARGUMENT (NULL), DTYPE (dtype, device, strides), SHAPE.
std::vector<int64_t> check_tensor(const slim_tensor* t, const char* name, const std::vector<int64_t>& expected,
                                  const std::string& expected_text, int32_t dtype = SLIM_DTYPE_FLOAT32);

size_t element_count(const std::vector<int64_t>& shape);

// Error(SLIM_ERR_NUMERICS) naming the first NaN or Inf of a float32 tensor of `shape`.
void check_finite(const slim_tensor* t, const std::vector<int64_t>& shape, const char* name);

// Error(SLIM_ERR_INVALID_ARGUMENT) unless every int64 element is in [low, high): token ids, segment ids, document ids.
void check_range(const slim_tensor* t, const std::vector<int64_t>& shape, const char* name, int64_t low, int64_t high);

}  // namespace slim
