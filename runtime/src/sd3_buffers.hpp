// The buffers of one SD3 generation, grouped by owner. Each is a DeviceBuffer: memory from the
// engine's device allocator (host memory on the CPU, device memory on CUDA), seen by ONNX Runtime as an
// OrtValue of exactly this request's shape, and bound to the stages with IO binding, so each stage
// writes its outputs in place into the buffer the next one reads. Sd3Buffers::size_for is the one
// place that sizes them for a request; a buffer this request does not use has no OrtValue.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "device_memory.hpp"
#include "manifest.hpp"
#include "step_planner.hpp"
#include "xslim.hpp"

namespace slim {

// The sizes of one request.
struct RequestDims {
    int64_t batch = 0, model_batch = 0;  // B, and 2B under classifier-free guidance ([negative; positive])
    int64_t text = 0;                    // text tokens L
    int64_t height = 0, width = 0;       // latent pixels
    int64_t tokens = 0;                  // image tokens N = (H / patch) (W / patch)
    int64_t latent_count = 0;            // values of one copy of the latents: B C H W
    size_t steps = 0;
    bool cfg = false;
    bool embeddings_in_place = false;  // host buffers and no CFG: the caller's embeddings are bound as they are
};

// A request tensor bound in place (see RequestDims::embeddings_in_place): a view of caller memory,
// remade only when the caller's pointer or shape changes.
struct CallerView {
    const void* data = nullptr;
    std::vector<int64_t> shape;
    TensorView view;
};

// The request and the stages' fixed inputs and outputs.
struct InputBuffers {
    DeviceBuffer latents;                   // [Bm, C, H, W]: the sampler's x in the model batch (under CFG both halves hold it)
    DeviceBuffer text;                      // [Bm, L, joint_attention_dim]: [negative; positive] under CFG
    DeviceBuffer pooled;                    // [Bm, pooled_projection_dim]
    CallerView caller_text, caller_pooled;  // instead of text and pooled when bound in place
    const OrtValue* text_in = nullptr;      // what the embed stage reads: text's OrtValue or caller_text's
    const OrtValue* pooled_in = nullptr;
    DeviceBuffer timestep;  // [Bm]: the step's timestep (filled at each step)
    DeviceBuffer temb;      // [Bm, D]: the embed stage's conditioning, read by every block and the final stage
    DeviceBuffer velocity;  // [Bm, C, H, W]: the final stage's output
};

// The joint blocks' hidden states, ping-pong: a block reads one pair and writes the other.
struct StackBuffers {
    DeviceBuffer img[2];                // [Bm, N, D]
    DeviceBuffer txt[2];                // [Bm, L, caption_projection_dim]
    DeviceBuffer k_scratch, v_scratch;  // [Bm, N, D]: keys/values a block outputs that this step does not keep
};

// 1.x: Δ over the skipped block range, recorded by a step and added (compensated) by later steps.
struct RangeDelta {
    DeviceBuffer delta_img, delta_txt;  // the range's input while a step records; then Δ, computed in place
    DeviceBuffer comp_img, comp_txt;    // MLP compensation: the compensate stage's output, once per recorded Δ
    bool compensated = false;           // comp_* holds the current Δ's compensation
};

// X-Slim: what full steps record for the steps that reuse them (docs/xslim.md).
struct XSlimRecords {
    DeviceBuffer stack_in;                                    // [Bm, N, D]: a full step's stack input, then its residual (in place)
    DeviceBuffer residual_last, residual_prev;                // the stack residuals of the last two full steps
    std::vector<DeviceBuffer> block_res_img;                  // per block: its image residual at the last full step (block/token levels)
    std::vector<DeviceBuffer> block_res_txt;                  // per block but the last: its text residual (block level)
    std::vector<DeviceBuffer> block_k, block_v;               // per block with a token stage: its image keys/values (token level)
    std::vector<double> block_scores;                         // per block: relative change at the last full step (NaN: none); host scalars
    DeviceBuffer token_scores;                                // [Bm, N]: per-token change between the last two full steps
    DeviceBuffer token_index;                                 // [Bm, N] int64: the tokens a token step recomputes, [Bm, keep] at its start
    std::vector<std::pair<int64_t, TensorView>> index_views;  // token_index as [Bm, keep], per keep this request uses
};

class Sd3Buffers {
  public:
    InputBuffers in;
    StackBuffers stack;
    RangeDelta range;
    XSlimRecords xslim;

    // Sizes every buffer for one request: shapes from `config` and `dims`, the caches `program` and
    // `policy` need (token-level keeps from `controller`), per block from `stages`. Returns true when an
    // OrtValue changed (stage bindings must be remade).
    bool size_for(const DeviceAllocator& allocator, const Sd3Config& config, const RequestDims& dims, const Program& program,
                  const XSlimPolicy& policy, const Controller& controller, const BlockStages& stages);

    // The token index as [Bm, keep] (a keep size_for prepared).
    const OrtValue* token_index(int64_t keep) const {
        for (const auto& [k, view] : xslim.index_views)
            if (k == keep) return view.get();
        return nullptr;
    }

  private:
    std::vector<int64_t> keeps_;  // the keeps index_views were made for
    int64_t index_batch_ = 0;
};

}  // namespace slim
