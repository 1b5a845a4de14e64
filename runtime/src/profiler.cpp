#include "profiler.hpp"

#include <utility>

namespace slim {
namespace {

int64_t ns(Profiler::TimePoint t) { return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count(); }

}  // namespace

Profiler::Profiler(std::vector<int> block_of_stage) : block_of_stage_(std::move(block_of_stage)) {}

void Profiler::begin_generation(size_t capacity) {
    events_.clear();
    step_ = -1;
    if (enabled_) events_.reserve(capacity);
}

void Profiler::record(int kind, int step, int block, int stage, int level, TimePoint start, TimePoint end) {
    events_.push_back(ProfileEvent{kind, step, block, stage, level, ns(start), ns(end), -1});
}

double run_stage(const Engine& engine, int stage, const OrtValue* const* inputs, OrtValue* const* outputs, std::vector<StageStats>& stats,
                 Profiler& profiler) {
    const auto start = Clock::now();
    engine.stages()[stage]->run(inputs, outputs);
    const auto end = Clock::now();
    profiler.stage(stage, start, end);
    const double ms = ms_between(start, end);
    stats[stage].calls += 1;
    stats[stage].ms += ms;
    return ms;
}

double run_stage(StageBinding& binding, int stage, std::vector<StageStats>& stats, Profiler& profiler) {
    binding.bind();  // outside the timed call: binding is the runtime's work, not ONNX Runtime's Run
    const auto start = Clock::now();
    binding.run();
    const auto end = Clock::now();
    profiler.stage(stage, start, end);
    const double ms = ms_between(start, end);
    stats[stage].calls += 1;
    stats[stage].ms += ms;
    return ms;
}

}  // namespace slim
