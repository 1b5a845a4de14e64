// X-Slim: the reuse policy (program.xslim in the manifest, or a request's policy JSON) and the
// controller's decisions. export/xslim.py is the reference; docs/xslim.md describes the rules.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "json.hpp"

namespace slim {

enum class Level { Full, Skip, Block, Token };

struct ScheduleStep {
    Level level = Level::Full;
    double sample_ratio = -1;     // < 0: the policy's
    double block_threshold = -1;  // < 0: the policy's
};

struct XSlimPolicy {
    bool enabled = false;
    double early_warning = 0;  // online: skip a step below this accumulated change
    double critical = -1;      // online: refresh below it, full at or above; < 0: no refresh level
    Level refresh = Level::Token;
    double sample_ratio = 0.5, block_threshold = 0.1;
    int first_blocks = 2, warmup_steps = 2;
    std::vector<ScheduleStep> schedule;  // empty: online mode

    // Whether any step may run at `level` (decides which caches a full step records).
    bool uses(Level level) const;
};

// Parses a policy object ({"kind": "xslim", ...} as export/xslim.py writes it) for a plan of `steps`
// steps; null gives a disabled policy. Throws json::FieldError naming the bad field under `where`.
XSlimPolicy parse_policy(const json::Value& value, size_t steps, const std::string& where);

// The X-Slim policy of one request running a plan of `steps` steps: `policy_json` (a request's policy
// object or "null", at most 1 MiB) when given, else a step-only policy from `step_threshold` >= 0 (0:
// off), else the bundle's `bundle_policy`. Throws Error(SLIM_ERR_INVALID_ARGUMENT) naming the fault:
// bad JSON or fields, a schedule whose length is not `steps`, the token level without token stages.
XSlimPolicy resolve_policy(const XSlimPolicy& bundle_policy, const char* policy_json, float step_threshold, size_t steps,
                           bool has_token_stages);

// The running decisions of one generation (xslim.Controller).
class Controller {
  public:
    Controller(const XSlimPolicy& policy, size_t steps) : policy_(policy), steps_(steps) {}
    Level level(size_t step, bool records_delta);
    // `change`: relative L1 change of the stack residual against the previous full step's, < 0 if none.
    void full_step_done(size_t step, double change);
    double ratio(size_t step) const;
    double block_threshold(size_t step) const;
    int full_steps() const { return full_steps_; }

  private:
    const XSlimPolicy& policy_;
    size_t steps_;
    bool have_rate_ = false;
    double rate_ = 0, accumulated_ = 0;
    size_t last_full_ = 0;
    int full_steps_ = 0;
};

// sum |a - b| / sum |b| (the kernels' L1 change, summed in double); infinity when b is all zero.
double relative_change(const float* a, const float* b, size_t n);

// Blocks a block-level step skips (into `skip`, one per score), from the scores of the last full step
// (NaN: not recorded).
void skippable_blocks(const std::vector<double>& scores, double threshold, int first_blocks, std::vector<bool>& skip);

// Multiply-adds of one joint block recomputing `computed` of `tokens` image tokens (reference_sampler.block_flops).
double block_flops(int64_t tokens, int64_t computed, int64_t text, int64_t dim);

}  // namespace slim
