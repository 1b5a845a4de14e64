#include "stage_call.hpp"

#include <cstring>
#include <string>
#include <vector>

#include "error.hpp"
#include "tensor_args.hpp"

namespace slim {

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
