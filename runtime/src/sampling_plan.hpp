// Sampling plans the runtime computes itself, mirroring export/sampling_plan.py.
#pragma once

#include "manifest.hpp"

namespace slim {

// The plain SD3 plan of export/sampling_plan.py (make_plan without a skipped range): `steps` Euler
// steps with diffusers' FlowMatchEulerDiscreteScheduler sigmas for `shift` (scheduler_sigmas), every
// joint block every step. Guidance and the X-Slim policy are kept from `bundle`.
Program plain_program(const Program& bundle, int steps, double shift);

}  // namespace slim
