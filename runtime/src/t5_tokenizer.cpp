#include "t5_tokenizer.hpp"

#include <algorithm>
#include <limits>

#include "clip_tokenizer.hpp"  // the shared limits
#include "error.hpp"
#include "json.hpp"
#include "unicode_text.hpp"

namespace slim {
namespace {

[[noreturn]] void bad(const std::string& where, const std::string& what) { throw Error(SLIM_ERR_BUNDLE, where + ": " + what); }

// RFC 4648 base64, padded; false on any other byte.
bool decode_base64(const std::string& in, std::string& out) {
    if (in.size() % 4) return false;
    auto value = [](char c) -> int {
        if (c >= 'A' && c <= 'Z') return c - 'A';
        if (c >= 'a' && c <= 'z') return c - 'a' + 26;
        if (c >= '0' && c <= '9') return c - '0' + 52;
        return c == '+' ? 62 : c == '/' ? 63 : -1;
    };
    out.clear();
    out.reserve(in.size() / 4 * 3);
    for (size_t i = 0; i < in.size(); i += 4) {
        const int pads = (in[i + 3] == '=') + (in[i + 2] == '=' && in[i + 3] == '=');
        if (pads && i + 4 != in.size()) return false;
        int v[4];
        for (int k = 0; k < 4 - pads; ++k)
            if ((v[k] = value(in[i + k])) < 0) return false;
        const uint32_t n = (v[0] << 18) | (v[1] << 12) | ((pads < 2 ? v[2] : 0) << 6) | (pads < 1 ? v[3] : 0);
        out += static_cast<char>(n >> 16);
        if (pads < 2) out += static_cast<char>((n >> 8) & 0xFF);
        if (pads < 1) out += static_cast<char>(n & 0xFF);
    }
    return true;
}

}  // namespace

T5Tokenizer::T5Tokenizer(const std::string& json_text, const std::string& where) {
    json::Value root;
    try {
        root = json::parse(json_text);
    } catch (const json::ParseError& e) { bad(where, e.what()); }
    std::string charsmap;
    try {
        if (root.kind != json::Value::Kind::Object) bad(where, "must be a JSON object");
        if (json::string_field(root, "format", "") != "slimengine-unigram")
            bad(where, "format is not slimengine-unigram (re-export the bundle with this version's export-engine)");
        const json::Value& pieces = json::array_field(root, "pieces", "");
        if (pieces.array.empty() || pieces.array.size() > kMaxVocabSize)
            bad(where,
                "pieces has " + std::to_string(pieces.array.size()) + " entries; 1 to " + std::to_string(kMaxVocabSize) + " are accepted");
        const int64_t size = static_cast<int64_t>(pieces.array.size());
        const int64_t ids = size + kMaxT5AddedTokens;  // T5's <extra_id_N> may follow the pieces (32000 to 32099)
        node_piece_.push_back(-1);
        double min_score = std::numeric_limits<double>::infinity();
        for (size_t i = 0; i < pieces.array.size(); ++i) {
            const json::Value& p = pieces.array[i];
            const std::string w = "pieces[" + std::to_string(i) + "]";
            if (p.kind != json::Value::Kind::Array || p.array.size() != 2 || p.array[0].kind != json::Value::Kind::String)
                bad(where, w + " must be a [piece, score] pair");
            const std::string& piece = p.array[0].string;
            const double score = json::as_number(p.array[1], w + " score");
            if (piece.empty() || piece.size() > kMaxTokenBytes) bad(where, w + " must be 1 to 1024 bytes");
            if (!ids_.emplace(piece, static_cast<int32_t>(i)).second) bad(where, w + " repeats an earlier piece");
            scores_.push_back(score);
            min_score = std::min(min_score, score);
            size_t node = 0;
            for (const char ch : piece) {
                const uint64_t key = static_cast<uint64_t>(node) << 8 | static_cast<uint8_t>(ch);
                const auto [it, fresh] = children_.emplace(key, static_cast<int32_t>(node_piece_.size()));
                if (fresh) node_piece_.push_back(-1);
                node = static_cast<size_t>(it->second);
            }
            node_piece_[node] = static_cast<int32_t>(i);
        }
        root_children_.fill(-1);
        for (const auto& [key, child] : children_)
            if (key >> 8 == 0) root_children_[key & 0xFF] = child;
        unk_score_ = min_score - 10.0;  // the tokenizers library's (and SentencePiece's) unknown-character penalty
        unk_ = static_cast<int32_t>(json::as_int64(json::field(root, "unk_id", ""), "unk_id", 0, size - 1));
        if (!decode_base64(json::string_field(root, "charsmap", ""), charsmap)) bad(where, "charsmap is not base64");
        const json::Value& added = json::array_field(root, "added_tokens", "");
        if (added.array.size() > kMaxT5AddedTokens) bad(where, "more than " + std::to_string(kMaxT5AddedTokens) + " added_tokens");
        for (size_t i = 0; i < added.array.size(); ++i) {
            const std::string w = "added_tokens[" + std::to_string(i) + "]";
            const json::Value& t = added.array[i];
            if (t.kind != json::Value::Kind::Object) bad(where, w + " must be an object {content, id}");
            const std::string content = json::string_field(t, "content", w);
            const auto id = static_cast<int32_t>(json::as_int64(json::field(t, "id", w), w + ".id", 0, ids - 1));
            if (content.empty() || content.size() > kMaxAddedTokenBytes)
                bad(where, w + ".content must be 1 to " + std::to_string(kMaxAddedTokenBytes) + " bytes");
            if (!added_.add(content, id)) bad(where, w + " repeats an earlier added token");
        }
        eos_ = static_cast<int32_t>(json::as_int64(json::field(root, "eos_id", ""), "eos_id", 0, ids - 1));
        pad_ = static_cast<int32_t>(json::as_int64(json::field(root, "pad_id", ""), "pad_id", 0, ids - 1));
    } catch (const json::FieldError& e) { bad(where, e.what()); }
    // SentencePiece's charsmap layout: the double array's size in bytes (uint32, little-endian), the array, the strings.
    if (charsmap.size() < 4) bad(where, "charsmap is shorter than its header");
    const uint32_t trie_bytes = static_cast<uint8_t>(charsmap[0]) | static_cast<uint8_t>(charsmap[1]) << 8 |
                                static_cast<uint8_t>(charsmap[2]) << 16 | static_cast<uint32_t>(static_cast<uint8_t>(charsmap[3])) << 24;
    if (trie_bytes % 4 || trie_bytes == 0 || trie_bytes > charsmap.size() - 4) bad(where, "charsmap's trie size does not fit it");
    charsmap_trie_.resize(trie_bytes / 4);
    for (size_t i = 0; i < charsmap_trie_.size(); ++i)
        for (int b = 3; b >= 0; --b) charsmap_trie_[i] = charsmap_trie_[i] << 8 | static_cast<uint8_t>(charsmap[4 + 4 * i + b]);
    replacements_ = charsmap.substr(4 + trie_bytes);
    // Replacements are short (T5's longest is 33 bytes): a charsmap expanding each character into kilobytes would make
    // a 64 KiB prompt megabytes of text.
    for (size_t begin = 0; begin < replacements_.size();) {
        const size_t end = replacements_.find('\0', begin);
        if (end == std::string::npos) bad(where, "charsmap's last replacement string has no NUL terminator");
        if (end - begin > kMaxReplacementBytes)
            bad(where, "charsmap has a replacement of " + std::to_string(end - begin) + " bytes; at most " +
                           std::to_string(kMaxReplacementBytes) + " are accepted");
        begin = end + 1;
    }
    for (int c = 0; c < 0x80; ++c) ascii_mapped_[c] = charsmap_match(std::string(1, static_cast<char>(c))) != nullptr;
}

const char* T5Tokenizer::charsmap_match(const std::string& key) const {
    // darts-clone's unit: label (bits 0-7 and 31), has_leaf (bit 8), offset (bits 10-31, shifted by 8 when bit 9).
    auto offset = [](uint32_t unit) { return (unit >> 10) << ((unit & (1u << 9)) >> 6); };
    size_t node = offset(charsmap_trie_[0]);
    for (const char ch : key) {
        const auto c = static_cast<uint8_t>(ch);
        node ^= c;
        if (node >= charsmap_trie_.size()) return nullptr;
        const uint32_t unit = charsmap_trie_[node];
        if ((unit & ((1u << 31) | 0xFF)) != c) return nullptr;
        node ^= offset(unit);
        if (node >= charsmap_trie_.size()) return nullptr;
        if ((unit >> 8) & 1) {  // the shortest match: the tokenizers library takes the first
            const size_t value = charsmap_trie_[node] & ((1u << 31) - 1);
            return value < replacements_.size() ? replacements_.c_str() + value : nullptr;
        }
    }
    return nullptr;
}

void T5Tokenizer::normalize_cluster(const char32_t* begin, const char32_t* end, std::u32string& out) const {
    if (end - begin == 1 && *begin < 0x80 && !ascii_mapped_[*begin]) {  // most of a prompt: ASCII the charsmap keeps
        out += *begin;
        return;
    }
    std::string cluster;
    for (const char32_t* c = begin; c != end; ++c) unicode::append_utf8(*c, cluster);
    const char* whole = cluster.size() < 6 ? charsmap_match(cluster) : nullptr;
    std::string mapped;
    if (whole) {
        mapped = whole;
    } else {
        for (const char32_t* c = begin; c != end; ++c) {
            std::string one;
            unicode::append_utf8(*c, one);
            const char* replacement = charsmap_match(one);
            mapped += replacement ? replacement : one;
        }
    }
    out += unicode::decode_utf8(mapped);
}

void T5Tokenizer::unigram(const std::string& piece, std::vector<int64_t>& out) const {
    // Viterbi forward pass over byte positions (the tokenizers library's encode_optimized): the best path ending at
    // each position, extended by every vocabulary piece that starts there, or by one unknown character when no piece
    // of exactly one character does. Ties keep the earlier candidate.
    struct Best {
        int32_t id = -1;
        double score = 0;
        int64_t start = -1;
    };
    const size_t n = piece.size();
    std::vector<Best> best(n + 1);
    for (size_t start = 0; start < n;) {
        const auto lead = static_cast<uint8_t>(piece[start]);
        const size_t char_len = std::min<size_t>(lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4, n - start);
        const double here = best[start].score;
        bool single = false;
        size_t node = 0;
        for (size_t end = start; end < n;) {
            const auto byte = static_cast<uint8_t>(piece[end]);
            if (node == 0) {  // most walks end one or two bytes from the root: its children are an array
                if (root_children_[byte] < 0) break;
                node = static_cast<size_t>(root_children_[byte]);
            } else {
                const auto it = children_.find(static_cast<uint64_t>(node) << 8 | byte);
                if (it == children_.end()) break;
                node = static_cast<size_t>(it->second);
            }
            ++end;
            const int32_t id = node_piece_[node];
            if (id < 0) continue;
            const double score = here + scores_[id];
            if (best[end].start < 0 || score > best[end].score) best[end] = {id, score, static_cast<int64_t>(start)};
            if (end - start == char_len) single = true;
        }
        if (!single) {
            const double score = here + unk_score_;
            Best& b = best[start + char_len];
            if (b.start < 0 || score > b.score) b = {unk_, score, static_cast<int64_t>(start)};
        }
        start += char_len;
    }
    // Back from the end: a run of unknowns fuses into one token, whose text (as every token's) is looked up as a
    // piece, the unk id when it is none, as the tokenizers library does.
    std::vector<std::pair<size_t, size_t>> spans;  // [start, end) of each token, last first
    bool after_unknown = false;
    for (size_t end = n; end > 0; end = static_cast<size_t>(best[end].start)) {
        const size_t begin = static_cast<size_t>(best[end].start);
        const bool unknown = best[end].id == unk_;
        if (unknown && after_unknown)
            spans.back().first = begin;
        else
            spans.emplace_back(begin, end);
        after_unknown = unknown;
    }
    for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        const auto found = ids_.find(piece.substr(it->first, it->second - it->first));
        out.push_back(found == ids_.end() ? unk_ : found->second);
    }
}

std::vector<int64_t> T5Tokenizer::encode(const std::string& text, int max_length) const {
    const size_t room = static_cast<size_t>(max_length) - 1;  // ids before eos
    std::vector<int64_t> ids;
    // A word (no White_Space): a leading U+2581 unless it has one, then a piece from each U+2581 on (Metaspace).
    auto encode_word = [&](const char32_t* begin, const char32_t* end) {
        std::string piece = *begin == U'\u2581' ? "" : "\u2581";
        for (const char32_t* c = begin; c != end && ids.size() < room; ++c) {
            if (*c == U'\u2581' && !piece.empty()) {
                unigram(piece, ids);
                piece.clear();
            }
            unicode::append_utf8(*c, piece);
        }
        if (ids.size() < room) unigram(piece, ids);
    };
    // One span between added tokens, normalized cluster by cluster; each word is encoded once the text after it is
    // normalized, so a long prompt stops being read once max_length ids are made.
    auto encode_span = [&](size_t begin, size_t end) {
        const std::u32string span = unicode::decode_utf8(text.substr(begin, end - begin));
        std::u32string pending;  // normalized text not encoded yet: at most the last, unfinished word
        auto encode_words = [&](bool last) {
            size_t i = 0;
            while (i < pending.size() && ids.size() < room) {
                if (unicode::is_space(pending[i])) {
                    ++i;
                    continue;
                }
                size_t j = i;
                while (j < pending.size() && !unicode::is_space(pending[j])) ++j;
                if (j == pending.size() && !last) break;  // may go on in the next cluster
                encode_word(pending.data() + i, pending.data() + j);
                i = j;
            }
            pending.erase(0, i);
        };
        for (size_t start = 0; start < span.size() && ids.size() < room;) {
            const size_t cluster_end = unicode::grapheme_end(span, start);
            const size_t before = pending.size();
            normalize_cluster(span.data() + start, span.data() + cluster_end, pending);
            if (pending.size() > kMaxNormalizedWord)
                throw Error(SLIM_ERR_INVALID_ARGUMENT, "prompt: the T5 tokenizer's charsmap makes a word of over " +
                                                           std::to_string(kMaxNormalizedWord) + " characters of it");
            if (std::any_of(pending.begin() + before, pending.end(), unicode::is_space)) encode_words(false);
            start = cluster_end;
        }
        encode_words(true);
    };
    // Added tokens: at each position the longest that starts there, scanning left to right (LeftmostLongest).
    size_t start = 0;
    for (size_t i = 0; i < text.size() && ids.size() < room;) {
        const auto [length, id] = added_.longest(text.data(), text.size(), i);
        if (!length) {
            ++i;
            continue;
        }
        encode_span(start, i);
        ids.push_back(id);
        i += length;
        start = i;
    }
    if (ids.size() < room) encode_span(start, text.size());
    ids.resize(std::min(ids.size(), room));
    ids.push_back(eos_);
    ids.resize(max_length, pad_);
    return ids;
}

}  // namespace slim
