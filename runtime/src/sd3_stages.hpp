// The stages an sd3 bundle's programs call (sd3_program: the sampling loop; prompt_program: the encoders and the
// VAE), bound by their manifest roles. The programs bind them; the engine only checks at open that they can.
#pragma once

#include <vector>

#include "manifest.hpp"
#include "step_planner.hpp"

namespace slim {

// Indices into the engine's stages (its manifest's order).
struct Sd3Stages {
    int embed = -1, final = -1, compensate = -1;             // compensate: -1 without MLP compensation
    int clip_l = -1, clip_g = -1, t5 = -1, vae_decode = -1;  // the pipeline's, when present
    std::vector<int> block, tokens;                          // per joint block; tokens: -1 where a block has no token stage
    BlockStages blocks;                                      // the same, as the step planner reads it
    bool has_token_stages = false;                           // the X-Slim token level can run
};

// Binds every stage of an sd3 manifest by its role and checks the program's needs: each role once, the inputs and
// outputs it expects, a block stage per joint block, the token stages' keys/values and custom ops, the default
// X-Slim policy's levels and the compensation's stage. Throws Error(SLIM_ERR_BUNDLE) naming what is wrong.
Sd3Stages bind_sd3_stages(const Manifest& manifest);

}  // namespace slim
