// The SD3 sampling program (flow-matching Euler, CFG, 1.x cached steps) run over an engine's stages.
// A session owns every buffer and cache of a generation; the engine's stages are pure functions.
#pragma once

#include <cstdint>
#include <vector>

#include "engine.hpp"
#include "profiler.hpp"
#include "slimengine.h"
#include "xslim.hpp"

namespace slim {

// Inputs already validated at the C boundary: shapes agree with the manifest, data is finite.
struct GenerateRequest {
    int batch = 0, text_len = 0, height = 0, width = 0;  // latent height/width
    const float* prompt = nullptr;                       // [B, L, joint_attention_dim]
    const float* pooled = nullptr;                       // [B, pooled_projection_dim]
    const float* negative_prompt = nullptr;              // used when guidance > 1
    const float* negative_pooled = nullptr;
    const float* latents = nullptr;  // [B, C, H, W] or nullptr for seeded noise
    uint64_t seed = 0;
    float guidance_scale = 1.0f;
    const XSlimPolicy* cache = nullptr;  // X-Slim policy (validated for this program); nullptr or disabled: off
    const Program* program = nullptr;    // a plan replacing the bundle's (sampling_plan.hpp); nullptr: the bundle's
    float* out = nullptr;                // [B, C, H, W]
};

struct GenerateStats {
    int steps = 0, blocks_run = 0, stage_calls = 0;
    double effective_nfe = 0, flop_fraction = 0, total_ms = 0, backend_ms = 0;
};

struct StepStats {
    double sigma = 0, sigma_next = 0, ms = 0;
    int blocks_run = 0;          // blocks evaluated, on all or on a subset of the image tokens
    int blocks_reused = 0;       // X-Slim block level: blocks that added their cached residual
    int tokens_computed = 0;     // image tokens each evaluated block computed (all of them unless a token step)
    double flop_fraction = 0;    // of a step running every block on every token
    int level = SLIM_STEP_FULL;  // slim_step_level
};

class Sd3Session {
  public:
    explicit Sd3Session(const Engine& engine);

    // Throws Error(SLIM_ERR_BACKEND) if a stage fails, Error(SLIM_ERR_NUMERICS) on a non-finite step.
    GenerateStats generate(const GenerateRequest& request);

    const std::vector<StepStats>& step_stats() const { return steps_; }
    const std::vector<StageStats>& stage_stats() const { return stages_; }
    Profiler& profiler() { return profiler_; }
    const Profiler& profiler() const { return profiler_; }

  private:
    void run(int stage, std::initializer_list<const OrtValue*> inputs, std::initializer_list<OrtValue*> outputs);

    const Engine& engine_;
    std::vector<StepStats> steps_;
    std::vector<StageStats> stages_;
    double backend_ms_ = 0;
    int stage_calls_ = 0;
    Profiler profiler_;

    // Buffers, grown on demand and reused across generate calls.
    std::vector<float> x_, model_in_, timestep_, pooled_, text_, temb_, velocity_;
    std::vector<float> img_[2], txt_[2];
    std::vector<float> before_img_, before_txt_, delta_img_, delta_txt_, comp_img_, comp_txt_;
    // X-Slim: stack input and the stack residuals of the last two full steps; per block, recorded at
    // full steps: image/text residuals, scores, image keys/values; token selection.
    std::vector<float> stack_in_, residual_last_, residual_prev_;
    std::vector<std::vector<float>> block_res_img_, block_res_txt_, block_k_, block_v_;
    std::vector<double> block_scores_;
    std::vector<float> kv_scratch_[2], token_scores_;
    std::vector<int64_t> token_index_;
};

}  // namespace slim
