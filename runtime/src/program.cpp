#include "program.hpp"

#include "lemur_program.hpp"
#include "sd3_program.hpp"

namespace slim {

std::unique_ptr<ProgramSession> make_program(const Engine& engine) {
    switch (engine.manifest().kind) {
        case Family::Sd3:
            return std::make_unique<Sd3Session>(engine);
        case Family::Lemur:
            return std::make_unique<LemurSession>(engine);
        case Family::PlainOnnx:
            break;
    }
    return nullptr;
}

}  // namespace slim
