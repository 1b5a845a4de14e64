#include "engine.hpp"

#include <dlfcn.h>
#include <malloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bundle.hpp"
#include "error.hpp"
#include "program.hpp"

namespace slim {
namespace {

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

Engine::Engine(const std::string& path, const EngineOptions& options) : host_buffers_(options.host_buffers) {
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
    check_program_stages(manifest_);  // the family's programs bind their stages by role: a bundle they cannot run is refused here

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
        stages_.push_back(std::make_unique<Stage>(ort_, models[k], s.name, s.inputs, s.outputs, ops, options.cuda_device));
        models[k].weights.swap(weights);
        models[k].release();  // ONNX Runtime holds its own copy
        return_free_memory();
        const Stage& stage = *stages_.back();
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

}  // namespace slim
