#include "stage.hpp"

#include <onnxruntime_session_options_config_keys.h>

#include <algorithm>
#include <cstring>

#include "error.hpp"
#include "tensor_args.hpp"

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
