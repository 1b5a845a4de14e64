#include "ort_backend.hpp"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>

#include "error.hpp"

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
    : api_(ort.api) {
    size_t count = 1;
    for (int64_t d : shape) count *= static_cast<size_t>(d);
    check(api_,
          api_->CreateTensorWithDataAsOrtValue(ort.cpu_memory, data, count * element_size(type), shape.data(), shape.size(), type, &value_),
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

StageSession::StageSession(std::shared_ptr<OrtRuntime> ort, const std::string& model_path, const std::string& stage_name,
                           const std::vector<std::string>& inputs, const std::vector<std::string>& outputs, const std::string& custom_ops,
                           int cuda_device)
    : ort_(std::move(ort)), name_(stage_name), input_names_(inputs), output_names_(outputs) {
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
    if (!status) status = api->CreateSession(ort_->env, model_path.c_str(), options, &session_);
    api->ReleaseSessionOptions(options);
    check(api, status, "stage " + name_ + " (" + model_path + ")");

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

StageSession::~StageSession() {
    if (session_) ort_->api->ReleaseSession(session_);
}

void StageSession::run(const OrtValue* const* inputs, OrtValue* const* outputs) const {
    // Run takes a non-const output array; the OrtValues it points to are ours and pre-allocated.
    OrtStatus* status = ort_->api->Run(session_, nullptr, input_ptrs_.data(), inputs, input_ptrs_.size(), output_ptrs_.data(),
                                       output_ptrs_.size(), const_cast<OrtValue**>(outputs));
    if (status) check(ort_->api, status, "stage " + name_);  // message built only on failure
}

std::vector<TensorView> StageSession::run_selected(const OrtValue* const* inputs, const std::vector<size_t>& output_indices) const {
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

}  // namespace slim
