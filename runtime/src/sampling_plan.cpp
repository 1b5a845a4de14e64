#include "sampling_plan.hpp"

namespace slim {
namespace {

constexpr int kTrainSteps = 1000;  // TEACHER_TRAIN_STEPS

// FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift).set_timesteps(steps).sigmas, step
// by step in its own precisions: sigma_min from the float32 training table, the inference schedule
// in float64 (numpy's linspace), rounded to float32; a final 0.
std::vector<double> scheduler_sigmas(int steps, double shift) {
    const float s = 1.0f / static_cast<float>(kTrainSteps);  // the last training sigma, in float32 (torch)
    const float numerator = static_cast<float>(shift) * s, denominator = 1.0f + static_cast<float>(shift - 1) * s;
    const double sigma_min = static_cast<double>(numerator / denominator), sigma_max = 1.0;  // shift(1) == 1
    const double start = sigma_max * kTrainSteps, stop = sigma_min * kTrainSteps;
    std::vector<double> sigmas;
    for (int i = 0; i < steps; ++i) {
        double t = start;  // np.linspace(start, stop, steps): i * step + start, the last one exactly stop
        if (steps > 1) t = i == steps - 1 ? stop : static_cast<double>(i) * ((stop - start) / (steps - 1)) + start;
        const double sigma = t / kTrainSteps;
        sigmas.push_back(static_cast<float>(shift * sigma / (1 + (shift - 1) * sigma)));
    }
    sigmas.push_back(0.0);
    return sigmas;
}

}  // namespace

Program plain_program(const Program& bundle, int steps, double shift) {
    Program p = bundle;
    p.skip_first = p.skip_last = -1;
    p.compensation = Compensation::None;
    p.steps.clear();
    const std::vector<double> sigmas = scheduler_sigmas(steps, shift);
    for (int i = 0; i < steps; ++i) p.steps.push_back(StepPlan{sigmas[i], sigmas[i + 1], sigmas[i] * kTrainSteps, false, false});
    return p;
}

}  // namespace slim
