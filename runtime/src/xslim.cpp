#include "xslim.hpp"

#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "error.hpp"
#include "slim_kernels.h"

namespace slim {

using namespace json;

namespace {

[[noreturn]] void bad(const std::string& where, const std::string& what) { throw FieldError(where, what); }

Level parse_level(const Value& v, const std::string& where) {
    if (v.kind == Value::Kind::String) {
        if (v.string == "full") return Level::Full;
        if (v.string == "skip") return Level::Skip;
        if (v.string == "block") return Level::Block;
        if (v.string == "token") return Level::Token;
    }
    bad(where, "must be \"full\", \"skip\", \"block\" or \"token\"");
}

double ratio_value(const Value& v, const std::string& where) {
    double r = as_number(v, where);
    if (!(r > 0 && r <= 1)) bad(where, "must be in (0, 1], got " + std::to_string(r));
    return r;
}

double threshold_value(const Value& v, const std::string& where) {
    double t = as_number(v, where);
    if (t < 0) bad(where, "must not be negative, got " + std::to_string(t));
    return t;
}

}  // namespace

bool XSlimPolicy::uses(Level level) const {
    if (!enabled) return false;
    if (!schedule.empty()) {
        for (const auto& s : schedule)
            if (s.level == level) return true;
        return false;
    }
    if (level == Level::Skip) return early_warning > 0;
    return critical >= 0 && refresh == level;
}

XSlimPolicy parse_policy(const Value& v, size_t steps, const std::string& w) {
    XSlimPolicy p;
    if (v.is_null()) return p;
    if (v.kind != Value::Kind::Object) bad(w, "must be null or an object");
    if (string_field(v, "kind", w) != "xslim") bad(w + ".kind", "must be \"xslim\"");
    p.enabled = true;
    p.sample_ratio = ratio_value(field(v, "sample_ratio", w), w + ".sample_ratio");
    p.block_threshold = threshold_value(field(v, "block_threshold", w), w + ".block_threshold");
    p.first_blocks = int_field(v, "first_blocks", w, 0, 1 << 16);
    const std::string mode = string_field(v, "mode", w);
    if (mode == "online") {
        p.early_warning = threshold_value(field(v, "early_warning", w), w + ".early_warning");
        const Value& critical = field(v, "critical", w);
        if (!critical.is_null()) {
            p.critical = threshold_value(critical, w + ".critical");
            if (p.critical < p.early_warning) bad(w + ".critical", "must not be below early_warning");
        }
        const std::string refresh = string_field(v, "refresh", w);
        if (refresh != "block" && refresh != "token") bad(w + ".refresh", "must be \"block\" or \"token\"");
        p.refresh = refresh == "block" ? Level::Block : Level::Token;
        p.warmup_steps = int_field(v, "warmup_steps", w, 2, 1 << 20);
        return p;
    }
    if (mode != "schedule") bad(w + ".mode", "must be \"online\" or \"schedule\"");
    const Value& schedule = array_field(v, "schedule", w);
    if (schedule.array.size() != steps)
        bad(w + ".schedule", "has " + std::to_string(schedule.array.size()) + " steps but the program has " + std::to_string(steps));
    int full = 0;
    for (size_t i = 0; i < steps; ++i) {
        const Value& s = schedule.array[i];
        const std::string sw = w + ".schedule[" + std::to_string(i) + "]";
        if (s.kind != Value::Kind::Object) bad(sw, "must be an object");
        for (const auto& [key, value] : s.object)
            if (key != "level" && key != "sample_ratio" && key != "block_threshold")
                bad(sw + "." + key, "is not a schedule field (level, sample_ratio, block_threshold)");
        ScheduleStep step;
        step.level = parse_level(field(s, "level", sw), sw + ".level");
        if (const Value* r = s.find("sample_ratio")) step.sample_ratio = ratio_value(*r, sw + ".sample_ratio");
        if (const Value* t = s.find("block_threshold")) step.block_threshold = threshold_value(*t, sw + ".block_threshold");
        if (step.level != Level::Full && full == 0) bad(sw, "reuses caches before any full step (step 0 must be full)");
        if (step.level == Level::Token && full < 2) bad(sw, "is a token step before two full steps (token scores compare them)");
        full += step.level == Level::Full;
        p.schedule.push_back(step);
    }
    return p;
}

Level Controller::level(size_t step, bool records_delta) {
    const XSlimPolicy& p = policy_;
    if (!p.enabled || records_delta || full_steps_ == 0) return Level::Full;
    if (!p.schedule.empty()) return p.schedule[step].level;
    if (static_cast<int64_t>(step) < p.warmup_steps || step + 1 == steps_ || !have_rate_) return Level::Full;
    const double x = accumulated_ + rate_;
    if (x < p.early_warning) {
        accumulated_ = x;
        return Level::Skip;
    }
    if (p.critical >= 0 && x < p.critical && (p.refresh == Level::Block || full_steps_ >= 2)) {
        accumulated_ = x;
        return p.refresh;
    }
    return Level::Full;
}

void Controller::full_step_done(size_t step, double change) {
    if (change >= 0) {
        rate_ = change / static_cast<double>(step - last_full_);
        have_rate_ = true;
    }
    last_full_ = step;
    accumulated_ = 0;
    full_steps_ += 1;
}

double Controller::ratio(size_t step) const {
    double r = policy_.schedule.empty() ? -1 : policy_.schedule[step].sample_ratio;
    return r < 0 ? policy_.sample_ratio : r;
}

double Controller::block_threshold(size_t step) const {
    double t = policy_.schedule.empty() ? -1 : policy_.schedule[step].block_threshold;
    return t < 0 ? policy_.block_threshold : t;
}

double relative_change(const float* a, const float* b, size_t n) {
    float change = 0, scale = 0;
    kernels::cpu::l1_change(a, b, 1, static_cast<int64_t>(n), &change, &scale);
    return scale > 0 ? static_cast<double>(change) / scale : std::numeric_limits<double>::infinity();
}

void skippable_blocks(const std::vector<double>& scores, double threshold, int first_blocks, std::vector<bool>& skip) {
    skip.assign(scores.size(), false);
    double acc = 0;
    for (size_t i = 0; i < scores.size(); ++i) {
        if (std::isnan(scores[i])) continue;
        acc += scores[i];
        if (static_cast<int>(i) >= first_blocks && acc < threshold)
            skip[i] = true;
        else
            acc = 0;
    }
}

double block_flops(int64_t tokens, int64_t computed, int64_t text, int64_t dim) {
    const double rows = static_cast<double>(computed + text);
    return rows * 12.0 * dim * dim + 2.0 * rows * static_cast<double>(tokens + text) * dim;
}

XSlimPolicy resolve_policy(const XSlimPolicy& bundle_policy, const char* policy_json, float step_threshold, size_t steps,
                           bool has_token_stages) {
    XSlimPolicy policy = bundle_policy;
    if (policy_json) {
        constexpr size_t kMaxPolicy = 1 << 20;
        const size_t length = strnlen(policy_json, kMaxPolicy + 1);
        if (length > kMaxPolicy) throw Error(SLIM_ERR_INVALID_ARGUMENT, "xslim_policy: longer than 1 MiB");
        try {
            policy = parse_policy(json::parse(std::string(policy_json, length)), steps, "xslim_policy");
        } catch (const json::FieldError& e) { throw Error(SLIM_ERR_INVALID_ARGUMENT, e.what()); } catch (const std::runtime_error& e) {
            throw Error(SLIM_ERR_INVALID_ARGUMENT, std::string("xslim_policy: ") + e.what());
        }
    } else if (step_threshold >= 0) {
        policy = XSlimPolicy{};
        policy.enabled = step_threshold > 0;
        policy.early_warning = step_threshold;
        policy.warmup_steps = bundle_policy.enabled ? bundle_policy.warmup_steps : 2;
    }
    if (!policy.schedule.empty() && policy.schedule.size() != steps)
        throw Error(SLIM_ERR_INVALID_ARGUMENT, "the bundle's X-Slim schedule has " + std::to_string(policy.schedule.size()) +
                                                   " steps but this request runs " + std::to_string(steps) + "; pass a xslim_policy");
    if (policy.uses(Level::Token) && !has_token_stages)
        throw Error(
            SLIM_ERR_INVALID_ARGUMENT,
            "xslim_policy uses the X-Slim token level but this bundle has no block_N_tokens stages; re-export it with --token-stages");
    return policy;
}

}  // namespace slim
