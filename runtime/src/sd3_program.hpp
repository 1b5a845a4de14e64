// The SD3 sampling program (flow-matching Euler, CFG, 1.x cached steps) run over an engine's stages.
// A session owns every buffer and cache of a generation; the engine's stages are pure functions.
#pragma once

#include <cstdint>
#include <vector>

#include "engine.hpp"
#include "slimengine.h"

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
    double step_cache_threshold = 0;  // X-Slim step-level line; 0: off
    int step_cache_warmup = 2;
    float* out = nullptr;  // [B, C, H, W]
};

struct GenerateStats {
    int steps = 0, blocks_run = 0, stage_calls = 0;
    double effective_nfe = 0, total_ms = 0, backend_ms = 0;
};

struct StepStats {
    double sigma = 0, sigma_next = 0, ms = 0;
    int blocks_run = 0;
    int level = SLIM_STEP_FULL;  // slim_step_level
};

class Sd3Session {
  public:
    explicit Sd3Session(const Engine& engine);

    // Throws Error(SLIM_ERR_BACKEND) if a stage fails, Error(SLIM_ERR_NUMERICS) on a non-finite step.
    GenerateStats generate(const GenerateRequest& request);

    const std::vector<StepStats>& step_stats() const { return steps_; }
    const std::vector<StageStats>& stage_stats() const { return stages_; }

  private:
    void run(int stage, std::initializer_list<const OrtValue*> inputs, std::initializer_list<OrtValue*> outputs);

    const Engine& engine_;
    std::vector<StepStats> steps_;
    std::vector<StageStats> stages_;
    double backend_ms_ = 0;
    int stage_calls_ = 0;

    // Buffers, grown on demand and reused across generate calls.
    std::vector<float> x_, model_in_, timestep_, pooled_, text_, temb_, velocity_;
    std::vector<float> img_[2], txt_[2];
    std::vector<float> before_img_, before_txt_, delta_img_, delta_txt_, comp_img_, comp_txt_;
    std::vector<float> stack_in_, residual_, new_residual_;  // X-Slim step level
};

}  // namespace slim
