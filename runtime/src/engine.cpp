#include "engine.hpp"

#include "error.hpp"
#include "sha256.hpp"

namespace slim {
namespace {

using Names = std::vector<std::string>;

// The stage interface the SD3 program relies on (stage name -> inputs, outputs).
void expect_io(const StageDecl& s, const Names& inputs, const Names& outputs) {
    if (s.inputs != inputs || s.outputs != outputs)
        throw Error(SLIM_ERR_BUNDLE, "manifest: stage " + s.name + " does not have the inputs/outputs the SD3 program expects");
}

}  // namespace

Engine::Engine(const std::string& bundle_dir, const EngineOptions& options) : manifest_(load_manifest(bundle_dir)) {
    if (options.verify_checksums) {
        for (const auto& [file, digest] : manifest_.files) {
            std::string actual = sha256_file(bundle_dir + "/" + file);
            if (actual != digest)
                throw Error(SLIM_ERR_BUNDLE,
                            "checksum mismatch for " + bundle_dir + "/" + file + " (the file changed after export; re-export the bundle)");
        }
    }
    const Sd3Config& c = manifest_.config;
    block_stages.assign(c.num_layers, -1);
    for (size_t i = 0; i < manifest_.stages.size(); ++i) {
        const StageDecl& s = manifest_.stages[i];
        int index = static_cast<int>(i);
        if (s.name == "embed") {
            expect_io(s, {"latents", "timestep", "pooled", "text"}, {"img", "txt", "temb"});
            embed_stage = index;
        } else if (s.name == "final") {
            expect_io(s, {"img", "temb", "latents"}, {"velocity"});
            final_stage = index;
        } else if (s.name == "compensate") {
            expect_io(s, {"delta_img", "delta_txt"}, {"comp_img", "comp_txt"});
            compensate_stage = index;
        } else if (s.name.rfind("block_", 0) == 0) {
            int b = -1;
            try {
                b = std::stoi(s.name.substr(6));
            } catch (...) {}
            if (b < 0 || b >= c.num_layers || std::to_string(b) != s.name.substr(6) || block_stages[b] >= 0)
                throw Error(SLIM_ERR_BUNDLE, "manifest: stage name '" + s.name + "' is not a block of this " +
                                                 std::to_string(c.num_layers) + "-block model");
            bool last = b == c.num_layers - 1;
            expect_io(s, {"img", "txt", "temb"}, last ? Names{"img_out"} : Names{"img_out", "txt_out"});
            block_stages[b] = index;
        } else {
            throw Error(SLIM_ERR_BUNDLE, "manifest: unknown stage '" + s.name + "'");
        }
    }
    if (embed_stage < 0 || final_stage < 0) throw Error(SLIM_ERR_BUNDLE, "manifest: the embed and final stages are required");
    for (int b = 0; b < c.num_layers; ++b)
        if (block_stages[b] < 0) throw Error(SLIM_ERR_BUNDLE, "manifest: stage block_" + std::to_string(b) + " is missing");
    if (manifest_.program.compensation == Compensation::Mlp && compensate_stage < 0)
        throw Error(SLIM_ERR_BUNDLE, "manifest: the program uses MLP compensation but there is no compensate stage");

    ort_ = OrtRuntime::get(options.onnxruntime_library, options.intra_op_threads);
    for (const StageDecl& s : manifest_.stages)
        stages_.push_back(std::make_unique<StageSession>(ort_, bundle_dir + "/" + s.file, s.name, s.inputs, s.outputs));
}

}  // namespace slim
