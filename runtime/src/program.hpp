// What a session runs: the program of its engine's family (Sd3Session: generate; LemurSession: embed,
// score), behind one interface for what every program keeps: per-stage stats and profiling events of
// its last call. A plain ONNX engine has no program (slim_stage_run only).
#pragma once

#include <memory>
#include <vector>

#include "engine.hpp"
#include "profiler.hpp"

namespace slim {

class ProgramSession {
  public:
    virtual ~ProgramSession() = default;
    ProgramSession(const ProgramSession&) = delete;
    ProgramSession& operator=(const ProgramSession&) = delete;

    // Calls and backend time per engine stage in the last call (generate, embed or score).
    const std::vector<StageStats>& stage_stats() const { return stages_; }
    // Events of the last call when profiling is on.
    Profiler& profiler() { return profiler_; }
    const Profiler& profiler() const { return profiler_; }

  protected:
    explicit ProgramSession(const Engine& engine) : stages_(engine.stages().size()), profiler_(engine.stage_blocks()) {}

    std::vector<StageStats> stages_;
    Profiler profiler_;
};

// The program of `engine`'s family; nullptr for a plain ONNX engine.
std::unique_ptr<ProgramSession> make_program(const Engine& engine);

}  // namespace slim
