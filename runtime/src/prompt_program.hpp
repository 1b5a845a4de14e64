// Prompt to image (slim_generate_prompt; docs/pipeline.md): the bundle's tokenizers and text encoders make
// SD3's conditioning, the SD3 program samples, the VAE decodes, and the result becomes RGB8 as diffusers'
// postprocess makes it. The same arithmetic, in the same order and precision, as the Python binding's
// Session.generate(prompt=...), so both give the same pixels.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine.hpp"
#include "sd3_program.hpp"

namespace slim {

// Checked at the C boundary but for what needs the pipeline: prompts are NUL-free strings; height and
// width are image pixels, already validated against the pipeline and the model.
struct PromptRequest {
    std::vector<std::string> prompts;    // B
    std::vector<std::string> negatives;  // B, used when guidance > 1
    uint64_t seed = 0;
    int height = 0, width = 0;           // image pixels
    float guidance_scale = 1.0f;         // resolved
    const XSlimPolicy* cache = nullptr;  // as GenerateRequest
    const Program* program = nullptr;
    const float* latents = nullptr;  // [B, C, h, w] initial noise, or nullptr for seeded
    uint8_t* image = nullptr;        // [B, height, width, 3]
    float* latents_out = nullptr;    // [B, C, h, w] or nullptr
};

struct PromptStats {
    GenerateStats generate;
    int encoder_calls = 0;
    double total_ms = 0, tokenize_ms = 0, clip_l_ms = 0, clip_g_ms = 0, t5_ms = 0, vae_decode_ms = 0;
};

// The reason `engine` cannot run prompts ("" when it can): no pipeline block, or a tokenizer missing.
std::string prompt_support(const Engine& engine);

// Throws Error as the stages and Sd3Session::generate do; INVALID_ARGUMENT for a prompt that is not UTF-8.
PromptStats generate_prompt(const Engine& engine, Sd3Session& session, const PromptRequest& request);

// VAE output float32 [B, 3, H, W] -> uint8 [B, H, W, 3]: round-half-even(clamp(x * 0.5 + 0.5, 0, 1) * 255) in
// float32, as diffusers' VaeImageProcessor.postprocess then numpy_to_pil (and numpy's round).
void to_rgb8(const float* image, int batch, int height, int width, uint8_t* out);

}  // namespace slim
