#include "tokenizer.hpp"

#include <cstdlib>

#include "error.hpp"

namespace slim {

bool is_utf8(const char* text, size_t length) {
    const auto* s = reinterpret_cast<const unsigned char*>(text);
    size_t i = 0;
    while (i < length) {
        const unsigned char c = s[i];
        size_t extra;
        uint32_t code;
        if (c < 0x80) {
            ++i;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            extra = 1, code = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            extra = 2, code = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            extra = 3, code = c & 0x07;
        } else {
            return false;  // a continuation byte first, an overlong two-byte lead (C0, C1) or F5..FF
        }
        if (length - i <= extra) return false;
        for (size_t k = 1; k <= extra; ++k) {
            if ((s[i + k] & 0xC0) != 0x80) return false;
            code = (code << 6) | (s[i + k] & 0x3F);
        }
        if ((extra == 2 && (code < 0x800 || (code >= 0xD800 && code <= 0xDFFF))) || (extra == 3 && (code < 0x10000 || code > 0x10FFFF)))
            return false;
        i += extra + 1;
    }
    return true;
}

Tokenizers::Tokenizers(std::shared_ptr<OrtRuntime> ort, std::vector<TokenizerDecl> decls, std::vector<StageModel> models)
    : ort_(std::move(ort)), decls_(std::move(decls)), models_(std::move(models)) {
    sessions_.resize(decls_.size());
}

Tokenizers::~Tokenizers() = default;

const TokenizerDecl* Tokenizers::find(const std::string& role) const {
    for (const TokenizerDecl& d : decls_)
        if (d.role == role) return &d;
    return nullptr;
}

const StageSession& Tokenizers::session(const TokenizerDecl& decl) const {
    const size_t index = static_cast<size_t>(&decl - decls_.data());
    std::lock_guard<std::mutex> lock(mutex_);
    if (!sessions_[index]) {
        const char* library = std::getenv(kExtensionsLibraryEnv);
        if (!library || !*library)
            throw Error(SLIM_ERR_BACKEND,
                        std::string("tokenizer ") + decl.role + " needs onnxruntime-extensions' library: set " + kExtensionsLibraryEnv +
                            " to its path (python -c \"import onnxruntime_extensions as e; print(e.get_library_path())\"; "
                            "the Python package sets it itself)");
        try {
            sessions_[index] =
                std::make_unique<StageSession>(ort_, models_[index], "tokenizer_" + decl.role, std::vector<std::string>{"prompt"},
                                               std::vector<std::string>{"input_ids"}, library);
        } catch (const Error& e) {
            std::string message = e.what();
            // The Python wheel's build of the library needs libpython's symbols (docs/tokenizers.md).
            if (message.find("undefined symbol: Py") != std::string::npos)
                message +=
                    " (this is onnxruntime-extensions' Python-module build: it loads only into a process with libpython; "
                    "use a standalone libortextensions.so, or load libpython3 first)";
            throw Error(e.status(), message);
        }
        const StageSession& s = *sessions_[index];
        if (s.inputs()[0].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING || s.outputs()[0].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
            sessions_[index].reset();
            throw Error(SLIM_ERR_BUNDLE, "tokenizer " + decl.role + ": the graph must map a string prompt to int64 input_ids");
        }
        models_[index].release();  // ONNX Runtime holds its own copy now
    }
    return *sessions_[index];
}

std::vector<int64_t> Tokenizers::tokenize(const TokenizerDecl& decl, const char* prompt, size_t length) const {
    if (length > kMaxPromptBytes)
        throw Error(SLIM_ERR_INVALID_ARGUMENT, "prompt is " + std::to_string(length) + " bytes; at most " +
                                                   std::to_string(kMaxPromptBytes) + " are accepted (" + decl.role + " keeps only " +
                                                   std::to_string(decl.max_length) + " tokens)");
    if (!is_utf8(prompt, length)) throw Error(SLIM_ERR_INVALID_ARGUMENT, "prompt is not valid UTF-8");
    const StageSession& stage = session(decl);
    const OrtApi* api = ort_->api;
    OrtAllocator* allocator = nullptr;
    check(api, api->GetAllocatorWithDefaultOptions(&allocator), "allocator");
    const int64_t shape[1] = {1};
    OrtValue* raw = nullptr;
    check(api, api->CreateTensorAsOrtValue(allocator, shape, 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING, &raw), "tokenizer " + decl.role);
    TensorView input = TensorView::adopt(api, raw);
    const std::string text(prompt, length);  // NUL-terminated for FillStringTensor
    const char* strings[1] = {text.c_str()};
    check(api, api->FillStringTensor(input.get(), strings, 1), "tokenizer " + decl.role);
    const OrtValue* inputs[1] = {input.get()};
    std::vector<TensorView> out = stage.run_selected(inputs, {0});
    OrtTensorTypeAndShapeInfo* info = nullptr;
    check(api, api->GetTensorTypeAndShape(out.at(0).get(), &info), "tokenizer " + decl.role);
    size_t count = 0;
    OrtStatus* status = api->GetTensorShapeElementCount(info, &count);
    api->ReleaseTensorTypeAndShapeInfo(info);
    check(api, status, "tokenizer " + decl.role);
    if (count != static_cast<size_t>(decl.max_length))
        throw Error(SLIM_ERR_BUNDLE, "tokenizer " + decl.role + " returned " + std::to_string(count) + " ids, not its max_length " +
                                         std::to_string(decl.max_length));
    int64_t* ids = nullptr;
    check(api, api->GetTensorMutableData(out.at(0).get(), reinterpret_cast<void**>(&ids)), "tokenizer " + decl.role);
    return std::vector<int64_t>(ids, ids + count);
}

}  // namespace slim
