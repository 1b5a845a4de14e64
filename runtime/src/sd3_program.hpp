// The SD3 sampling program (flow-matching Euler, CFG, 1.x range-skipping steps, X-Slim reuse) run over an
// engine's stages by Sd3Runner, which owns every buffer of a generation (sd3_buffers.hpp); the
// engine's stages are pure functions. docs/runtime-loop.md walks through the loop.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "device_ops.hpp"
#include "engine.hpp"
#include "error.hpp"
#include "profiler.hpp"
#include "program.hpp"
#include "sd3_buffers.hpp"
#include "sd3_stages.hpp"
#include "slimengine.h"
#include "step_planner.hpp"
#include "xslim.hpp"

namespace slim {

// The caller's progress callback (slim_progress; may be empty): report() throws Error(SLIM_ERR_CANCELLED) when
// it returns non-zero, so a cancelled call unwinds like a failed one and writes nothing more.
struct Progress {
    slim_progress fn = nullptr;
    void* user = nullptr;
    void report(int phase, int step, int total) const {
        if (fn && fn(user, phase, step, total) != 0)
            throw Error(SLIM_ERR_CANCELLED, "cancelled by the progress callback (phase " + std::to_string(phase) + ", step " +
                                                std::to_string(step) + " of " + std::to_string(total) + ")");
    }
};

// Conditioning already in the runner's buffers (the prompt program's encoded texts), one pointer per model-batch row:
// the negative rows then the positive ones under CFG. Copied on the device, never through the host.
struct ConditioningRows {
    std::vector<const float*> text;    // rows of [L, joint_attention_dim]
    std::vector<const float*> pooled;  // rows of [pooled_projection_dim]
};

// Inputs already validated at the C boundary: shapes agree with the manifest, data is finite.
struct GenerateRequest {
    int batch = 0, text_len = 0, height = 0, width = 0;  // latent height/width
    const float* prompt = nullptr;                       // [B, L, joint_attention_dim] caller memory
    const float* pooled = nullptr;                       // [B, pooled_projection_dim]
    const float* negative_prompt = nullptr;              // used when guidance > 1
    const float* negative_pooled = nullptr;
    const ConditioningRows* rows = nullptr;  // instead of the four above: conditioning in the runner's buffers
    const float* latents = nullptr;          // [B, C, H, W] or nullptr for seeded noise
    const uint64_t* seeds = nullptr;         // B seeds (row b's noise), used when latents is nullptr
    float guidance_scale = 1.0f;
    const XSlimPolicy* xslim = nullptr;  // X-Slim policy (validated for this program); nullptr or disabled: off
    const Program* program = nullptr;    // a plan replacing the bundle's (sampling_plan.hpp); nullptr: the bundle's
    float* out = nullptr;                // [B, C, H, W] caller memory; nullptr: left in the runner's buffers (latents())
    Progress progress;                   // told after each step
    bool continue_call = false;          // part of a larger call (slim_generate_prompt) that began the profiler's record
                                         // and the transfer count: both are kept
};

struct GenerateStats {
    int steps = 0, blocks_run = 0, stage_calls = 0;
    double effective_nfe = 0, flop_fraction = 0, total_ms = 0, backend_ms = 0;
    uint64_t transfer_bytes = 0;  // caller memory <-> the session's buffers: the request's tensors and the result (the
                                  // whole call's with continue_call)
};

struct StepStats {
    double sigma = 0, sigma_next = 0, ms = 0;
    int blocks_run = 0;          // blocks evaluated, on all or on a subset of the image tokens
    int blocks_reused = 0;       // X-Slim block level: blocks that added their cached residual
    int tokens_computed = 0;     // image tokens each evaluated block computed (all of them unless a token step)
    double flop_fraction = 0;    // of a step running every block on every token
    int level = SLIM_STEP_FULL;  // slim_step_level
};

class Sd3Runner final : public Runner {
  public:
    explicit Sd3Runner(const Engine& engine);

    // Throws Error(SLIM_ERR_BACKEND) if a stage fails, Error(SLIM_ERR_NUMERICS) on a non-finite step.
    GenerateStats generate(const GenerateRequest& request);

    const std::vector<StepStats>& step_stats() const { return steps_; }
    const Sd3Stages& stages() const { return stage_of_; }
    const Engine& engine() const { return engine_; }
    // What the prompt program shares: the ops and memory of this runner's buffers, and the last generation's latents
    // ([B, C, H, W] on the device, until the next generation).
    DeviceOps& ops() { return *ops_; }
    const DeviceAllocator& allocator() const { return allocator_; }
    const float* latents() const { return buffers_.in.latents.f32(); }

  private:
    // Which buffers hold the stack's current image and text hidden states.
    struct Hidden {
        DeviceBuffer* img = nullptr;
        DeviceBuffer* txt = nullptr;
    };

    // The loop's parts, in the order generate calls them.
    void prepare(const GenerateRequest& request, Clock::time_point start);
    Hidden execute(size_t step, const StepActions& actions);
    void record_for_reuse(size_t step, const StepActions& actions, Hidden out, Controller& controller);
    void euler_cfg(size_t step);
    void end_step(size_t step, const StepActions& actions, Clock::time_point start);  // stats; adds the step's FLOPs to flops_
    GenerateStats totals() const;

    // The executor's pieces.
    Hidden embed(size_t step, const StepActions& actions);
    Hidden run_block(int block, const StepActions& actions, Hidden h);
    Hidden run_tokens(int block, const StepActions& actions, Hidden h);
    Hidden add_delta(Hidden h);
    Hidden output_for(int next_block, const StepActions& actions, Hidden h);
    DeviceBuffer* writable(DeviceBuffer* img);
    const OrtValue* caller_view(CallerView& view, const float* data, const std::vector<int64_t>& shape);
    void run(int stage);

    const Engine& engine_;
    const Sd3Stages stage_of_;
    std::unique_ptr<DeviceOps> ops_;
    const bool host_;  // ops_->on_host()
    DeviceAllocator allocator_;
    std::vector<StageBinding> bindings_;  // one per engine stage
    Sd3Buffers buffers_;
    StepPlanner planner_;

    // The request being run.
    const Program* program_ = nullptr;
    const XSlimPolicy* policy_ = nullptr;
    RequestDims dims_;
    float guidance_ = 1.0f;
    double flops_ = 0;
    const DeviceBuffer* range_input_img_ = nullptr;  // where the recording step kept the skipped range's image input

    std::vector<StepStats> steps_;
    double backend_ms_ = 0;
    int stage_calls_ = 0;
};

}  // namespace slim
