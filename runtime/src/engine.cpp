#include "engine.hpp"

#include <dlfcn.h>
#include <unistd.h>

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

// `name` (kCustomOpLibrary or its CUDA build) beside this library (they are built and installed together).
std::string custom_op_library_path(const char* name) {
    Dl_info info{};
    if (!dladdr(reinterpret_cast<void*>(&custom_op_library_path), &info) || !info.dli_fname)
        throw Error(SLIM_ERR_BACKEND, "cannot locate libslimengine.so to find its custom-op library");
    std::string self = info.dli_fname;
    size_t slash = self.rfind('/');
    return (slash == std::string::npos ? std::string(".") : self.substr(0, slash)) + "/" + name;
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
    token_stages.assign(c.num_layers, -1);
    block_kv.assign(c.num_layers, false);
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
            const bool tokens = s.name.size() > 7 && s.name.compare(s.name.size() - 7, 7, "_tokens") == 0;
            const std::string number = s.name.substr(6, s.name.size() - 6 - (tokens ? 7 : 0));
            int b = -1;
            try {
                b = std::stoi(number);
            } catch (...) {}
            std::vector<int>& slot = tokens ? token_stages : block_stages;
            if (b < 0 || b >= c.num_layers || std::to_string(b) != number || slot[b] >= 0)
                throw Error(SLIM_ERR_BUNDLE, "manifest: stage name '" + s.name + "' is not a block of this " +
                                                 std::to_string(c.num_layers) + "-block model");
            const bool last = b == c.num_layers - 1;
            const Names outputs = last ? Names{"img_out"} : Names{"img_out", "txt_out"};
            if (tokens) {
                expect_io(s, {"img", "txt", "temb", "token_index", "k_cache", "v_cache", "residual_cache"}, outputs);
            } else {
                Names with_kv = outputs;
                with_kv.insert(with_kv.end(), {"img_k", "img_v"});
                block_kv[b] = s.outputs == with_kv;
                expect_io(s, {"img", "txt", "temb"}, block_kv[b] ? with_kv : outputs);
            }
            slot[b] = index;
        } else {
            throw Error(SLIM_ERR_BUNDLE, "manifest: unknown stage '" + s.name + "'");
        }
    }
    if (embed_stage < 0 || final_stage < 0) throw Error(SLIM_ERR_BUNDLE, "manifest: the embed and final stages are required");
    for (int b = 0; b < c.num_layers; ++b)
        if (block_stages[b] < 0) throw Error(SLIM_ERR_BUNDLE, "manifest: stage block_" + std::to_string(b) + " is missing");
    for (int b = 0; b < c.num_layers; ++b) {
        if (token_stages[b] >= 0 && !block_kv[b])
            throw Error(SLIM_ERR_BUNDLE, "manifest: stage block_" + std::to_string(b) + "_tokens needs block_" + std::to_string(b) +
                                             " to output img_k and img_v");
        has_token_stages = has_token_stages || token_stages[b] >= 0;
    }
    if (has_token_stages && !manifest_.uses_custom_ops)
        throw Error(SLIM_ERR_BUNDLE, "manifest: token stages need custom_op_library (the ai.slimengine ops)");
    if (manifest_.program.cache.uses(Level::Token) && !has_token_stages)
        throw Error(SLIM_ERR_BUNDLE,
                    "manifest: the default X-Slim policy uses the token level but the bundle has no block_N_tokens stages");
    if (manifest_.program.compensation == Compensation::Mlp && compensate_stage < 0)
        throw Error(SLIM_ERR_BUNDLE, "manifest: the program uses MLP compensation but there is no compensate stage");

    ort_ = OrtRuntime::get(options.onnxruntime_library, options.intra_op_threads);
    std::string ops;
    if (manifest_.uses_custom_ops) {
        // On CUDA the ops library built with nvcc: the same CPU kernels plus CUDA kernels for the CUDA EP.
        ops = custom_op_library_path(options.cuda_device >= 0 ? kCustomOpLibraryCuda : kCustomOpLibrary);
        if (options.cuda_device >= 0 && access(ops.c_str(), R_OK) != 0)
            throw Error(SLIM_ERR_BACKEND, "this bundle's token stages need " + ops +
                                              " on CUDA, which is built only where nvcc exists; rebuild slimengine with the CUDA toolkit");
    }
    for (const StageDecl& s : manifest_.stages)
        stages_.push_back(
            std::make_unique<StageSession>(ort_, bundle_dir + "/" + s.file, s.name, s.inputs, s.outputs, ops, options.cuda_device));
}

}  // namespace slim
