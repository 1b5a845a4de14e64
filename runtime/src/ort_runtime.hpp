// ONNX Runtime through its C API, loaded with dlopen from the `onnxruntime` wheel (or any libonnxruntime.so of API
// version >= 21): the library, its environment, status checks, and OrtValues over memory (TensorView).
#pragma once

#include <onnxruntime_c_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace slim {

// The loaded library, its API table and the process-wide environment (ONNX Runtime allows one).
class OrtRuntime {
  public:
    // Loads the library once per process; later calls return the same runtime.
    static std::shared_ptr<OrtRuntime> get(const char* library_path, int intra_op_threads);
    ~OrtRuntime();

    const OrtApi* api;
    OrtEnv* env = nullptr;
    OrtMemoryInfo* cpu_memory = nullptr;
    std::string library;

  private:
    OrtRuntime() = default;
    void* handle_ = nullptr;
};

// Throws Error(SLIM_ERR_BACKEND, context + ORT's message) when `status` is an error; releases it.
void check(const OrtApi* api, OrtStatus* status, const std::string& context);

// Bytes per element of the tensor types stages use (float32, int64, int32); 0 for any other.
size_t element_size(ONNXTensorElementDataType type);

// An OrtValue viewing caller-owned memory (float32 unless a type is given), or one that ONNX Runtime
// allocated and handed over (adopt); released on destruction.
class TensorView {
  public:
    TensorView() = default;
    TensorView(const OrtRuntime& ort, float* data, const std::vector<int64_t>& shape);
    TensorView(const OrtRuntime& ort, void* data, ONNXTensorElementDataType type, const std::vector<int64_t>& shape);
    // A view of memory described by `info` (host or device memory).
    TensorView(const OrtApi* api, const OrtMemoryInfo* info, void* data, ONNXTensorElementDataType type, const std::vector<int64_t>& shape);
    static TensorView adopt(const OrtApi* api, OrtValue* value);
    TensorView(TensorView&& other) noexcept : api_(other.api_), value_(other.value_) { other.value_ = nullptr; }
    TensorView& operator=(TensorView&& other) noexcept;
    ~TensorView();
    OrtValue* get() const { return value_; }

  private:
    const OrtApi* api_ = nullptr;
    OrtValue* value_ = nullptr;
};

}  // namespace slim
