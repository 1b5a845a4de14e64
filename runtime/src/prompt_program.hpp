// Prompt to image (slim_generate_prompt; docs/pipeline.md): the bundle's tokenizers and text encoders make
// SD3's conditioning, the SD3 program samples, the VAE decodes, and the result becomes RGB8 as diffusers'
// postprocess makes it. The same arithmetic, in the same order and precision, as the Python binding's
// Session.generate(prompt=...), so both give the same pixels.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "engine.hpp"
#include "sd3_program.hpp"

namespace slim {

// One prompt text's conditioning, batch 1, as diffusers' encode_prompt assembles it, in the runner's buffers (device
// memory on CUDA): it reaches the sampler without crossing to the host.
struct Encoded {
    DeviceBuffer embeds;  // [1, clip_length + max_sequence_length, joint_attention_dim]
    DeviceBuffer pooled;  // [1, pooled_projection_dim]: CLIP-L's pooled output, then CLIP-G's
};

// A session's least-recently-used cache of encoded prompt texts (slim_session_set_prompt_cache). Entries are
// shared, so one evicted while a call still uses it stays alive for that call.
class PromptCache {
  public:
    int capacity() const { return capacity_; }
    int size() const { return static_cast<int>(order_.size()); }
    // Drops the least recently used entries beyond `capacity` (0: all, and nothing is kept after).
    void set_capacity(int capacity);
    void clear();
    // The entry of `text`, made the most recently used; nullptr when absent.
    std::shared_ptr<const Encoded> find(const std::string& text);
    // Keeps `entry` as the most recently used, evicting the least recently used beyond the capacity.
    void put(const std::string& text, std::shared_ptr<const Encoded> entry);

  private:
    void trim();

    int capacity_ = SLIM_PROMPT_CACHE_DEFAULT;
    std::list<std::pair<std::string, std::shared_ptr<const Encoded>>> order_;  // most recently used first
    std::unordered_map<std::string, decltype(order_)::iterator> index_;
};

// The prompt path's scratch, kept across calls (memory only grows), in the runner's buffers.
struct PromptBuffers {
    DeviceBuffer ids;     // [1, length] int64: one tokenizer's output
    DeviceBuffer hidden;  // [1, clip_length, D]: one CLIP's hidden states, before they take their columns of the conditioning
    DeviceBuffer vae_in;  // [B, C, h, w]: latents / scaling_factor + shift_factor
    DeviceBuffer image;   // [B, 3, H, W]: the VAE's output
    DeviceBuffer rgb;     // [B, H, W, 3] uint8: the image the caller receives
};

// What slim_generate_prompt keeps in a session between calls. Its memory is the session's runner's: it is destroyed
// before the runner.
struct PromptState {
    PromptCache cache;
    PromptBuffers buffers;
};

// Checked at the C boundary but for what needs the pipeline: prompts are NUL-free strings; height and
// width are image pixels, already validated against the pipeline and the model.
struct PromptRequest {
    std::vector<std::string> prompts;    // B
    std::vector<std::string> negatives;  // B, used when guidance > 1
    const uint64_t* seeds = nullptr;     // as GenerateRequest
    int height = 0, width = 0;           // image pixels
    float guidance_scale = 1.0f;         // resolved
    const XSlimPolicy* xslim = nullptr;  // as GenerateRequest
    const Program* program = nullptr;
    const float* latents = nullptr;  // [B, C, h, w] initial noise, or nullptr for seeded
    uint8_t* image = nullptr;        // [B, height, width, 3]
    float* latents_out = nullptr;    // [B, C, h, w] or nullptr
    Progress progress;               // told before encoding, after each step, before decoding; may cancel
};

struct PromptStats {
    GenerateStats generate;
    int encoder_calls = 0;
    int cache_hits = 0, cache_misses = 0;  // per prompt text of the call (see slim_prompt_stats)
    double total_ms = 0, tokenize_ms = 0, clip_l_ms = 0, clip_g_ms = 0, t5_ms = 0, vae_decode_ms = 0;
    uint64_t transfer_bytes = 0;  // the whole call's: token ids in, the image (and latents_out) out
};

// The reason `engine` cannot run prompts ("" when it can): no pipeline block, or a tokenizer missing.
std::string prompt_support(const Engine& engine);

// Throws Error as the stages and Sd3Runner::generate do; INVALID_ARGUMENT for a prompt that is not UTF-8; CANCELLED
// when the progress callback asks (nothing is written to request.image or latents_out then); NUMERICS for a NaN
// pixel (nothing written to request.image). Texts encoded are kept in `state.cache`, and texts found there are not
// encoded. Only token ids (and given latents) go in and the image (and latents_out) comes out: the conditioning and the
// latents stay in the runner's buffers from the encoders to the VAE.
PromptStats generate_prompt(const Engine& engine, Sd3Runner& runner, PromptState& state, const PromptRequest& request);

}  // namespace slim
