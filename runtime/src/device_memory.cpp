#include "device_memory.hpp"

#include <algorithm>
#include <cstring>

#include "error.hpp"

namespace slim {

DeviceAllocator::DeviceAllocator(const Stage& stage, bool on_host)
    : api_(stage.ort_->api), cuda_device_(on_host ? -1 : stage.cuda_device()) {
    if (cuda_device_ < 0) {
        check(api_, api_->GetAllocatorWithDefaultOptions(&allocator_), "ONNX Runtime CPU allocator");
        check(api_, api_->AllocatorGetInfo(allocator_, &info_), "ONNX Runtime CPU allocator");
        return;
    }
    owned_ = true;
    check(api_, api_->CreateMemoryInfo("Cuda", OrtDeviceAllocator, cuda_device_, OrtMemTypeDefault, &owned_info_), "CUDA memory info");
    info_ = owned_info_;
    OrtStatus* status = api_->CreateAllocator(stage.session_, owned_info_, &allocator_);
    if (status) {
        api_->ReleaseMemoryInfo(owned_info_);
        check(api_, status, "CUDA device allocator (device " + std::to_string(cuda_device_) + ")");
    }
}

DeviceAllocator::~DeviceAllocator() {
    if (!owned_) return;  // ORT's default CPU allocator and its info belong to ORT
    if (allocator_) api_->ReleaseAllocator(allocator_);
    if (owned_info_) api_->ReleaseMemoryInfo(owned_info_);
}

void* DeviceAllocator::allocate(size_t bytes) const {
    void* p = nullptr;
    OrtStatus* status = api_->AllocatorAlloc(allocator_, bytes, &p);
    if (status || !p) {
        std::string message = status ? api_->GetErrorMessage(status) : "no memory returned";
        if (status) api_->ReleaseStatus(status);
        throw Error(SLIM_ERR_OUT_OF_MEMORY,
                    "cannot allocate a " + std::to_string(bytes) + "-byte generation buffer on " +
                        (cuda_device_ < 0 ? std::string("the CPU") : "CUDA device " + std::to_string(cuda_device_)) + ": " + message);
    }
    return p;
}

void DeviceAllocator::free(void* p) const {
    if (p) check(api_, api_->AllocatorFree(allocator_, p), "generation buffer free");
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
        release();
        allocator_ = other.allocator_;
        data_ = other.data_;
        capacity_ = other.capacity_;
        bytes_ = other.bytes_;
        count_ = other.count_;
        type_ = other.type_;
        shape_ = std::move(other.shape_);
        value_ = other.value_;
        other.data_ = nullptr;
        other.value_ = nullptr;
        other.capacity_ = other.bytes_ = 0;
        other.count_ = 0;
    }
    return *this;
}

DeviceBuffer::~DeviceBuffer() { release(); }

void DeviceBuffer::release() noexcept {
    if (value_) allocator_->api()->ReleaseValue(value_);
    value_ = nullptr;
    if (data_) {
        try {
            allocator_->free(data_);
        } catch (...) {}  // a destructor does not throw; ORT's free does not fail on memory it gave
    }
    data_ = nullptr;
}

bool DeviceBuffer::shape(const DeviceAllocator& allocator, ONNXTensorElementDataType type, const std::vector<int64_t>& dims) {
    if (value_ && allocator_ == &allocator && type == type_ && dims == shape_) return false;
    int64_t count = 1;
    for (int64_t d : dims) count *= d;
    const size_t bytes = static_cast<size_t>(count) * element_size(type);
    if (allocator_ != &allocator || bytes > capacity_) {
        DeviceBuffer old(std::move(*this));  // frees the old memory on leaving this scope
        const size_t capacity = bytes > 0 ? bytes : 64;
        data_ = allocator.allocate(capacity);
        capacity_ = capacity;
        allocator_ = &allocator;
    }
    if (value_) allocator_->api()->ReleaseValue(value_);
    value_ = nullptr;
    const OrtApi* api = allocator.api();
    check(api, api->CreateTensorWithDataAsOrtValue(allocator.memory_info(), data_, bytes, dims.data(), dims.size(), type, &value_),
          "generation buffer");
    type_ = type;
    shape_ = dims;
    count_ = count;
    bytes_ = bytes;
    return true;
}

bool DeviceBuffer::unuse() {
    if (!value_) return false;
    allocator_->api()->ReleaseValue(value_);
    value_ = nullptr;
    shape_.clear();
    count_ = 0;
    bytes_ = 0;
    return true;
}

TensorView DeviceBuffer::view(size_t offset, ONNXTensorElementDataType type, const std::vector<int64_t>& dims) const {
    size_t count = 1;
    for (int64_t d : dims) count *= static_cast<size_t>(d);
    if (!value_ || offset + count * element_size(type) > bytes_) throw Error(SLIM_ERR_INTERNAL, "a view outside its generation buffer");
    return TensorView(allocator_->api(), allocator_->memory_info(), static_cast<char*>(data_) + offset, type, dims);
}

StageBinding::StageBinding(const Stage& stage)
    : stage_(&stage),
      rebind_inputs_(stage.cuda_device() >= 0),
      input_count_(stage.input_count()),
      output_count_(stage.output_count()),
      slots_(kSlots) {
    if (input_count_ > kMaxValues || output_count_ > kMaxValues)
        throw Error(SLIM_ERR_INTERNAL, "stage " + stage.name() + " has more inputs or outputs than IO binding here supports");
    const OrtApi* api = stage.ort_->api;
    for (Slot& slot : slots_) {
        OrtStatus* status = api->CreateIoBinding(stage.session_, &slot.binding);
        if (status) {
            for (Slot& made : slots_)
                if (made.binding) api->ReleaseIoBinding(made.binding);
            check(api, status, "stage " + stage.name() + " IO binding");
        }
    }
}

StageBinding::StageBinding(StageBinding&& other) noexcept
    : stage_(other.stage_),
      rebind_inputs_(other.rebind_inputs_),
      input_count_(other.input_count_),
      output_count_(other.output_count_),
      inputs_(other.inputs_),
      outputs_(other.outputs_),
      slots_(std::move(other.slots_)),
      chosen_(other.chosen_),
      calls_(other.calls_),
      bind_calls_(other.bind_calls_) {
    other.slots_.clear();
}

StageBinding::~StageBinding() {
    for (Slot& slot : slots_)
        if (slot.binding) stage_->ort_->api->ReleaseIoBinding(slot.binding);
}

void StageBinding::forget() {
    for (Slot& slot : slots_) {
        std::fill(slot.inputs.begin(), slot.inputs.end(), nullptr);
        std::fill(slot.outputs.begin(), slot.outputs.end(), nullptr);
    }
}

void StageBinding::forget(const OrtValue* value) {
    for (Slot& slot : slots_) {
        std::replace(slot.inputs.begin(), slot.inputs.end(), value, static_cast<const OrtValue*>(nullptr));
        std::replace(slot.outputs.begin(), slot.outputs.end(), value, static_cast<const OrtValue*>(nullptr));
    }
}

void StageBinding::bind(Slot& slot, bool input, size_t index, const OrtValue* value) {
    const OrtApi* api = stage_->ort_->api;
    OrtStatus* status = input ? api->BindInput(slot.binding, stage_->input_ptrs_[index], value)
                              : api->BindOutput(slot.binding, stage_->output_ptrs_[index], value);
    if (status) {
        (input ? slot.inputs : slot.outputs)[index] = nullptr;
        check(api, status, "stage " + stage_->name() + ": binding " + (input ? "input " : "output ") + std::to_string(index));
    }
    (input ? slot.inputs : slot.outputs)[index] = value;
    ++bind_calls_;
}

void StageBinding::bind() {
    // The slot holding exactly these values (the last one used first), else the least recently used one.
    Slot* chosen = nullptr;
    auto holds = [&](const Slot& slot) { return (rebind_inputs_ || slot.inputs == inputs_) && slot.outputs == outputs_; };
    if (chosen_ && holds(*chosen_)) chosen = chosen_;
    for (size_t i = 0; !chosen && i < slots_.size(); ++i)
        if (holds(slots_[i])) chosen = &slots_[i];
    if (!chosen) {
        chosen = &slots_[0];
        for (Slot& slot : slots_)
            if (slot.last_use < chosen->last_use) chosen = &slot;
    }
    for (size_t i = 0; i < input_count_; ++i)
        if (rebind_inputs_ || chosen->inputs[i] != inputs_[i]) bind(*chosen, true, i, inputs_[i]);
    for (size_t i = 0; i < output_count_; ++i)
        if (chosen->outputs[i] != outputs_[i]) bind(*chosen, false, i, outputs_[i]);
    chosen->last_use = ++calls_;
    chosen_ = chosen;
}

}  // namespace slim
