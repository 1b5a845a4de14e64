// ONNX Runtime through its C API, loaded with dlopen from the `onnxruntime` wheel (or any
// libonnxruntime.so of API version >= 21): the environment, one session per stage, Run calls, and the
// device memory and IO bindings a generation runs on (DeviceAllocator, DeviceBuffer, StageBinding).
#pragma once

#include <onnxruntime_c_api.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "slimengine.h"

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

// A graph input or output as the compiled session declares it; -1 in dims is a dynamic dimension.
struct IoSpec {
    std::string name;
    ONNXTensorElementDataType type;
    std::vector<int64_t> dims;
};

// A stage's ONNX model as ONNX Runtime gets it. A bundle's stage is handed over in memory: its graph
// and its one weights file (`<graph file>.data`, the external-data location the exporter writes), read
// at open; ONNX Runtime copies the weights, refuses any other external-data location, and reads
// nothing from disk, so no later change to the files reaches the session. A plain .onnx file is opened
// by path (ONNX Runtime reads and maps it, and its external data, itself).
struct StageModel {
    std::string path;  // the graph's path, for messages; what ONNX Runtime opens when !in_memory
    bool in_memory = false;
    std::string graph;         // the ModelProto bytes
    std::string weights_name;  // the external-data location the weights are given for
    std::string weights;       // empty: no weights file (external data in the graph is then refused)

    // Frees the bytes once ONNX Runtime has its copy. (`model = StageModel{}` would not: libstdc++'s
    // move-assignment from an empty string keeps the target's buffer, so every stage's weights stayed.)
    void release() {
        std::string().swap(graph);
        std::string().swap(weights);
    }
};

// One compiled stage graph.
class Stage {
  public:
    // The graph's input/output names must equal `inputs`/`outputs`; both empty: take the graph's own
    // (a plain ONNX model). Throws Error(SLIM_ERR_BUNDLE) on a mismatch, Error(SLIM_ERR_BACKEND).
    // `custom_ops`: path of a custom-op library to register for this stage, or "" for none.
    // `cuda_device` >= 0: run on ONNX Runtime's CUDA execution provider on that device (nodes it
    // cannot take fall back to the CPU); Error(BACKEND) naming the provider when the library lacks it.
    Stage(std::shared_ptr<OrtRuntime> ort, const StageModel& model, const std::string& stage_name, const std::vector<std::string>& inputs,
          const std::vector<std::string>& outputs, const std::string& custom_ops, int cuda_device = -1);
    ~Stage();
    Stage(const Stage&) = delete;
    Stage& operator=(const Stage&) = delete;

    // Runs with caller-provided inputs and pre-allocated outputs (ONNX Runtime writes into them).
    // Thread-safe: ONNX Runtime sessions allow concurrent Run calls.
    void run(const OrtValue* const* inputs, OrtValue* const* outputs) const;
    // Runs with every input and the chosen outputs (indices into outputs()), which ONNX Runtime allocates.
    std::vector<TensorView> run_selected(const OrtValue* const* inputs, const std::vector<size_t>& output_indices) const;
    // Runs with the inputs and outputs bound to `binding` (made by StageBinding for this stage).
    void run(OrtIoBinding* binding) const;

    const std::string& name() const { return name_; }
    size_t input_count() const { return input_names_.size(); }
    size_t output_count() const { return output_names_.size(); }
    const std::vector<IoSpec>& inputs() const { return inputs_; }
    const std::vector<IoSpec>& outputs() const { return outputs_; }
    // The CUDA device the stage runs on, or -1 for the CPU.
    int cuda_device() const { return cuda_device_; }

  private:
    friend class StageBinding;
    friend class DeviceAllocator;
    std::shared_ptr<OrtRuntime> ort_;
    OrtSession* session_ = nullptr;
    int cuda_device_ = -1;
    std::string name_;
    std::vector<std::string> input_names_, output_names_;
    std::vector<IoSpec> inputs_, outputs_;
    std::vector<const char*> input_ptrs_, output_ptrs_;
};

// Where a generation's buffers live: ONNX Runtime's allocator for the device the stages run on (the
// CPU allocator; on CUDA the execution provider's device allocator, made from a stage session, which
// must outlive this object).
class DeviceAllocator {
  public:
    // `on_host`: host memory even for a stage on CUDA (no device ops for it in this build).
    DeviceAllocator(const Stage& stage, bool on_host);
    ~DeviceAllocator();
    DeviceAllocator(const DeviceAllocator&) = delete;
    DeviceAllocator& operator=(const DeviceAllocator&) = delete;

    void* allocate(size_t bytes) const;  // Error(SLIM_ERR_OUT_OF_MEMORY) when the device has no room
    void free(void* p) const;
    const OrtMemoryInfo* memory_info() const { return info_; }
    const OrtApi* api() const { return api_; }
    int cuda_device() const { return cuda_device_; }  // -1: host memory

  private:
    const OrtApi* api_;
    OrtAllocator* allocator_ = nullptr;
    const OrtMemoryInfo* info_ = nullptr;
    OrtMemoryInfo* owned_info_ = nullptr;
    bool owned_ = false;  // a device allocator made for a session (released here), not ORT's default CPU one
    int cuda_device_ = -1;
};

// One buffer of a generation: memory from a DeviceAllocator, seen by ONNX Runtime as an OrtValue of
// exactly the request's shape. Memory is kept across requests (grown when a request needs more); the
// OrtValue is remade only when the shape changes.
class DeviceBuffer {
  public:
    DeviceBuffer() = default;
    DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
    DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
    ~DeviceBuffer();

    // Sizes the buffer for this request; returns true when its OrtValue changed (bindings to the old one are stale).
    bool shape(const DeviceAllocator& allocator, ONNXTensorElementDataType type, const std::vector<int64_t>& shape);
    bool shape(const DeviceAllocator& allocator, const std::vector<int64_t>& dims) {
        return shape(allocator, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, dims);
    }
    // Not used by this request: no OrtValue, data() is null (the memory is kept for a later request).
    // Returns true when it had an OrtValue.
    bool unuse();

    bool used() const { return value_ != nullptr; }
    OrtValue* value() const { return value_; }
    void* data() const { return value_ ? data_ : nullptr; }
    float* f32() const { return static_cast<float*>(data()); }
    int64_t* i64() const { return static_cast<int64_t*>(data()); }
    int64_t count() const { return count_; }  // elements of the current shape
    size_t bytes() const { return bytes_; }

    // An OrtValue over part of this buffer's memory: `shape` of `type` starting `offset` bytes in.
    TensorView view(size_t offset, ONNXTensorElementDataType type, const std::vector<int64_t>& shape) const;

  private:
    void release() noexcept;
    const DeviceAllocator* allocator_ = nullptr;
    void* data_ = nullptr;
    size_t capacity_ = 0, bytes_ = 0;
    int64_t count_ = 0;
    ONNXTensorElementDataType type_ = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    std::vector<int64_t> shape_;
    OrtValue* value_ = nullptr;
};

// A stage's inputs and outputs bound to OrtValues with ONNX Runtime's IO binding: each output is
// written in place into the buffer bound to it. A caller sets every input and output, then runs.
// ONNX Runtime's BindInput/BindOutput cost microseconds each, so a stage keeps a few bindings: a call
// whose values one of them already holds (a loop alternates between a few buffer layouts) binds
// nothing; otherwise the least recently used one is rebound where it differs. On CUDA every input is
// bound at every call: ONNX Runtime copies an input at bind time when a node consuming it runs on
// the other device, and a copy made at an earlier call would be stale.
class StageBinding {
  public:
    explicit StageBinding(const Stage& stage);
    ~StageBinding();
    StageBinding(StageBinding&& other) noexcept;
    StageBinding(const StageBinding&) = delete;
    StageBinding& operator=(const StageBinding&) = delete;
    StageBinding& operator=(StageBinding&&) = delete;

    void input(size_t index, const OrtValue* value) { inputs_[index] = value; }
    void output(size_t index, OrtValue* value) { outputs_[index] = value; }
    // Binds the inputs and outputs set (what no binding holds yet), then runs the stage on them (ONNX
    // Runtime's Run alone: what a caller times as backend time). Both throw Error(SLIM_ERR_BACKEND).
    void bind();
    void run() const { stage_->run(chosen_->binding); }
    // No binding is trusted at its next use (OrtValues were remade: an address may be reused).
    void forget();
    // No binding holding `value` is trusted for it (it is being released; its address may be reused).
    void forget(const OrtValue* value);
    // ONNX Runtime bind calls made so far (a repeated request makes none on the CPU).
    uint64_t bind_calls() const { return bind_calls_; }

  private:
    // Fixed-size arrays, kept together: a call checks them right after ONNX Runtime's Run has evicted
    // most of the cache, and each cache line touched then costs a miss.
    static constexpr size_t kSlots = 4, kMaxValues = 8;
    using Values = std::array<const OrtValue*, kMaxValues>;
    struct Slot {
        OrtIoBinding* binding = nullptr;
        Values inputs{}, outputs{};  // what it holds (nullptr: unknown)
        uint64_t last_use = 0;
    };
    void bind(Slot& slot, bool input, size_t index, const OrtValue* value);
    const Stage* stage_;
    bool rebind_inputs_;
    size_t input_count_, output_count_;
    Values inputs_{}, outputs_{};  // this call's
    std::vector<Slot> slots_;
    Slot* chosen_ = nullptr;  // bind()'s choice
    uint64_t calls_ = 0, bind_calls_ = 0;
};

// The generic stage call (slim_stage_run): caller tensors bound to `stage`'s graph inputs and outputs by
// name, and one Run. Every input bound exactly once with the graph's dtype (float32, int64 or int32),
// rank and fixed dimensions (float32 inputs finite); the outputs any subset of the graph's, each caller
// tensor of exactly the computed shape. Nothing is written to an output unless every check passes.
// Throws Error: INVALID_ARGUMENT (an unknown or missing name), SHAPE, DTYPE, NUMERICS, BACKEND.
void run_named(const OrtRuntime& ort, const Stage& stage, const slim_named_tensor* inputs, int32_t input_count,
               const slim_named_tensor* outputs, int32_t output_count);

}  // namespace slim
