#include "tokenizer.hpp"

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
    if (!is_utf8(prompt, length)) throw Error(SLIM_ERR_INVALID_ARGUMENT, "prompt is not valid UTF-8");
    const size_t index = static_cast<size_t>(&decl - decls_.data());
    const std::string text(prompt, length);
    return clip_[index] ? clip_[index]->encode(text, decl.max_length) : t5_[index]->encode(text, decl.max_length);
}

}  // namespace slim
