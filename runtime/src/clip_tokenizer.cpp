#include "clip_tokenizer.hpp"

#include <algorithm>
#include <queue>

#include "error.hpp"
#include "json.hpp"
#include "unicode_text.hpp"

namespace slim {
namespace {

using unicode::append_utf8;
using unicode::decode_utf8;
using unicode::is_letter;
using unicode::is_number;
using unicode::is_space;

// CLIP's normalizer: NFC, every whitespace run to one space, lower case (one code point at a time).
std::u32string normalize(const std::u32string& text) {
    const std::u32string composed = unicode::nfc(text);
    std::u32string out;
    out.reserve(composed.size());
    for (size_t i = 0; i < composed.size(); ++i) {
        if (is_space(composed[i])) {
            out += U' ';
            while (i + 1 < composed.size() && is_space(composed[i + 1])) ++i;
        } else {
            unicode::append_lowercase(composed[i], out);
        }
    }
    return out;
}

bool starts_with(const std::u32string& s, size_t i, const char32_t* literal) {
    for (size_t k = 0; literal[k]; ++k)
        if (i + k >= s.size() || s[i + k] != literal[k]) return false;
    return true;
}

// The length of the contraction ('s 't 're 've 'm 'll 'd) at s[i], or 0.
size_t contraction(const std::u32string& s, size_t i) {
    if (s[i] != U'\'' || i + 1 >= s.size()) return 0;
    for (const char32_t* c : {U"s", U"t", U"re", U"ve", U"m", U"ll", U"d"})
        if (starts_with(s, i + 1, c)) return 1 + std::char_traits<char32_t>::length(c);
    return 0;
}

bool is_other(char32_t c) { return !is_space(c) && !is_letter(c) && !is_number(c); }

// The end of the match starting at s[i] of CLIP's pre-tokenizer regex
//   <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
// (leftmost alternative first, as the regex engine tries them); i itself when none matches (whitespace).
size_t clip_match(const std::u32string& s, size_t i) {
    if (starts_with(s, i, U"<|startoftext|>")) return i + 15;
    if (starts_with(s, i, U"<|endoftext|>")) return i + 13;
    if (const size_t n = contraction(s, i)) return i + n;
    size_t j = i;
    if (is_letter(s[i])) {
        while (j < s.size() && is_letter(s[j])) ++j;
    } else if (is_number(s[i])) {
        ++j;
    } else {
        while (j < s.size() && is_other(s[j])) ++j;
    }
    return j;
}

// The end of the match starting at s[i] of GPT-2's regex (ByteLevel's pre-tokenizer) on text without whitespace:
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+
size_t gpt2_match(const std::u32string& s, size_t i) {
    if (const size_t n = contraction(s, i)) return i + n;
    size_t j = i;
    bool (*same)(char32_t) = is_letter(s[i]) ? is_letter : is_number(s[i]) ? is_number : is_other;
    while (j < s.size() && same(s[j])) ++j;
    return j;
}

// GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the others for U+0100 upwards.
char32_t byte_char(int b) {
    if ((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) return static_cast<char32_t>(b);
    int n = 0;
    for (int k = 0; k < b; ++k)
        if (!((k >= 0x21 && k <= 0x7E) || (k >= 0xA1 && k <= 0xAC) || (k >= 0xAE && k <= 0xFF))) ++n;
    return static_cast<char32_t>(256 + n);
}

[[noreturn]] void bad(const std::string& where, const std::string& what) { throw Error(SLIM_ERR_BUNDLE, where + ": " + what); }

}  // namespace

ClipTokenizer::ClipTokenizer(const std::string& json_text, const std::string& where) {
    json::Value root;
    try {
        root = json::parse(json_text);
    } catch (const json::ParseError& e) { bad(where, e.what()); }
    try {
        if (root.kind != json::Value::Kind::Object) bad(where, "must be a JSON object");
        if (json::string_field(root, "format", "") != "slimengine-clip-bpe")
            bad(where, "format is not slimengine-clip-bpe (re-export the bundle with this version's export-engine)");
        const json::Value& vocab = json::object_field(root, "vocab", "");
        if (vocab.object.empty() || vocab.object.size() > kMaxVocabSize)
            bad(where,
                "vocab has " + std::to_string(vocab.object.size()) + " tokens; 1 to " + std::to_string(kMaxVocabSize) + " are accepted");
        const int64_t size = static_cast<int64_t>(vocab.object.size());
        std::vector<char> seen(vocab.object.size(), 0);
        vocab_.reserve(vocab.object.size());
        for (const auto& [token, id_value] : vocab.object) {  // keys are unique (the JSON reader refuses repeats)
            if (token.empty() || token.size() > kMaxTokenBytes)
                bad(where, "vocab has a token of " + std::to_string(token.size()) + " bytes");
            const int64_t id = json::as_int64(id_value, "vocab['" + token.substr(0, 40) + "']", 0, size - 1);
            if (seen[id]) bad(where, "vocab id " + std::to_string(id) + " is given to two tokens (ids must be unique)");
            seen[id] = 1;
            vocab_.emplace(token, static_cast<int32_t>(id));
        }  // `size` ids, unique, each below `size`: dense
        const json::Value& merges = json::array_field(root, "merges", "");
        if (merges.array.size() > vocab.object.size())
            bad(where, "merges has " + std::to_string(merges.array.size()) + " entries, more than the vocab's " + std::to_string(size) +
                           " tokens");
        merges_.reserve(merges.array.size());
        for (size_t rank = 0; rank < merges.array.size(); ++rank) {
            const json::Value& m = merges.array[rank];
            const std::string w = "merges[" + std::to_string(rank) + "]";
            if (m.kind != json::Value::Kind::Array || m.array.size() != 2 || m.array[0].kind != json::Value::Kind::String ||
                m.array[1].kind != json::Value::Kind::String)
                bad(where, w + " must be a pair of token strings");
            const std::string &left = m.array[0].string, &right = m.array[1].string;
            const auto a = vocab_.find(left), b = vocab_.find(right), merged = vocab_.find(left + right);
            if (a == vocab_.end() || b == vocab_.end() || merged == vocab_.end())
                bad(where, w + " (" + left.substr(0, 40) + " " + right.substr(0, 40) + ") names a token the vocab lacks");
            const uint64_t key = (static_cast<uint64_t>(a->second) << 32) | static_cast<uint32_t>(b->second);
            if (!merges_.emplace(key, std::make_pair(static_cast<int32_t>(rank), merged->second)).second)
                bad(where, w + " repeats an earlier merge");
        }
        const json::Value& added = json::array_field(root, "added_tokens", "");
        if (added.array.size() > kMaxAddedTokens) bad(where, "more than " + std::to_string(kMaxAddedTokens) + " added_tokens");
        for (size_t i = 0; i < added.array.size(); ++i) {
            const std::string w = "added_tokens[" + std::to_string(i) + "]";
            const json::Value& t = added.array[i];
            if (t.kind != json::Value::Kind::Object) bad(where, w + " must be an object {content, id, normalized}");
            const std::string content = json::string_field(t, "content", w);
            const bool normalized = json::bool_field(t, "normalized", w);
            const auto id = static_cast<int32_t>(json::as_int64(json::field(t, "id", w), w + ".id", 0, size - 1));
            if (content.empty() || content.size() > kMaxAddedTokenBytes)
                bad(where, w + ".content must be 1 to " + std::to_string(kMaxAddedTokenBytes) + " bytes");
            // A normalized token is looked for in normalized text, so its content is normalized too (as the tokenizers
            // library does): "<X>" matches "<x>" and "<X>" alike.
            const std::u32string text = normalized ? normalize(decode_utf8(content)) : decode_utf8(content);
            if (!(normalized ? added_normalized_ : added_raw_).add(text, id)) bad(where, w + " repeats an earlier added token");
        }
        auto special = [&](const char* key) { return static_cast<int32_t>(json::as_int64(json::field(root, key, ""), key, 0, size - 1)); };
        bos_ = special("bos_id"), eos_ = special("eos_id"), pad_ = special("pad_id"), unk_ = special("unk_id");
    } catch (const json::FieldError& e) { bad(where, e.what()); }
    for (int b = 0; b < 256; ++b) {
        append_utf8(byte_char(b), byte_symbol_[b]);
        byte_symbol_end_[b] = byte_symbol_[b] + "</w>";
    }
}

// Splits every text span around the added tokens of `tokens`, leftmost match first and the longest at one position
// (the tokenizers library's Aho-Corasick, LeftmostLongest).
void ClipTokenizer::split_added(std::vector<Span>& spans, const TokenTrie<char32_t>& tokens) const {
    if (tokens.empty()) return;
    std::vector<Span> out;
    for (Span& span : spans) {
        if (span.token >= 0) {
            out.push_back(std::move(span));
            continue;
        }
        const std::u32string& s = span.text;
        size_t start = 0;
        for (size_t i = 0; i < s.size();) {
            const auto [length, id] = tokens.longest(s.data(), s.size(), i);
            if (!length) {
                ++i;
                continue;
            }
            if (i > start) out.push_back(Span{s.substr(start, i - start)});
            out.push_back(Span{{}, id});
            i += length;
            start = i;
        }
        if (start < s.size()) out.push_back(Span{s.substr(start)});
    }
    spans = std::move(out);
}

void ClipTokenizer::bpe(const std::u32string& piece, std::vector<int32_t>& out,
                        std::unordered_map<std::u32string, std::vector<int32_t>>& cache) const {
    const auto hit = cache.find(piece);
    if (hit != cache.end()) {
        out.insert(out.end(), hit->second.begin(), hit->second.end());
        return;
    }
    std::string bytes;
    for (char32_t c : piece) append_utf8(c, bytes);
    struct Symbol {
        int32_t id;
        int prev, next;
        bool alive;
    };
    std::vector<Symbol> symbols;
    symbols.reserve(bytes.size());
    for (size_t i = 0; i < bytes.size(); ++i) {
        const auto b = static_cast<unsigned char>(bytes[i]);
        const auto it = vocab_.find(i + 1 == bytes.size() ? byte_symbol_end_[b] : byte_symbol_[b]);
        const int n = static_cast<int>(symbols.size());
        symbols.push_back({it == vocab_.end() ? unk_ : it->second, n - 1, n + 1, true});
    }
    symbols.back().next = -1;
    struct Candidate {
        int32_t rank;
        int pos;
        int32_t merged;
        bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    auto merge_of = [&](int left) -> const std::pair<int32_t, int32_t>* {
        const int right = symbols[left].next;
        if (right < 0) return nullptr;
        const auto it = merges_.find((static_cast<uint64_t>(symbols[left].id) << 32) | static_cast<uint32_t>(symbols[right].id));
        return it == merges_.end() ? nullptr : &it->second;
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
    for (int i = 0; i + 1 < static_cast<int>(symbols.size()); ++i)
        if (const auto* m = merge_of(i)) queue.push({m->first, i, m->second});
    while (!queue.empty()) {
        const Candidate top = queue.top();
        queue.pop();
        Symbol& left = symbols[top.pos];
        const auto* m = left.alive ? merge_of(top.pos) : nullptr;
        if (!m || m->second != top.merged) continue;  // an entry made stale by an earlier merge
        Symbol& right = symbols[left.next];
        left.id = top.merged;
        right.alive = false;
        left.next = right.next;
        if (right.next >= 0) symbols[right.next].prev = top.pos;
        if (left.prev >= 0)
            if (const auto* p = merge_of(left.prev)) queue.push({p->first, left.prev, p->second});
        if (const auto* n = merge_of(top.pos)) queue.push({n->first, top.pos, n->second});
    }
    std::vector<int32_t> ids;
    for (const Symbol& s : symbols)
        if (s.alive) ids.push_back(s.id);
    out.insert(out.end(), ids.begin(), ids.end());
    cache.emplace(piece, std::move(ids));
}

std::vector<int64_t> ClipTokenizer::encode(const std::string& text, int max_length) const {
    const size_t room = static_cast<size_t>(max_length) - 2;  // ids between bos and eos
    std::vector<Span> spans{Span{decode_utf8(text)}};
    split_added(spans, added_raw_);
    for (Span& s : spans)
        if (s.token < 0) s.text = normalize(s.text);
    split_added(spans, added_normalized_);

    std::vector<int32_t> ids;
    std::unordered_map<std::u32string, std::vector<int32_t>> cache;
    for (const Span& span : spans) {
        if (ids.size() >= room) break;
        if (span.token >= 0) {
            ids.push_back(span.token);
            continue;
        }
        const std::u32string& s = span.text;
        for (size_t i = 0; i < s.size() && ids.size() < room;) {
            const size_t end = clip_match(s, i);
            if (end == i) {  // whitespace: removed
                ++i;
                continue;
            }
            const std::u32string piece = s.substr(i, end - i);
            for (size_t j = 0; j < piece.size();) {
                const size_t e = gpt2_match(piece, j);
                bpe(piece.substr(j, e - j), ids, cache);
                j = e;
            }
            i = end;
        }
    }
    std::vector<int64_t> out;
    out.reserve(max_length);
    out.push_back(bos_);
    out.insert(out.end(), ids.begin(), ids.begin() + std::min(ids.size(), room));
    out.push_back(eos_);
    out.resize(max_length, pad_);
    return out;
}

}  // namespace slim
