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

void Profiler::continue_generation(size_t more) {
    step_ = -1;
    if (enabled_) events_.reserve(events_.size() + more);
}

void Profiler::record(int kind, int step, int block, int stage, int level, TimePoint start, TimePoint end) {
    events_.push_back(ProfileEvent{kind, step, block, stage, level, ns(start), ns(end), -1});
}

namespace {
// Times one stage call and records it in the stage's stats and the profiler; returns its ms.
template <typename Call>
double timed_stage_call(int stage, std::vector<StageStats>& stats, Profiler& profiler, Call&& call) {
    const auto start = Clock::now();
    call();
    const auto end = Clock::now();
    profiler.stage(stage, start, end);
    const double ms = ms_between(start, end);
    stats[stage].calls += 1;
    stats[stage].ms += ms;
    return ms;
}
}  // namespace

double run_stage(const Engine& engine, int stage, const OrtValue* const* inputs, OrtValue* const* outputs, std::vector<StageStats>& stats,
                 Profiler& profiler) {
    return timed_stage_call(stage, stats, profiler, [&] { engine.stages()[stage]->run(inputs, outputs); });
}

double run_stage(StageBinding& binding, int stage, std::vector<StageStats>& stats, Profiler& profiler) {
    binding.bind();  // outside the timed call: binding is the runtime's work, not ONNX Runtime's Run
    return timed_stage_call(stage, stats, profiler, [&] { binding.run(); });
}

}  // namespace slim
