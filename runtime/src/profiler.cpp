#include "profiler.hpp"

#include <cctype>

namespace slim {
namespace {

// "block_5" and "block_5_tokens" -> 5; any other name -> -1.
int block_of(const std::string& name) {
    const std::string prefix = "block_";
    if (name.rfind(prefix, 0) != 0) return -1;
    size_t end = prefix.size();
    while (end < name.size() && std::isdigit(static_cast<unsigned char>(name[end]))) ++end;
    if (end == prefix.size() || end - prefix.size() > 6 || (end < name.size() && name[end] != '_')) return -1;
    return std::stoi(name.substr(prefix.size(), end - prefix.size()));
}

int64_t ns(Profiler::TimePoint t) { return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count(); }

}  // namespace

Profiler::Profiler(const std::vector<std::string>& stage_names) {
    for (const std::string& name : stage_names) block_of_stage_.push_back(block_of(name));
}

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
