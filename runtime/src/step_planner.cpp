#include "step_planner.hpp"

#include "slim_kernels.h"

namespace slim {

void StepPlanner::reset(const Program& program, const XSlimPolicy& policy, const BlockStages& stages, int64_t tokens) {
    program_ = &program;
    policy_ = &policy;
    stages_ = &stages;
    tokens_ = tokens;
    const size_t layers = stages.has_tokens.size();
    actions_.blocks.assign(layers, BlockAction::Run);
    reuse_.assign(layers, false);
}

const StepActions& StepPlanner::plan(size_t step, Level level, const Controller& controller, const std::vector<double>& scores) {
    const Program& program = *program_;
    const StepPlan& plan = program.steps[step];
    const XSlimPolicy& policy = *policy_;
    StepActions& a = actions_;
    const int layers = static_cast<int>(a.blocks.size());
    a.level = level;
    a.keep = level == Level::Token ? kernels::cpu::tokens_for_ratio(controller.ratio(step), tokens_) : tokens_;
    a.reuse_stack = level == Level::Skip;
    a.record_stack = level == Level::Full && policy.enabled;
    a.record_blocks = a.record_stack && (policy.uses(Level::Block) || policy.uses(Level::Token));
    a.range_first = plan.record_delta ? program.skip_first : -1;
    a.range_last = plan.record_delta ? program.skip_last : -1;
    a.blocks_run = a.blocks_reused = 0;
    if (level == Level::Block)
        skippable_blocks(scores, controller.block_threshold(step), policy.first_blocks, reuse_);
    else
        reuse_.assign(reuse_.size(), false);  // same size: no allocation
    const bool keep_kv = a.record_stack && policy.uses(Level::Token);
    for (int b = 0; b < layers; ++b) {
        BlockAction& action = a.blocks[b];
        const bool in_range = program.skip_first >= 0 && b >= program.skip_first && b <= program.skip_last;
        if (a.reuse_stack)
            action = BlockAction::Skip;
        else if (plan.skip_range && in_range)
            action = b == program.skip_last ? BlockAction::AddDelta : BlockAction::Skip;
        else if (reuse_[b])
            action = BlockAction::Reuse;
        else if (level == Level::Token && stages_->has_tokens[b])
            action = BlockAction::RunTokens;
        else if (keep_kv && stages_->has_tokens[b])
            action = BlockAction::RunKeepKV;
        else
            action = BlockAction::Run;
        a.blocks_run += action == BlockAction::Run || action == BlockAction::RunKeepKV || action == BlockAction::RunTokens;
        a.blocks_reused += action == BlockAction::Reuse;
    }
    return a;
}

}  // namespace slim
