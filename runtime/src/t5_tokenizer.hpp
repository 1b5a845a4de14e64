// T5's tokenizer, native (docs/tokenizers.md, "T5"): what transformers' T5TokenizerFast (the tokenizers library's
// Unigram pipeline) gives, step by step:
//   1. its added tokens (</s>, <pad>, <unk>, <extra_id_N>) split out of the raw text, leftmost and longest first;
//   2. each span between them normalized by the tokenizer's precompiled charsmap (SentencePiece's nmt_nfkc rules)
//      the way the tokenizers library applies it: per extended grapheme cluster, a cluster under 6 bytes replaced
//      whole by its shortest charsmap match (the rest of the cluster dropped), other clusters code point by code point;
//   3. words split at White_Space; each word gets a leading U+2581 (unless it has one) and splits before every U+2581;
//   4. each piece segmented by Unigram Viterbi over the vocabulary's log-probabilities, in double precision
//      (SentencePiece's library sums in float and breaks near-ties differently), unknown characters scored
//      min_score - 10 and consecutive unknowns fused into one unk id;
//   5. the ids truncated to max_length - 1, eos, then pad ids up to max_length.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "token_trie.hpp"

namespace slim {

constexpr size_t kMaxReplacementBytes = 64;     // a charsmap replacement string (T5's longest is 33 bytes)
constexpr size_t kMaxNormalizedWord = 1 << 20;  // code points of one normalized word (at most 64 Ki unless expanded)

class T5Tokenizer {
  public:
    // Parses and validates a bundle's T5 tokenizer file (JSON, docs/tokenizers.md); throws Error(SLIM_ERR_BUNDLE)
    // "<where>: <what>".
    T5Tokenizer(const std::string& json_text, const std::string& where);

    // The ids of `text` (well-formed UTF-8, checked by the caller), exactly `max_length` of them.
    std::vector<int64_t> encode(const std::string& text, int max_length) const;

  private:
    // The replacement of `key`'s shortest prefix in the charsmap (a darts-clone double array and its strings, in
    // SentencePiece's layout), or nullptr when none; bounds-checked, so a hostile charsmap cannot read outside it.
    const char* charsmap_match(const std::string& key) const;
    // Appends the charsmap normalization of one grapheme cluster: the whole cluster's shortest match when it is under
    // 6 bytes and has one (the rest of the cluster dropped), else each code point's match or the code point itself.
    void normalize_cluster(const char32_t* begin, const char32_t* end, std::u32string& out) const;
    // Appends the Unigram ids of one pre-tokenized piece (UTF-8).
    void unigram(const std::string& piece, std::vector<int64_t>& out) const;

    TokenTrie<char> added_;                         // added tokens, matched in the raw text (UTF-8 bytes)
    std::array<bool, 128> ascii_mapped_{};          // ASCII characters the charsmap replaces
    std::vector<uint32_t> charsmap_trie_;           // the charsmap's double array
    std::string replacements_;                      // its NUL-terminated replacement strings, indexed by the trie's values
    std::vector<double> scores_;                    // by piece id
    std::unordered_map<std::string, int32_t> ids_;  // piece -> id
    // The pieces as a byte trie: node 0 is the root; (node << 8 | byte) -> child; a node's piece id or -1.
    std::unordered_map<uint64_t, int32_t> children_;
    std::vector<int32_t> node_piece_;
    std::array<int32_t, 256> root_children_{};  // the root's children, -1 for none
    double unk_score_ = 0;
    int32_t unk_ = 0, eos_ = 0, pad_ = 0;
};

}  // namespace slim
