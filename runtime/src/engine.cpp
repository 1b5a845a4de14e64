#include "engine.hpp"

#include <dlfcn.h>
#include <malloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bundle.hpp"
#include "error.hpp"

namespace slim {
namespace {

using Names = std::vector<std::string>;

// The stage interface a program relies on (stage role -> inputs, outputs).
void expect_io(const StageDecl& s, const Names& inputs, const Names& outputs, const char* program = "SD3") {
    if (s.inputs != inputs || s.outputs != outputs)
        throw Error(SLIM_ERR_BUNDLE,
                    "manifest: stage " + s.name + " does not have the inputs/outputs the " + program + " program expects of its role");
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

// Bundle file `rel`, a stage graph, read into memory through `files` (docs/bundle-format.md,
// "After open"); its weights come with read_weights.
StageModel read_graph(BundleReader& files, const std::string& root, const std::string& rel) {
    StageModel model;
    model.path = root + "/" + rel;
    model.in_memory = true;
    model.graph = files.read(rel);
    model.weights_name = rel.substr(rel.rfind('/') + 1) + ".data";  // the exporter's external-data location, beside the graph
    return model;
}

// The weights file of graph `rel`, `rel`.data, when the manifest lists one, into model.weights (its buffer reused).
void read_weights(BundleReader& files, const std::string& rel, StageModel& model) {
    if (files.listed(rel + ".data"))
        files.read(rel + ".data", model.weights);
    else
        model.weights.clear();
}

// Hands the heap's free pages back to the system. ONNX Runtime's copy of a stage's weights and its temporaries
// are freed once the session is built, but glibc keeps most of them: without this an open engine's RSS was ~9%
// more than with ONNX Runtime's own file load, and the peak grew with each stage.
void return_free_memory() {
#ifdef __GLIBC__
    malloc_trim(0);
#endif
}

}  // namespace

Engine::Engine(const std::string& path, const EngineOptions& options) {
    // A bundle's files are checked and read through its directory's descriptor; every file the engine uses is read
    // into memory here, once, so nothing is read from the bundle after open.
    std::unique_ptr<BundleDir> dir;
    std::unique_ptr<BundleReader> files;
    if (is_plain_onnx(path)) {
        manifest_ = plain_onnx_manifest(path);
    } else {
        dir = std::make_unique<BundleDir>(path);
        manifest_ = load_manifest(*dir);
        files = std::make_unique<BundleReader>(*dir, manifest_, options.verify);
    }
    if (manifest_.kind == Family::Sd3) bind_sd3_stages();
    if (manifest_.kind == Family::Lemur) bind_lemur_stages();

    // Every graph (small) read and, as the level says, hashed before any session is built; a stage's weights are
    // read (and at Full hashed) just before its session is built, into one buffer that every stage reuses in turn
    // (ONNX Runtime copies them) and that is freed at the end of the open.
    std::vector<StageModel> models(manifest_.stages.size());
    for (size_t i = 0; i < models.size(); ++i) {
        if (files) {
            models[i] = read_graph(*files, path, manifest_.stages[i].file);
        } else {  // a plain .onnx file: ONNX Runtime opens it (and any external data) itself
            struct stat st{};
            models[i].path = manifest_.stages[i].file;
            if (::stat(models[i].path.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
                throw Error(SLIM_ERR_IO, models[i].path + ": not a readable regular file (ONNX Runtime would wait forever on a FIFO)");
        }
    }
    std::vector<std::string> tokenizer_files;
    for (const TokenizerDecl& t : manifest_.tokenizers) tokenizer_files.push_back(files->read(t.file));  // only bundles have tokenizers
    tokenizers_ = std::make_unique<Tokenizers>(manifest_.tokenizers, tokenizer_files);

    ort_ = OrtRuntime::get(options.onnxruntime_library, options.intra_op_threads);
    std::string ops;
    if (manifest_.uses_custom_ops) {
        // On CUDA the ops library built with nvcc: the same CPU kernels plus CUDA kernels for the CUDA EP.
        ops = custom_op_library_path(options.cuda_device >= 0 ? kCustomOpLibraryCuda : kCustomOpLibrary);
        if (options.cuda_device >= 0 && access(ops.c_str(), R_OK) != 0)
            throw Error(SLIM_ERR_BACKEND, "this bundle's token stages need " + ops +
                                              " on CUDA, which is built only where nvcc exists; rebuild slimengine with the CUDA toolkit");
    }
    std::string weights;  // the buffer above: its pages are faulted in once, not once per stage (open time)
    for (size_t k = 0; k < manifest_.stages.size(); ++k) {
        const StageDecl& s = manifest_.stages[k];
        models[k].weights.swap(weights);
        if (files) read_weights(*files, s.file, models[k]);
        stages_.push_back(std::make_unique<StageSession>(ort_, models[k], s.name, s.inputs, s.outputs, ops, options.cuda_device));
        models[k].weights.swap(weights);
        models[k].release();  // ONNX Runtime holds its own copy
        return_free_memory();
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
    if (files) files->finish();  // Full: a listed file no stage or tokenizer uses is hashed too
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

std::vector<int> Engine::stage_blocks() const {
    std::vector<int> blocks;
    for (const StageDecl& s : manifest_.stages) blocks.push_back(s.block);
    return blocks;
}

void Engine::bind_lemur_stages() {
    for (size_t i = 0; i < manifest_.stages.size(); ++i) {
        const StageDecl& s = manifest_.stages[i];
        if (s.role == Role::LemurEmbed) {
            if (lemur_embed_stage >= 0) throw Error(SLIM_ERR_BUNDLE, "manifest: stage " + s.name + " is a second lemur_embed stage");
            expect_io(s, {"text_ids", "segment_ids", "frames"}, {"doc_embedding"}, "LEMUR embed");
            if (s.input_dtypes != Names{"int64", "int64", "float32"})
                throw Error(SLIM_ERR_BUNDLE, "manifest: stage embed inputs (text_ids, segment_ids, frames) must be int64, int64, float32");
            lemur_embed_stage = static_cast<int>(i);
        } else {  // Role::LemurScore: the manifest allows no other role in a lemur bundle
            if (lemur_score_stage >= 0) throw Error(SLIM_ERR_BUNDLE, "manifest: stage " + s.name + " is a second lemur_score stage");
            expect_io(s, {"history", "history_mask", "query_ids"}, {"score"}, "LEMUR score");
            if (s.input_dtypes != Names{"float32", "float32", "int64"})
                throw Error(SLIM_ERR_BUNDLE,
                            "manifest: stage score inputs (history, history_mask, query_ids) must be float32, float32, int64");
            lemur_score_stage = static_cast<int>(i);
        }
    }
    if (lemur_embed_stage < 0 || lemur_score_stage < 0)
        throw Error(SLIM_ERR_BUNDLE, "manifest: a lemur bundle needs the embed and score stages (roles lemur_embed and lemur_score)");
}

void Engine::bind_sd3_stages() {
    const Sd3Config& c = manifest_.config;
    block_stages.assign(c.num_layers, -1);
    token_stages.assign(c.num_layers, -1);
    block_kv.assign(c.num_layers, false);
    // The one-per-bundle roles: a second stage of the same role is an error, not silently preferred.
    const auto bind = [](int& slot, const StageDecl& s, int index) {
        if (slot >= 0) throw Error(SLIM_ERR_BUNDLE, "manifest: stage " + s.name + " repeats the role of another stage");
        slot = index;
    };
    for (size_t i = 0; i < manifest_.stages.size(); ++i) {
        const StageDecl& s = manifest_.stages[i];
        const int index = static_cast<int>(i);
        switch (s.role) {
            case Role::Embed:
                expect_io(s, {"latents", "timestep", "pooled", "text"}, {"img", "txt", "temb"});
                bind(embed_stage, s, index);
                break;
            case Role::Final:
                expect_io(s, {"img", "temb", "latents"}, {"velocity"});
                bind(final_stage, s, index);
                break;
            case Role::Compensate:
                expect_io(s, {"delta_img", "delta_txt"}, {"comp_img", "comp_txt"});
                bind(compensate_stage, s, index);
                break;
            case Role::ClipL:
            case Role::ClipG:
                expect_io(s, {"input_ids"}, {"hidden_states", "pooled"});
                bind(s.role == Role::ClipL ? clip_l_stage : clip_g_stage, s, index);
                break;
            case Role::T5:
                expect_io(s, {"input_ids"}, {"hidden_states"});
                bind(t5_stage, s, index);
                break;
            case Role::VaeDecode:
                expect_io(s, {"latents"}, {"image"});
                bind(vae_decode_stage, s, index);
                break;
            case Role::Block:
            case Role::BlockTokens: {
                const int b = s.block;  // in [0, num_layers): checked with the manifest
                const bool last = b == c.num_layers - 1;
                const Names outputs = last ? Names{"img_out"} : Names{"img_out", "txt_out"};
                if (s.role == Role::BlockTokens) {
                    expect_io(s, {"img", "txt", "temb", "token_index", "k_cache", "v_cache", "residual_cache"}, outputs);
                    bind(token_stages[b], s, index);
                } else {
                    Names with_kv = outputs;
                    with_kv.insert(with_kv.end(), {"img_k", "img_v"});
                    expect_io(s, {"img", "txt", "temb"}, s.outputs == with_kv ? with_kv : outputs);
                    bind(block_stages[b], s, index);
                    block_kv[b] = s.outputs == with_kv;
                }
                break;
            }
            default:  // the manifest allows only these roles in an sd3 bundle
                throw Error(SLIM_ERR_INTERNAL, "stage " + s.name + " has a role the SD3 program does not bind");
        }
    }
    if (embed_stage < 0 || final_stage < 0) throw Error(SLIM_ERR_BUNDLE, "manifest: the embed and final stages are required");
    for (int b = 0; b < c.num_layers; ++b)
        if (block_stages[b] < 0)
            throw Error(SLIM_ERR_BUNDLE, "manifest: stage block_" + std::to_string(b) + " is missing (no stage has role block, block " +
                                             std::to_string(b) + ")");
    for (int b = 0; b < c.num_layers; ++b) {
        if (token_stages[b] >= 0 && !block_kv[b])
            throw Error(SLIM_ERR_BUNDLE, "manifest: the block_tokens stage of block " + std::to_string(b) + " needs block " +
                                             std::to_string(b) + "'s block stage to output img_k and img_v");
        has_token_stages = has_token_stages || token_stages[b] >= 0;
    }
    if (has_token_stages && !manifest_.uses_custom_ops)
        throw Error(SLIM_ERR_BUNDLE, "manifest: token stages need custom_op_library (the ai.slimengine ops)");
    if (manifest_.program.cache.uses(Level::Token) && !has_token_stages)
        throw Error(SLIM_ERR_BUNDLE, "manifest: the default X-Slim policy uses the token level but the bundle has no block_tokens stages");
    if (manifest_.program.compensation == Compensation::Mlp && compensate_stage < 0)
        throw Error(SLIM_ERR_BUNDLE, "manifest: the program uses MLP compensation but there is no compensate stage");
}

}  // namespace slim
