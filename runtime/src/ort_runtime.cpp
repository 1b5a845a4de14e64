#include "ort_runtime.hpp"

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
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
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8:
            return 1;
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

}  // namespace slim
