// Prompt tokenization: the bundle's tokenizers (manifest `tokenizers`, docs/tokenizers.md), native: CLIP's
// byte-level BPE (clip_tokenizer.hpp) and T5's Unigram (t5_tokenizer.hpp), built from their files when the
// bundle opens (each file validated then), run on one UTF-8 prompt each.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "clip_tokenizer.hpp"
#include "manifest.hpp"
#include "t5_tokenizer.hpp"

namespace slim {

// The longest prompt accepted, in bytes: far above what 77 or 512 tokens can hold, low enough that a
// runaway caller cannot make the tokenizer chew megabytes.
constexpr size_t kMaxPromptBytes = 64 * 1024;

class Tokenizers {
  public:
    // `files[i]`: the contents of decls[i].file. Throws Error(SLIM_ERR_BUNDLE) for a file that is not a valid tokenizer.
    Tokenizers(std::vector<TokenizerDecl> decls, const std::vector<std::string>& files);
    ~Tokenizers();

    // The declaration of `role`, or nullptr when the bundle has no such tokenizer.
    const TokenizerDecl* find(const std::string& role) const;
    const std::vector<TokenizerDecl>& decls() const { return decls_; }

    // The ids of `prompt` (`length` bytes of UTF-8, checked): exactly decl.max_length ids. Throws Error:
    // INVALID_ARGUMENT (bad UTF-8, too long). Thread-safe.
    std::vector<int64_t> tokenize(const TokenizerDecl& decl, const char* prompt, size_t length) const;

  private:
    std::vector<TokenizerDecl> decls_;
    std::vector<std::unique_ptr<ClipTokenizer>> clip_;  // by index in decls_; null for a T5 tokenizer
    std::vector<std::unique_ptr<T5Tokenizer>> t5_;      // by index in decls_; null for a CLIP tokenizer
};

}  // namespace slim
