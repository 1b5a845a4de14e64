// slim_generate's and slim_generate_prompt's requests, checked against the bundle: the caller's arguments as the C
// boundary passes them on become the requests the runner runs (sd3_program.hpp, prompt_program.hpp). What the two
// share (guidance, the program, its X-Slim policy, the noise seeds) is resolved by one set of rules and defaults.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "manifest.hpp"
#include "prompt_program.hpp"
#include "sd3_program.hpp"
#include "slimengine.h"
#include "xslim.hpp"

namespace slim {

// As the caller gave them (slim_generate_params' and slim_prompt_params' fields of the same names).
struct Sd3Settings {
    float guidance_scale = -1.0f;        // < 0: the bundle's
    const char* xslim_policy = nullptr;  // JSON, "null", or nullptr: xslim_threshold, then the bundle's
    float xslim_threshold = -1.0f;       // < 0: the bundle's policy; 0: off
    int32_t num_steps = 0;               // > 0: a plain plan of that many steps; 0: the bundle's program
    float shift = 0.0f;                  // that plan's shift; 0: the pipeline's scheduler shift, else 3.0
    const uint64_t* seeds = nullptr;     // one per row, or nullptr: seed + row
    uint64_t seed = 0;
};

struct Sd3Resolved {
    std::optional<Program> plain;  // the plain plan when num_steps > 0
    const Program* bundle = nullptr;
    XSlimPolicy xslim;
    float guidance = 1.0f;
    std::vector<uint64_t> seeds;  // one per row

    const Program& program() const { return plain ? *plain : *bundle; }
    bool cfg() const { return guidance > 1.0f; }
};

// For a batch of `batch` rows on `runner`'s engine. Throws Error(SLIM_ERR_INVALID_ARGUMENT) naming the field at fault.
Sd3Resolved resolve_sd3(const Sd3Runner& runner, const Sd3Settings& settings, int64_t batch);

// slim_generate's arguments: the caller's tensors (slim_generate_params' and latents_out).
struct GenerateArgs {
    const slim_tensor *prompt_embeds = nullptr, *pooled_embeds = nullptr, *negative_prompt_embeds = nullptr,
                      *negative_pooled_embeds = nullptr, *latents = nullptr, *out = nullptr;
    Sd3Settings settings;
    Progress progress;
};

// A checked slim_generate call. Throws Error (INVALID_ARGUMENT, SHAPE, DTYPE, NUMERICS) naming the argument at fault.
class GenerateCall {
  public:
    GenerateCall(const Sd3Runner& runner, const GenerateArgs& args);
    GenerateCall(const GenerateCall&) = delete;
    GenerateCall& operator=(const GenerateCall&) = delete;
    const GenerateRequest& request() const { return request_; }  // it points into this call's resolved settings

  private:
    Sd3Resolved plan_;
    GenerateRequest request_;
};

// slim_generate_prompt's arguments (slim_prompt_params' and the output buffers).
struct PromptArgs {
    const char* const* prompts = nullptr;
    int32_t prompt_count = 0;
    const char* const* negative_prompts = nullptr;
    int32_t height = 0, width = 0;  // image pixels; 0: the bundle's default
    const slim_tensor* latents = nullptr;
    Sd3Settings settings;
    Progress progress;
    uint8_t* image_out = nullptr;
    size_t image_capacity = 0;
    float* latents_out = nullptr;
    size_t latents_capacity = 0;
};

// A checked slim_generate_prompt call. Throws Error (INVALID_ARGUMENT, SHAPE, DTYPE, NUMERICS) naming the argument.
class PromptCall {
  public:
    PromptCall(const Sd3Runner& runner, const PromptArgs& args);
    PromptCall(const PromptCall&) = delete;
    PromptCall& operator=(const PromptCall&) = delete;
    const PromptRequest& request() const { return request_; }

  private:
    Sd3Resolved plan_;
    PromptRequest request_;
};

}  // namespace slim
