#include "tensor_args.hpp"

#include <algorithm>
#include <cfloat>
#include <cmath>

#include "error.hpp"

namespace slim {
namespace {

const char* dtype_text(int32_t dtype) {
    switch (dtype) {
        case SLIM_DTYPE_FLOAT32:
            return "float32 (SLIM_DTYPE_FLOAT32=0)";
        case SLIM_DTYPE_INT64:
            return "int64 (SLIM_DTYPE_INT64=3)";
        case SLIM_DTYPE_INT32:
            return "int32 (SLIM_DTYPE_INT32=4)";
        default:
            return "a type this call does not take";
    }
}

}  // namespace

std::string shape_text(const slim_tensor& t) {
    std::string s = "[";
    for (int i = 0; i < t.ndim; ++i) s += (i ? "," : "") + std::to_string(t.shape[i]);
    return s + "]";
}

std::vector<int64_t> check_tensor(const slim_tensor* t, const char* name, const std::vector<int64_t>& expected,
                                  const std::string& expected_text, int32_t dtype) {
    if (!t) throw Error(SLIM_ERR_INVALID_ARGUMENT, std::string(name) + " is required");
    if (!t->data) throw Error(SLIM_ERR_INVALID_ARGUMENT, std::string(name) + ".data is NULL");
    if (t->dtype != dtype)
        throw Error(SLIM_ERR_DTYPE, std::string(name) + ": dtype must be " + dtype_text(dtype) + ", got " + std::to_string(t->dtype));
    if (t->device_type != SLIM_DEVICE_CPU) throw Error(SLIM_ERR_DTYPE, std::string(name) + ": must be in CPU memory for this build");
    if (!t->shape || t->ndim != static_cast<int32_t>(expected.size()))
        throw Error(SLIM_ERR_SHAPE, std::string(name) + ": rank " + std::to_string(t->ndim) + ", expected " + expected_text);
    std::vector<int64_t> shape(t->shape, t->shape + t->ndim);
    for (size_t i = 0; i < expected.size(); ++i)
        if (shape[i] <= 0 || (expected[i] >= 0 && shape[i] != expected[i]))
            throw Error(SLIM_ERR_SHAPE, std::string(name) + ": shape " + shape_text(*t) + ", expected " + expected_text);
    int64_t total = 1;  // the element count must fit comfortably: no overflow in any size computed from it
    for (int64_t d : shape)
        if (__builtin_mul_overflow(total, d, &total) || total > kMaxElements)
            throw Error(SLIM_ERR_SHAPE, std::string(name) + ": shape " + shape_text(*t) + " has too many elements");
    if (t->strides) {
        int64_t stride = 1;
        for (int i = t->ndim - 1; i >= 0; --i) {
            if (shape[i] > 1 && t->strides[i] != stride)
                throw Error(SLIM_ERR_DTYPE, std::string(name) + ": must be C-contiguous (strides do not match the shape)");
            stride *= shape[i];
        }
    }
    return shape;
}

size_t element_count(const std::vector<int64_t>& shape) {
    size_t n = 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    return n;
}

void check_finite(const slim_tensor* t, const std::vector<int64_t>& shape, const char* name) {
    const float* data = static_cast<const float*>(t->data);
    const size_t n = element_count(shape);
    constexpr size_t kChunk = 4096;
    for (size_t start = 0; start < n; start += kChunk) {
        // No early exit inside a chunk, so the compiler vectorises it; NaN fails the comparison too.
        const size_t end = std::min(n, start + kChunk);
        bool finite = true;
        for (size_t i = start; i < end; ++i) finite &= std::fabs(data[i]) <= FLT_MAX;
        if (finite) continue;
        for (size_t i = start; i < end; ++i)
            if (!std::isfinite(data[i]))
                throw Error(SLIM_ERR_NUMERICS, std::string(name) + " contains NaN or Inf (element " + std::to_string(i) + ")");
    }
}

void check_range(const slim_tensor* t, const std::vector<int64_t>& shape, const char* name, int64_t low, int64_t high) {
    const int64_t* data = static_cast<const int64_t*>(t->data);
    for (size_t i = 0, n = element_count(shape); i < n; ++i)
        if (data[i] < low || data[i] >= high)
            throw Error(SLIM_ERR_INVALID_ARGUMENT, std::string(name) + ": element " + std::to_string(i) + " is " + std::to_string(data[i]) +
                                                       ", outside [" + std::to_string(low) + ", " + std::to_string(high) + ")");
}

}  // namespace slim
