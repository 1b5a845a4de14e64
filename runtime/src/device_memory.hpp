// The device memory and IO bindings a generation runs on: ONNX Runtime's allocator for the stages' device
// (DeviceAllocator), a generation's buffers (DeviceBuffer), and each stage's bindings (StageBinding).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "ort_runtime.hpp"
#include "stage.hpp"

namespace slim {

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

}  // namespace slim
