#include "ort_backend.hpp"

#include <dlfcn.h>
#include <onnxruntime_session_options_config_keys.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "error.hpp"
#include "tensor_args.hpp"

namespace slim {

// Headers of API 21 (Debian's libonnxruntime-dev 1.21) work with any newer library.
constexpr uint32_t kOrtApiVersion = 21;

void check(const OrtApi* api, OrtStatus* status, const std::string& context) {
    if (!status) return;
    std::string message = api->GetErrorMessage(status);
    api->ReleaseStatus(status);
    throw Error(SLIM_ERR_BACKEND, context + ": " + message);
}

std::shared_ptr<OrtRuntime> OrtRuntime::get(const char* library_path, int intra_op_threads) {
    static std::mutex mutex;
    static std::weak_ptr<OrtRuntime> current;
    std::lock_guard<std::mutex> lock(mutex);
    if (auto existing = current.lock()) {
        // ONNX Runtime allows one environment per process, so every engine shares one library.
        if (library_path && *library_path && existing->library != library_path)
            throw Error(SLIM_ERR_BACKEND, std::string("ONNX Runtime is already loaded from ") + existing->library + "; cannot also load " +
                                              library_path + " in this process");
        return existing;
    }

    std::vector<std::string> candidates;
    if (library_path && *library_path)
        candidates.push_back(library_path);
    else {
        if (const char* env = std::getenv("SLIMENGINE_ORT_LIBRARY"); env && *env) candidates.push_back(env);
        candidates.push_back("libonnxruntime.so");
        candidates.push_back("libonnxruntime.so.1");
    }
    void* handle = nullptr;
    std::string tried, used;
    for (const auto& c : candidates) {
        handle = dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (handle) {
            used = c;
            break;
        }
        tried += "\n  " + c + ": " + dlerror();
    }
    if (!handle)
        throw Error(SLIM_ERR_BACKEND,
                    "ONNX Runtime library not found; pass slim_engine_params.onnxruntime_library or set "
                    "SLIMENGINE_ORT_LIBRARY to the onnxruntime wheel's capi/libonnxruntime.so.<version>. Tried:" +
                        tried);
    using GetApiBase = const OrtApiBase* (*)();
    auto get_base = reinterpret_cast<GetApiBase>(dlsym(handle, "OrtGetApiBase"));
    const OrtApi* api = get_base ? get_base()->GetApi(kOrtApiVersion) : nullptr;
    if (!api) {
        dlclose(handle);
        throw Error(SLIM_ERR_BACKEND,
                    used + " does not provide ONNX Runtime C API version " + std::to_string(kOrtApiVersion) + " or newer");
    }
    std::shared_ptr<OrtRuntime> rt(new OrtRuntime());
    rt->api = api;
    rt->handle_ = handle;
    rt->library = used;
    // One thread pool for every stage of every engine: per-session pools would spin against each other.
    OrtThreadingOptions* threading = nullptr;
    check(api, api->CreateThreadingOptions(&threading), "ONNX Runtime threading options");
    check(api, api->SetGlobalIntraOpNumThreads(threading, intra_op_threads), "ONNX Runtime threading options");
    check(api, api->SetGlobalInterOpNumThreads(threading, 1), "ONNX Runtime threading options");
    OrtStatus* status = api->CreateEnvWithGlobalThreadPools(ORT_LOGGING_LEVEL_ERROR, "slimengine", threading, &rt->env);
    api->ReleaseThreadingOptions(threading);
    check(api, status, "ONNX Runtime environment");
    check(api, api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &rt->cpu_memory), "ONNX Runtime memory info");
    current = rt;
    return rt;
}

OrtRuntime::~OrtRuntime() {
    if (cpu_memory) api->ReleaseMemoryInfo(cpu_memory);
    if (env) api->ReleaseEnv(env);
    // The library stays loaded: ONNX Runtime keeps thread-local state that outlives ReleaseEnv.
}

size_t element_size(ONNXTensorElementDataType type) {
    switch (type) {
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32:
            return 4;
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
            return 8;
        default:
            return 0;
    }
}

TensorView::TensorView(const OrtRuntime& ort, float* data, const std::vector<int64_t>& shape)
    : TensorView(ort, data, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, shape) {}

TensorView::TensorView(const OrtRuntime& ort, void* data, ONNXTensorElementDataType type, const std::vector<int64_t>& shape)
    : TensorView(ort.api, ort.cpu_memory, data, type, shape) {}

TensorView::TensorView(const OrtApi* api, const OrtMemoryInfo* info, void* data, ONNXTensorElementDataType type,
                       const std::vector<int64_t>& shape)
    : api_(api) {
    size_t count = 1;
    for (int64_t d : shape) count *= static_cast<size_t>(d);
    check(api_, api_->CreateTensorWithDataAsOrtValue(info, data, count * element_size(type), shape.data(), shape.size(), type, &value_),
          "tensor view");
}

TensorView TensorView::adopt(const OrtApi* api, OrtValue* value) {
    TensorView view;
    view.api_ = api;
    view.value_ = value;
    return view;
}

TensorView& TensorView::operator=(TensorView&& other) noexcept {
    if (this != &other) {
        if (value_) api_->ReleaseValue(value_);
        api_ = other.api_;
        value_ = other.value_;
        other.value_ = nullptr;
    }
    return *this;
}

TensorView::~TensorView() {
    if (value_) api_->ReleaseValue(value_);
}

namespace {

// Appends ONNX Runtime's CUDA execution provider on `device` to `options`; nullptr or ORT's error.
OrtStatus* append_cuda_provider(const OrtApi* api, OrtSessionOptions* options, int device) {
    OrtCUDAProviderOptionsV2* cuda = nullptr;
    OrtStatus* status = api->CreateCUDAProviderOptions(&cuda);
    if (status) return status;
    const std::string id = std::to_string(device);
    const char* keys[] = {"device_id"};
    const char* values[] = {id.c_str()};
    status = api->UpdateCUDAProviderOptions(cuda, keys, values, 1);
    if (!status) status = api->SessionOptionsAppendExecutionProvider_CUDA_V2(options, cuda);
    api->ReleaseCUDAProviderOptions(cuda);
    return status;
}

}  // namespace

Stage::Stage(std::shared_ptr<OrtRuntime> ort, const StageModel& model, const std::string& stage_name,
             const std::vector<std::string>& inputs, const std::vector<std::string>& outputs, const std::string& custom_ops,
             int cuda_device)
    : ort_(std::move(ort)), cuda_device_(cuda_device), name_(stage_name), input_names_(inputs), output_names_(outputs) {
    const OrtApi* api = ort_->api;
    OrtSessionOptions* options = nullptr;
    check(api, api->CreateSessionOptions(&options), "stage " + name_);
    OrtStatus* status = api->DisablePerSessionThreads(options);
    if (!status) status = api->SetSessionGraphOptimizationLevel(options, ORT_ENABLE_ALL);
    if (!status && cuda_device >= 0) {
        status = append_cuda_provider(api, options, cuda_device);
        if (status) {
            const std::string message = api->GetErrorMessage(status);
            api->ReleaseStatus(status);
            api->ReleaseSessionOptions(options);
            throw Error(SLIM_ERR_BACKEND, "CUDAExecutionProvider (device " + std::to_string(cuda_device) + ") is not available in " +
                                              ort_->library + ": " + message +
                                              " Use onnxruntime-gpu's library (pip install 'slimengine[gpu]') or the CPU device.");
        }
    }
    if (!status && !custom_ops.empty()) status = api->RegisterCustomOpsLibrary_V2(options, custom_ops.c_str());
    if (!model.in_memory) {
        if (!status) status = api->CreateSession(ort_->env, model.path.c_str(), options, &session_);
    } else {
        // Always one entry, even for no weights file: with a table given, ONNX Runtime refuses a location not
        // in it instead of reading that path from disk. It copies the bytes (they may be freed after this).
        static char no_weights = 0;
        const char* names[] = {model.weights_name.c_str()};
        char* buffers[] = {model.weights.empty() ? &no_weights : const_cast<char*>(model.weights.data())};
        const size_t lengths[] = {model.weights.size()};
        if (!status) status = api->AddExternalInitializersFromFilesInMemory(options, names, buffers, lengths, 1);
        // The table does not cover initializers in If/Loop/Scan branches nor sparse ones: ONNX Runtime reads those
        // from the folder given here, else from the working directory. /dev/null can hold no file (ENOTDIR), so
        // any such lookup fails and nothing outside the table is ever read.
        if (!status) status = api->AddSessionConfigEntry(options, kOrtSessionOptionsModelExternalInitializersFileFolderPath, "/dev/null");
        if (!status) status = api->CreateSessionFromArray(ort_->env, model.graph.data(), model.graph.size(), options, &session_);
    }
    api->ReleaseSessionOptions(options);
    check(api, status, "stage " + name_ + " (" + model.path + ")");

    // The graph's own I/O names must be exactly the manifest's.
    OrtAllocator* allocator = nullptr;
    check(api, api->GetAllocatorWithDefaultOptions(&allocator), "allocator");
    const bool discover = inputs.empty() && outputs.empty();
    auto check_names = [&](bool is_input, std::vector<std::string>& expected) {
        size_t count = 0;
        check(api, is_input ? api->SessionGetInputCount(session_, &count) : api->SessionGetOutputCount(session_, &count), "stage " + name_);
        std::vector<std::string> actual;
        for (size_t i = 0; i < count; ++i) {
            char* n = nullptr;
            check(api,
                  is_input ? api->SessionGetInputName(session_, i, allocator, &n) : api->SessionGetOutputName(session_, i, allocator, &n),
                  "stage " + name_);
            actual.emplace_back(n);
            allocator->Free(allocator, n);
        }
        if (discover) expected = actual;
        if (actual != expected) {
            std::string got, want;
            for (auto& a : actual) got += (got.empty() ? "" : ",") + a;
            for (auto& e : expected) want += (want.empty() ? "" : ",") + e;
            api->ReleaseSession(session_);
            session_ = nullptr;
            throw Error(SLIM_ERR_BUNDLE, "stage " + name_ + ": graph " + (is_input ? "inputs" : "outputs") + " are [" + got +
                                             "] but the manifest says [" + want + "]");
        }
    };
    check_names(true, input_names_);
    check_names(false, output_names_);
    // Element type and dims of every input and output, for checking a caller's tensors by name.
    auto read_specs = [&](bool is_input, const std::vector<std::string>& names, std::vector<IoSpec>& specs) {
        for (size_t i = 0; i < names.size(); ++i) {
            OrtTypeInfo* info = nullptr;
            check(api, is_input ? api->SessionGetInputTypeInfo(session_, i, &info) : api->SessionGetOutputTypeInfo(session_, i, &info),
                  "stage " + name_);
            const OrtTensorTypeAndShapeInfo* tensor = nullptr;
            OrtStatus* st = api->CastTypeInfoToTensorInfo(info, &tensor);
            IoSpec spec{names[i], ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, {}};
            size_t rank = 0;
            if (!st && tensor) st = api->GetTensorElementType(tensor, &spec.type);
            if (!st && tensor) st = api->GetDimensionsCount(tensor, &rank);
            spec.dims.assign(rank, -1);
            if (!st && tensor && rank) st = api->GetDimensions(tensor, spec.dims.data(), rank);
            api->ReleaseTypeInfo(info);
            check(api, st, "stage " + name_);
            specs.push_back(std::move(spec));
        }
    };
    try {
        read_specs(true, input_names_, inputs_);
        read_specs(false, output_names_, outputs_);
    } catch (...) {
        api->ReleaseSession(session_);
        session_ = nullptr;
        throw;
    }
    for (auto& n : input_names_) input_ptrs_.push_back(n.c_str());
    for (auto& n : output_names_) output_ptrs_.push_back(n.c_str());
}

Stage::~Stage() {
    if (session_) ort_->api->ReleaseSession(session_);
}

void Stage::run(const OrtValue* const* inputs, OrtValue* const* outputs) const {
    // Run takes a non-const output array; the OrtValues it points to are ours and pre-allocated.
    OrtStatus* status = ort_->api->Run(session_, nullptr, input_ptrs_.data(), inputs, input_ptrs_.size(), output_ptrs_.data(),
                                       output_ptrs_.size(), const_cast<OrtValue**>(outputs));
    if (status) check(ort_->api, status, "stage " + name_);  // message built only on failure
}

std::vector<TensorView> Stage::run_selected(const OrtValue* const* inputs, const std::vector<size_t>& output_indices) const {
    std::vector<const char*> names;
    for (size_t i : output_indices) names.push_back(output_ptrs_.at(i));
    std::vector<OrtValue*> values(names.size(), nullptr);
    OrtStatus* status =
        ort_->api->Run(session_, nullptr, input_ptrs_.data(), inputs, input_ptrs_.size(), names.data(), names.size(), values.data());
    std::vector<TensorView> owned;
    for (OrtValue* v : values)
        if (v) owned.push_back(TensorView::adopt(ort_->api, v));
    if (status) check(ort_->api, status, "stage " + name_);
    return owned;
}

void Stage::run(OrtIoBinding* binding) const {
    OrtStatus* status = ort_->api->RunWithBinding(session_, nullptr, binding);
    if (status) check(ort_->api, status, "stage " + name_);
}

// ---- device memory and IO binding ----

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

namespace {

int32_t slim_dtype_of(ONNXTensorElementDataType type) {
    switch (type) {
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
            return SLIM_DTYPE_FLOAT32;
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
            return SLIM_DTYPE_INT64;
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32:
            return SLIM_DTYPE_INT32;
        default:
            return -1;
    }
}

// A graph tensor's expected shape for check_tensor: fixed dims as they are, dynamic ones any size.
std::string dims_text(const std::vector<int64_t>& dims) {
    std::string s = "[";
    for (size_t i = 0; i < dims.size(); ++i) s += (i ? "," : "") + (dims[i] >= 0 ? std::to_string(dims[i]) : std::string("?"));
    return s + "]";
}

}  // namespace

void run_named(const OrtRuntime& ort, const Stage& s, const slim_named_tensor* inputs, int32_t input_count,
               const slim_named_tensor* outputs, int32_t output_count) {
    const std::string where = "stage " + s.name() + ": ";
    if (input_count != static_cast<int32_t>(s.inputs().size()) || (input_count > 0 && !inputs))
        throw Error(SLIM_ERR_INVALID_ARGUMENT,
                    where + "takes " + std::to_string(s.inputs().size()) + " inputs, got " + std::to_string(input_count));
    if (output_count < 1 || output_count > static_cast<int32_t>(s.outputs().size()) || !outputs)
        throw Error(SLIM_ERR_INVALID_ARGUMENT, where + "bind 1 to " + std::to_string(s.outputs().size()) + " outputs");
    // Binds caller tensors to graph tensors by name; each name at most once.
    auto bind = [&](const slim_named_tensor* given, int32_t count, const std::vector<IoSpec>& specs, bool is_input) {
        std::vector<int> order(count, -1);
        std::vector<bool> used(specs.size(), false);
        for (int32_t i = 0; i < count; ++i) {
            const char* name = given[i].name;
            for (size_t k = 0; name && k < specs.size(); ++k)
                if (specs[k].name == name) order[i] = static_cast<int>(k);
            const std::string tname = where + (is_input ? "input '" : "output '") + (name ? name : "(null)") + "'";
            if (order[i] < 0) throw Error(SLIM_ERR_INVALID_ARGUMENT, tname + " is not a graph " + (is_input ? "input" : "output"));
            if (used[order[i]]) throw Error(SLIM_ERR_INVALID_ARGUMENT, tname + " is bound twice");
            used[order[i]] = true;
            const IoSpec& spec = specs[order[i]];
            const int32_t dtype = slim_dtype_of(spec.type);
            if (dtype < 0) throw Error(SLIM_ERR_DTYPE, tname + " has an element type this runtime does not bind");
            auto shape = check_tensor(&given[i].tensor, tname.c_str(), spec.dims, dims_text(spec.dims), dtype);
            if (is_input && dtype == SLIM_DTYPE_FLOAT32) check_finite(&given[i].tensor, shape, tname.c_str());
        }
        return order;
    };
    bind(inputs, input_count, s.inputs(), true);  // every input bound: the count matched and no name twice
    std::vector<int> out_order = bind(outputs, output_count, s.outputs(), false);

    std::vector<TensorView> views(s.inputs().size());
    for (int32_t i = 0; i < input_count; ++i) {
        size_t k = 0;
        while (s.inputs()[k].name != inputs[i].name) ++k;
        const slim_tensor& t = inputs[i].tensor;
        views[k] = TensorView(ort, t.data, s.inputs()[k].type, std::vector<int64_t>(t.shape, t.shape + t.ndim));
    }
    std::vector<const OrtValue*> values;
    for (auto& v : views) values.push_back(v.get());
    std::vector<size_t> selected(out_order.begin(), out_order.end());
    std::vector<TensorView> results = s.run_selected(values.data(), selected);

    // Check every output's computed shape before copying any.
    const OrtApi* api = ort.api;
    std::vector<void*> sources(results.size());
    for (size_t i = 0; i < results.size(); ++i) {
        OrtTensorTypeAndShapeInfo* info = nullptr;
        check(api, api->GetTensorTypeAndShape(results[i].get(), &info), where + "output shape");
        size_t rank = 0;
        OrtStatus* st = api->GetDimensionsCount(info, &rank);
        std::vector<int64_t> dims(rank);
        if (!st && rank) st = api->GetDimensions(info, dims.data(), rank);
        api->ReleaseTensorTypeAndShapeInfo(info);
        check(api, st, where + "output shape");
        const slim_tensor& t = outputs[i].tensor;
        if (dims != std::vector<int64_t>(t.shape, t.shape + t.ndim))
            throw Error(SLIM_ERR_SHAPE, where + "output '" + outputs[i].name + "' has shape " + dims_text(dims) +
                                            ", but the caller's tensor is " + shape_text(t));
        check(api, api->GetTensorMutableData(results[i].get(), &sources[i]), where + "output data");
    }
    for (size_t i = 0; i < results.size(); ++i) {
        const slim_tensor& t = outputs[i].tensor;
        std::memcpy(t.data, sources[i],
                    element_count(std::vector<int64_t>(t.shape, t.shape + t.ndim)) * element_size(s.outputs()[out_order[i]].type));
    }
}

}  // namespace slim
