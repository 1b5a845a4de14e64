#include "tokenizer.hpp"

#include "error.hpp"
#include "unicode_text.hpp"

namespace slim {

Tokenizers::Tokenizers(std::vector<TokenizerDecl> decls, const std::vector<std::string>& files) : decls_(std::move(decls)) {
    for (size_t i = 0; i < decls_.size(); ++i) {
        const std::string where = "tokenizer " + decls_[i].role + " (" + decls_[i].file + ")";
        const bool clip = decls_[i].kind == TokenizerKind::ClipBpe;
        clip_.push_back(clip ? std::make_unique<ClipTokenizer>(files.at(i), where) : nullptr);
        t5_.push_back(clip ? nullptr : std::make_unique<T5Tokenizer>(files.at(i), where));
    }
}

Tokenizers::~Tokenizers() = default;

const TokenizerDecl* Tokenizers::find(const std::string& role) const {
    for (const TokenizerDecl& d : decls_)
        if (d.role == role) return &d;
    return nullptr;
}

std::vector<int64_t> Tokenizers::tokenize(const TokenizerDecl& decl, const char* prompt, size_t length) const {
    if (length > kMaxPromptBytes)
        throw Error(SLIM_ERR_INVALID_ARGUMENT, "prompt is " + std::to_string(length) + " bytes; at most " +
                                                   std::to_string(kMaxPromptBytes) + " are accepted (" + decl.role + " keeps only " +
                                                   std::to_string(decl.max_length) + " tokens)");
    if (!unicode::is_utf8(prompt, length)) throw Error(SLIM_ERR_INVALID_ARGUMENT, "prompt is not valid UTF-8");
    const size_t index = static_cast<size_t>(&decl - decls_.data());
    const std::string text(prompt, length);
    return clip_[index] ? clip_[index]->encode(text, decl.max_length) : t5_[index]->encode(text, decl.max_length);
}

}  // namespace slim
