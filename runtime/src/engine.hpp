// A loaded bundle: validated manifest, verified files, one compiled backend session per stage.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "manifest.hpp"
#include "ort_backend.hpp"

namespace slim {

struct EngineOptions {
    const char* onnxruntime_library = nullptr;
    bool verify_checksums = true;
    int intra_op_threads = 0;
    int cuda_device = -1;  // >= 0: every stage on ONNX Runtime's CUDA execution provider, this device
};

class Engine {
  public:
    // Throws Error: IO, BUNDLE (manifest, checksum, stage I/O mismatch), BACKEND.
    Engine(const std::string& bundle_dir, const EngineOptions& options);

    const Manifest& manifest() const { return manifest_; }
    const OrtRuntime& ort() const { return *ort_; }
    const std::vector<std::unique_ptr<StageSession>>& stages() const { return stages_; }

    // Indices into stages() of the stages the SD3 program calls; compensate is -1 without MLPs.
    int embed_stage = -1, final_stage = -1, compensate_stage = -1;
    std::vector<int> block_stages;
    // X-Slim token level: block_N_tokens stage per block (-1: none, the block then runs whole), and
    // whether block_N also outputs its image keys/values (img_k, img_v) for the token stage's caches.
    std::vector<int> token_stages;
    std::vector<bool> block_kv;
    bool has_token_stages = false;

  private:
    Manifest manifest_;
    std::shared_ptr<OrtRuntime> ort_;
    std::vector<std::unique_ptr<StageSession>> stages_;
};

}  // namespace slim
