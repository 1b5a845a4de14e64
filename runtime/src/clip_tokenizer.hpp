// CLIP's byte-level BPE tokenizer, native (docs/tokenizers.md, "CLIP"): the pipeline transformers' CLIPTokenizer
// (the tokenizers library) runs, step by step:
//   1. special tokens the tokenizer registers with normalized=false are split out of the raw text;
//   2. each remaining span is normalized: NFC, every whitespace run to one space, lower case;
//   3. special tokens registered with normalized=true are split out of the normalized text;
//   4. pre-tokenization: CLIP's regex (<|startoftext|>, <|endoftext|>, contractions, letter runs, single
//      digits, runs of other non-space characters; whitespace dropped), then GPT-2's regex inside each piece;
//   5. each piece's UTF-8 bytes become the byte-level alphabet's characters, `</w>` is appended to the last,
//      and merges are applied lowest rank first (leftmost on ties), as the tokenizers library's BPE does;
//   6. bos, the ids truncated to max_length - 2, eos, then pad ids up to max_length.
// Unicode classes, lower case and NFC come from tables generated off the reference (tools/gen_unicode_tables.py).
// Linear in the prompt: each step is one pass, and BPE stops once max_length - 2 ids are made.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "token_trie.hpp"

namespace slim {

// Limits checked when a tokenizer file is read: far above CLIP's 49408 tokens and 48894 merges, low enough
// that a hostile file cannot make the runtime allocate gigabytes.
constexpr size_t kMaxVocabSize = 1 << 20;
constexpr size_t kMaxTokenBytes = 1024;
constexpr size_t kMaxAddedTokens = 64;      // CLIP's (SD3's have 2 or 3)
constexpr size_t kMaxAddedTokenBytes = 32;  // SD3's longest, <|startoftext|>, is 15: matching costs up to this per byte
constexpr size_t kMaxT5AddedTokens = 1024;  // T5's (its 100 <extra_id_N> and 3 specials)

class ClipTokenizer {
  public:
    // Parses and validates a bundle's CLIP tokenizer file (JSON, docs/tokenizers.md): the vocabulary's ids
    // unique, dense and below its size, every merge naming two tokens whose concatenation is a token, the
    // special ids inside the vocabulary. Throws Error(SLIM_ERR_BUNDLE) "<where>: <what>".
    ClipTokenizer(const std::string& json_text, const std::string& where);

    // The ids of `text` (well-formed UTF-8, checked by the caller), exactly `max_length` of them.
    std::vector<int64_t> encode(const std::string& text, int max_length) const;

  private:
    struct Span {  // a run of text still to tokenize, or an added token already matched
        std::u32string text;
        int32_t token = -1;
    };

    void split_added(std::vector<Span>& spans, const TokenTrie<char32_t>& tokens) const;
    // Appends the BPE ids of one pre-tokenized piece.
    void bpe(const std::u32string& piece, std::vector<int32_t>& out, std::unordered_map<std::u32string, std::vector<int32_t>>& cache) const;

    std::unordered_map<std::string, int32_t> vocab_;
    std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (left id << 32 | right id) -> (rank, merged id)
    TokenTrie<char32_t> added_raw_;                                     // added tokens with normalized: false, split out of the raw text
    TokenTrie<char32_t> added_normalized_;  // the others (their content normalized), split out of normalized text
    std::string byte_symbol_[256];          // a byte's character in the byte-level alphabet, UTF-8
    std::string byte_symbol_end_[256];      // the same followed by `</w>`
    int32_t bos_ = 0, eos_ = 0, pad_ = 0, unk_ = 0;
};

}  // namespace slim
