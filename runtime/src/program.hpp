// A session's runner: what runs the programs of its engine's family (Sd3Runner: generate; LemurRunner: embed,
// score), behind one interface for what every runner keeps: per-stage stats and profiling events of its last
// call. A plain ONNX engine has no runner (slim_stage_run only). ("Session" is the C handle alone.)
#pragma once

#include <memory>
#include <vector>

#include "engine.hpp"
#include "profiler.hpp"

namespace slim {

class Runner {
  public:
    virtual ~Runner() = default;
    Runner(const Runner&) = delete;
    Runner& operator=(const Runner&) = delete;

    // Calls and backend time per engine stage in the last call (generate, embed or score).
    const std::vector<StageStats>& stage_stats() const { return stages_; }
    // Events of the last call when profiling is on.
    Profiler& profiler() { return profiler_; }
    const Profiler& profiler() const { return profiler_; }

  protected:
    explicit Runner(const Engine& engine) : stages_(engine.stages().size()), profiler_(engine.stage_blocks()) {}

    std::vector<StageStats> stages_;
    Profiler profiler_;
};

// The runner of `engine`'s family; nullptr for a plain ONNX engine.
std::unique_ptr<Runner> make_runner(const Engine& engine);

// What opening an engine checks of its family's programs: that they can bind the manifest's stages by role
// (bind_sd3_stages, bind_lemur_stages); Error(SLIM_ERR_BUNDLE) otherwise.
void check_program_stages(const Manifest& manifest);

}  // namespace slim
