// Event recording for profiling: one timed event per stage call, per step, per generation and its prepare phase
// (SD3), and per embed/score call, its stage call and its memory-bank work (LEMUR, where a "generation"
// event is the whole call). Off by default, and then it costs one branch per record site and reads no
// clock: the times it records are the clock reads the program makes for its stats anyway (the end of the
// prepare phase is read only when profiling). On, each call preallocates its buffer before its work.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "device_memory.hpp"
#include "engine.hpp"
#include "slimengine.h"

namespace slim {

// The C ABI's slim_event without its struct_size; the same fields, the same meanings.
struct ProfileEvent {
    int kind;                  // slim_event_kind
    int step;                  // step index, -1 for the generation and prepare events (and every LEMUR event)
    int block;                 // stage events: the joint block the stage computes (its manifest `block`); block events: the block; else -1
    int stage;                 // stage events: index into the engine's stages; block events: the stage called or -1; else -1
    int level;                 // step events: slim_step_level; block events: slim_block_action; else -1
    int64_t start_ns, end_ns;  // host steady clock (CLOCK_MONOTONIC on Linux)
    int64_t device_ns;         // device time from CUDA events; -1 when not measured
};

class Profiler {
  public:
    using TimePoint = std::chrono::steady_clock::time_point;

    // `block_of_stage`: the joint block each of the engine's stages computes, -1 for none (Engine::stage_blocks).
    explicit Profiler(std::vector<int> block_of_stage);

    void set_enabled(bool enabled) { enabled_ = enabled; }
    bool enabled() const { return enabled_; }
    // Also one event per joint block per step (its action; SLIM_PROFILE_BLOCKS), when enabled.
    void set_blocks(bool blocks) { blocks_ = blocks; }
    bool blocks() const { return enabled_ && blocks_; }

    // Starts a generation's (or LEMUR call's) record: clears the last one; when enabled, reserves `capacity` events so
    // the step loop does not allocate (a program making more calls than that grows the buffer).
    void begin_generation(size_t capacity);
    // A generation inside a call that began the record (slim_generate_prompt): keeps its events, reserves `more`.
    void continue_generation(size_t more);
    // The generation's inputs, noise and buffers are ready (from `start` to now): its prepare event.
    void prepared(TimePoint start) {
        if (enabled_) record(SLIM_EVENT_PREPARE, -1, -1, -1, -1, start, std::chrono::steady_clock::now());
    }
    // The step the following stage calls belong to (-1: outside any step).
    void set_step(int step) { step_ = step; }

    void stage(int stage, TimePoint start, TimePoint end) {
        if (enabled_) record(SLIM_EVENT_STAGE, step_, block_of_stage_[stage], stage, -1, start, end);
    }
    // One joint block's action (slim_block_action) in the current step; `stage` the stage it called, or -1.
    void block(int block, int stage, int action, TimePoint start, TimePoint end) {
        if (blocks()) record(SLIM_EVENT_BLOCK, step_, block, stage, action, start, end);
    }
    void step(int level, TimePoint start, TimePoint end) {
        if (enabled_) record(SLIM_EVENT_STEP, step_, -1, -1, level, start, end);
        step_ = -1;
    }
    // LEMUR: the memory-bank work of an embed (upsert) or score (history assembly) call.
    void bank(TimePoint start, TimePoint end) {
        if (enabled_) record(SLIM_EVENT_BANK, -1, -1, -1, -1, start, end);
    }
    void generation(TimePoint start, TimePoint end) {
        if (enabled_) record(SLIM_EVENT_GENERATION, -1, -1, -1, -1, start, end);
    }
    // Prompt to image: a tokenizer call, an encoder stage call (outside the steps), the decode phase, the whole call.
    void tokenize(TimePoint start, TimePoint end) {
        if (enabled_) record(SLIM_EVENT_TOKENIZE, -1, -1, -1, -1, start, end);
    }
    void decode(TimePoint start, TimePoint end) {
        if (enabled_) record(SLIM_EVENT_DECODE, -1, -1, -1, -1, start, end);
    }
    void image(TimePoint start, TimePoint end) {
        if (enabled_) record(SLIM_EVENT_IMAGE, -1, -1, -1, -1, start, end);
    }

    // The last call's events, in the order they ended (SD3: prepare; stages, then their step; the generation
    // last. LEMUR: the stage and bank events in the order they ran; the call last).
    const std::vector<ProfileEvent>& events() const { return events_; }

  private:
    void record(int kind, int step, int block, int stage, int level, TimePoint start, TimePoint end);

    bool enabled_ = false, blocks_ = false;
    int step_ = -1;
    std::vector<int> block_of_stage_;
    std::vector<ProfileEvent> events_;
};

using Clock = std::chrono::steady_clock;

inline double ms_between(Clock::time_point start, Clock::time_point end) {
    return std::chrono::duration<double, std::milli>(end - start).count();
}

// One timed backend call of `engine`'s stage `stage`: its time is added to stats[stage] and recorded
// in `profiler`. Returns the milliseconds it took.
double run_stage(const Engine& engine, int stage, const OrtValue* const* inputs, OrtValue* const* outputs, std::vector<StageStats>& stats,
                 Profiler& profiler);
// The same for a call through `binding` (IO binding: outputs written in place); its bind calls are not timed.
double run_stage(StageBinding& binding, int stage, std::vector<StageStats>& stats, Profiler& profiler);

}  // namespace slim
