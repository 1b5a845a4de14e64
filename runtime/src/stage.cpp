#include "stage.hpp"

#include <onnxruntime_session_options_config_keys.h>

#include <algorithm>
#include <cstring>

#include "error.hpp"

namespace slim {

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

}  // namespace slim
