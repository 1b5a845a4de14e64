// The generic stage call of the C ABI (slim_stage_run): caller tensors (slim_named_tensor) checked against a stage's
// graph and bound to it by name.
#pragma once

#include <cstdint>

#include "ort_runtime.hpp"
#include "slimengine.h"
#include "stage.hpp"

namespace slim {

// The generic stage call (slim_stage_run): caller tensors bound to `stage`'s graph inputs and outputs by
// name, and one Run. Every input bound exactly once with the graph's dtype (float32, int64 or int32),
// rank and fixed dimensions (float32 inputs finite); the outputs any subset of the graph's, each caller
// tensor of exactly the computed shape. Nothing is written to an output unless every check passes.
// Throws Error: INVALID_ARGUMENT (an unknown or missing name), SHAPE, DTYPE, NUMERICS, BACKEND.
void run_named(const OrtRuntime& ort, const Stage& stage, const slim_named_tensor* inputs, int32_t input_count,
               const slim_named_tensor* outputs, int32_t output_count);

}  // namespace slim
