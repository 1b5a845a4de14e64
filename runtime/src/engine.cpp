#include "engine.hpp"

#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include "error.hpp"
#include "sha256.hpp"

namespace slim {
namespace {

using Names = std::vector<std::string>;

// The stage interface a program relies on (stage name -> inputs, outputs).
void expect_io(const StageDecl& s, const Names& inputs, const Names& outputs, const char* program = "SD3") {
    if (s.inputs != inputs || s.outputs != outputs)
        throw Error(SLIM_ERR_BUNDLE, "manifest: stage " + s.name + " does not have the inputs/outputs the " + program + " program expects");
}

bool is_plain_onnx(const std::string& path) {
    struct stat st{};
    return path.size() > 5 && path.compare(path.size() - 5, 5, ".onnx") == 0 && ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

const char* dtype_name(ONNXTensorElementDataType type) {
    switch (type) {
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
            return "float32";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
            return "int64";
        default:
            return "other";
    }
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

Engine::Engine(const std::string& path, const EngineOptions& options)
    : manifest_(is_plain_onnx(path) ? plain_onnx_manifest(path) : load_manifest(path)) {
    const std::string& bundle_dir = path;
    if (options.verify_checksums) {
        for (const auto& [file, digest] : manifest_.files) {
            std::string actual = sha256_file(bundle_dir + "/" + file);
            if (actual != digest)
                throw Error(SLIM_ERR_BUNDLE,
                            "checksum mismatch for " + bundle_dir + "/" + file + " (the file changed after export; re-export the bundle)");
        }
    }
    if (manifest_.kind == Family::Sd3) bind_sd3_stages();
    if (manifest_.kind == Family::Lemur) bind_lemur_stages();

    ort_ = OrtRuntime::get(options.onnxruntime_library, options.intra_op_threads);
    std::string ops;
    if (manifest_.uses_custom_ops) {
        // On CUDA the ops library built with nvcc: the same CPU kernels plus CUDA kernels for the CUDA EP.
        ops = custom_op_library_path(options.cuda_device >= 0 ? kCustomOpLibraryCuda : kCustomOpLibrary);
        if (options.cuda_device >= 0 && access(ops.c_str(), R_OK) != 0)
            throw Error(SLIM_ERR_BACKEND, "this bundle's token stages need " + ops +
                                              " on CUDA, which is built only where nvcc exists; rebuild slimengine with the CUDA toolkit");
    }
    for (const StageDecl& s : manifest_.stages) {
        std::string file = manifest_.kind == Family::PlainOnnx ? s.file : bundle_dir + "/" + s.file;
        ::close(open_regular_file(file));  // ONNX Runtime would wait forever on a FIFO (verify_checksums 0 reads nothing first)
        stages_.push_back(std::make_unique<StageSession>(ort_, file, s.name, s.inputs, s.outputs, ops, options.cuda_device));
        const StageSession& stage = *stages_.back();
        for (size_t i = 0; i < s.input_dtypes.size(); ++i)  // the manifest's dtypes must be the graph's
            if (s.input_dtypes[i] != dtype_name(stage.inputs()[i].type))
                throw Error(SLIM_ERR_BUNDLE, "stage " + s.name + ": input '" + s.inputs[i] + "' is " + dtype_name(stage.inputs()[i].type) +
                                                 " in the graph but " + s.input_dtypes[i] + " in the manifest");
        for (size_t i = 0; i < s.output_dtypes.size(); ++i)
            if (s.output_dtypes[i] != dtype_name(stage.outputs()[i].type))
                throw Error(SLIM_ERR_BUNDLE, "stage " + s.name + ": output '" + s.outputs[i] + "' is " +
                                                 dtype_name(stage.outputs()[i].type) + " in the graph but " + s.output_dtypes[i] +
                                                 " in the manifest");
    }
}

int Engine::stage_index(const std::string& name) const {
    for (size_t i = 0; i < manifest_.stages.size(); ++i)
        if (manifest_.stages[i].name == name) return static_cast<int>(i);
    return -1;
}

std::vector<std::string> Engine::stage_names() const {
    std::vector<std::string> names;
    for (const auto& stage : stages_) names.push_back(stage->name());
    return names;
}

void Engine::bind_lemur_stages() {
    for (size_t i = 0; i < manifest_.stages.size(); ++i) {
        const StageDecl& s = manifest_.stages[i];
        if (s.name == "embed") {
            expect_io(s, {"text_ids", "segment_ids", "frames"}, {"doc_embedding"}, "LEMUR embed");
            if (s.input_dtypes != Names{"int64", "int64", "float32"})
                throw Error(SLIM_ERR_BUNDLE, "manifest: stage embed inputs (text_ids, segment_ids, frames) must be int64, int64, float32");
            lemur_embed_stage = static_cast<int>(i);
        } else if (s.name == "score") {
            expect_io(s, {"history", "history_mask", "query_ids"}, {"score"}, "LEMUR score");
            if (s.input_dtypes != Names{"float32", "float32", "int64"})
                throw Error(SLIM_ERR_BUNDLE,
                            "manifest: stage score inputs (history, history_mask, query_ids) must be float32, float32, int64");
            lemur_score_stage = static_cast<int>(i);
        } else {
            throw Error(SLIM_ERR_BUNDLE, "manifest: unknown stage '" + s.name + "' in a lemur bundle");
        }
    }
    if (lemur_embed_stage < 0 || lemur_score_stage < 0)
        throw Error(SLIM_ERR_BUNDLE, "manifest: a lemur bundle needs the embed and score stages");
}

void Engine::bind_sd3_stages() {
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
}

}  // namespace slim
