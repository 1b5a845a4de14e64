// The step planner: a step's 1.x plan and the X-Slim controller's level, turned into one action per
// joint block. It decides nothing itself (the Controller and skippable_blocks in xslim.cpp do) and
// touches no buffer or backend: the executor in sd3_program.cpp runs its actions.
// export/reference_sampler.py's plan_step is the same planner in PyTorch's reference sampler.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "manifest.hpp"
#include "slimengine.h"
#include "xslim.hpp"

namespace slim {

// What a step does with one joint block (the C ABI's slim_block_action).
enum class BlockAction : int32_t {
    Run = SLIM_BLOCK_RUN,                // the block stage on every token
    RunKeepKV = SLIM_BLOCK_RUN_KEEP_KV,  // the same, keeping its image keys/values and residual for token steps
    RunTokens = SLIM_BLOCK_RUN_TOKENS,   // X-Slim token level: the block's token stage on the selected tokens
    Reuse = SLIM_BLOCK_REUSE,            // X-Slim block level: its residual from the last full step added
    Skip = SLIM_BLOCK_SKIP,              // nothing: inside the 1.x skipped range, or the whole stack reused
    AddDelta = SLIM_BLOCK_ADD_DELTA,     // the 1.x skipped range's last block: the compensated delta added
};

// Which stages each joint block has (read once from the engine, sd3_program.cpp).
struct BlockStages {
    std::vector<bool> has_tokens;  // a block_N_tokens stage (X-Slim token level)
    std::vector<bool> outputs_kv;  // block_N also outputs its image keys/values
};

// One step's plan for the executor.
struct StepActions {
    Level level = Level::Full;   // the controller's
    int64_t keep = 0;            // image tokens each block computes (all of them unless a token step)
    bool reuse_stack = false;    // skip level: the last stack residual added to the stack's input, no block run
    bool record_stack = false;   // X-Slim full step: the stack's input kept, its residual recorded (record_for_reuse)
    bool record_blocks = false;  // ... and each run block's residual and change score (block and token levels)
    int range_first = -1;        // 1.x recording step: the input of this block is kept, and after
    int range_last = -1;         // ... this block Δ = its output - that input
    std::vector<BlockAction> blocks;
    int blocks_run = 0, blocks_reused = 0;
};

class StepPlanner {
  public:
    // For one request: its program and X-Slim policy (both outlive the planner's use), the blocks' stages,
    // and the image tokens N. Sizes everything plan() writes.
    void reset(const Program& program, const XSlimPolicy& policy, const BlockStages& stages, int64_t tokens);

    // The actions of `step` at `level` (the controller's decision for it); `scores` are the X-Slim block
    // change scores of the last full step (block level). Allocates nothing.
    const StepActions& plan(size_t step, Level level, const Controller& controller, const std::vector<double>& scores);

  private:
    const Program* program_ = nullptr;
    const XSlimPolicy* policy_ = nullptr;
    const BlockStages* stages_ = nullptr;
    int64_t tokens_ = 0;
    std::vector<bool> reuse_;  // block level: skippable_blocks' answer
    StepActions actions_;
};

}  // namespace slim
