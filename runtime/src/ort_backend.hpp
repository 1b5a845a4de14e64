// ONNX Runtime through its C API, loaded with dlopen from the `onnxruntime` wheel (or any
// libonnxruntime.so of API version >= 21): the environment, one session per stage, and Run calls.
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
    static TensorView adopt(const OrtApi* api, OrtValue* value);
    TensorView(TensorView&& other) noexcept : api_(other.api_), value_(other.value_) { other.value_ = nullptr; }
    TensorView& operator=(TensorView&& other) noexcept;
    ~TensorView();
    OrtValue* get() const { return value_; }

  private:
    const OrtApi* api_ = nullptr;
    OrtValue* value_ = nullptr;
};

// A graph input or output as the compiled session declares it; -1 in dims is a dynamic dimension.
struct IoSpec {
    std::string name;
    ONNXTensorElementDataType type;
    std::vector<int64_t> dims;
};

// One compiled stage graph.
class StageSession {
  public:
    // The graph's input/output names must equal `inputs`/`outputs`; both empty: take the graph's own
    // (a plain ONNX model). Throws Error(SLIM_ERR_BUNDLE) on a mismatch, Error(SLIM_ERR_BACKEND).
    // `custom_ops`: path of a custom-op library to register for this stage, or "" for none.
    // `cuda_device` >= 0: run on ONNX Runtime's CUDA execution provider on that device (nodes it
    // cannot take fall back to the CPU); Error(BACKEND) naming the provider when the library lacks it.
    StageSession(std::shared_ptr<OrtRuntime> ort, const std::string& model_path, const std::string& stage_name,
                 const std::vector<std::string>& inputs, const std::vector<std::string>& outputs, const std::string& custom_ops,
                 int cuda_device = -1);
    ~StageSession();
    StageSession(const StageSession&) = delete;
    StageSession& operator=(const StageSession&) = delete;

    // Runs with caller-provided inputs and pre-allocated outputs (ONNX Runtime writes into them).
    // Thread-safe: ONNX Runtime sessions allow concurrent Run calls.
    void run(const OrtValue* const* inputs, OrtValue* const* outputs) const;
    // Runs with every input and the chosen outputs (indices into outputs()), which ONNX Runtime allocates.
    std::vector<TensorView> run_selected(const OrtValue* const* inputs, const std::vector<size_t>& output_indices) const;

    const std::string& name() const { return name_; }
    size_t input_count() const { return input_names_.size(); }
    size_t output_count() const { return output_names_.size(); }
    const std::vector<IoSpec>& inputs() const { return inputs_; }
    const std::vector<IoSpec>& outputs() const { return outputs_; }

  private:
    std::shared_ptr<OrtRuntime> ort_;
    OrtSession* session_ = nullptr;
    std::string name_;
    std::vector<std::string> input_names_, output_names_;
    std::vector<IoSpec> inputs_, outputs_;
    std::vector<const char*> input_ptrs_, output_ptrs_;
};

}  // namespace slim
