#include "program.hpp"

#include "lemur_program.hpp"
#include "sd3_program.hpp"
#include "sd3_stages.hpp"

namespace slim {

std::unique_ptr<Runner> make_runner(const Engine& engine) {
    switch (engine.manifest().kind) {
        case Family::Sd3:
            return std::make_unique<Sd3Runner>(engine);
        case Family::Lemur:
            return std::make_unique<LemurRunner>(engine);
        case Family::PlainOnnx:
            break;
    }
    return nullptr;
}

void check_program_stages(const Manifest& manifest) {
    if (manifest.kind == Family::Sd3) bind_sd3_stages(manifest);
    if (manifest.kind == Family::Lemur) bind_lemur_stages(manifest);
}

}  // namespace slim
