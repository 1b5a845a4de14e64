// A loaded bundle: validated manifest, verified files, one compiled backend session per stage.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "bundle.hpp"
#include "manifest.hpp"
#include "stage.hpp"
#include "tokenizer.hpp"

namespace slim {

struct EngineOptions {
    const char* onnxruntime_library = nullptr;
    Verify verify = Verify::Fast;  // how much of the bundle to check (slim_verify)
    int intra_op_threads = 0;
    int cuda_device = -1;       // >= 0: every stage on ONNX Runtime's CUDA execution provider, this device
    bool host_buffers = false;  // a CUDA engine's sessions keep their buffers in host memory (slim_engine_params.host_buffers)
};

// Calls and backend time of one stage in a session's last program run.
struct StageStats {
    int calls = 0;
    double ms = 0;
};

class Engine {
  public:
    // `path` is a bundle directory, or a plain .onnx file (a one-stage engine, family PlainOnnx).
    // Throws Error: IO, BUNDLE (manifest, digest, files, checksum, stage I/O mismatch), BACKEND.
    Engine(const std::string& path, const EngineOptions& options);

    const Manifest& manifest() const { return manifest_; }
    const OrtRuntime& ort() const { return *ort_; }
    const std::vector<std::unique_ptr<Stage>>& stages() const { return stages_; }
    bool host_buffers() const { return host_buffers_; }
    // The bundle's prompt tokenizers (none for most bundles); loaded on first use.
    const Tokenizers& tokenizers() const { return *tokenizers_; }

    // Index of the stage called `name`, or -1.
    int stage_index(const std::string& name) const;
    // The stages' names, in stages() order.
    std::vector<std::string> stage_names() const;
    // The joint block each stage computes (its manifest `block`; -1 for a stage of no block), in stages() order.
    std::vector<int> stage_blocks() const;

  private:
    Manifest manifest_;
    std::shared_ptr<OrtRuntime> ort_;
    std::vector<std::unique_ptr<Stage>> stages_;
    std::unique_ptr<Tokenizers> tokenizers_;
    bool host_buffers_ = false;
};

}  // namespace slim
