// One ONNX Runtime session per stage graph (Stage) and its Run calls.
#pragma once

#include <string>
#include <vector>

#include "ort_runtime.hpp"

namespace slim {

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

}  // namespace slim
