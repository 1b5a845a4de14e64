// Prompt tokenization: the bundle's tokenizer stages (manifest `tokenizers`, docs/tokenizers.md), ONNX
// graphs of onnxruntime-extensions' tokenizer ops, run on one UTF-8 prompt each. Their sessions are made
// on first use, so an engine used only with embeddings never needs the extensions library; their graphs
// are read at open (as every bundle file the engine uses), so a change to the files after open is never seen.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "manifest.hpp"
#include "ort_backend.hpp"

namespace slim {

// Environment variable naming onnxruntime-extensions' shared library (the Python binding sets it from
// onnxruntime_extensions.get_library_path() when it is unset).
constexpr const char* kExtensionsLibraryEnv = "SLIMENGINE_EXTENSIONS_LIBRARY";
// The longest prompt accepted, in bytes: far above what 77 or 512 tokens can hold, low enough that a
// runaway caller cannot make the tokenizer chew megabytes.
constexpr size_t kMaxPromptBytes = 64 * 1024;

class Tokenizers {
  public:
    // `models[i]`: decls[i]'s graph, read at open.
    Tokenizers(std::shared_ptr<OrtRuntime> ort, std::vector<TokenizerDecl> decls, std::vector<StageModel> models);
    ~Tokenizers();

    // The declaration of `role`, or nullptr when the bundle has no such tokenizer.
    const TokenizerDecl* find(const std::string& role) const;
    const std::vector<TokenizerDecl>& decls() const { return decls_; }

    // The ids of `prompt` (`length` bytes of UTF-8, checked) by the stage of `decl`: exactly
    // decl.max_length ids. Throws Error: INVALID_ARGUMENT (bad UTF-8, too long), BACKEND (no
    // extensions library, stage failed), BUNDLE (the graph's output is not what the manifest says).
    std::vector<int64_t> tokenize(const TokenizerDecl& decl, const char* prompt, size_t length) const;

  private:
    const StageSession& session(const TokenizerDecl& decl) const;

    std::shared_ptr<OrtRuntime> ort_;
    std::vector<TokenizerDecl> decls_;
    mutable std::vector<StageModel> models_;                       // by index in decls_; freed once its session is made
    mutable std::mutex mutex_;                                     // guards models_ and sessions_ while sessions are made
    mutable std::vector<std::unique_ptr<StageSession>> sessions_;  // by index in decls_; null until first use
};

// True when the `length` bytes are well-formed UTF-8 (no overlong forms, surrogates or code points
// above U+10FFFF), as Python's and the tokenizers' decoders require.
bool is_utf8(const char* text, size_t length);

}  // namespace slim
