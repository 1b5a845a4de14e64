#include "unicode_text.hpp"

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <utility>

namespace slim::unicode {
namespace {

struct CodeRange {
    char32_t lo, hi;
};
struct ClassRange {
    char32_t lo, hi;
    uint8_t value;  // a combining class, or packed grapheme properties
};
struct Mapping {
    char32_t code;
    uint16_t offset;
    uint8_t length;
};
struct Composition {
    char32_t first, second, composite;
};

#include "unicode_tables.inc"

template <size_t N>
bool in_ranges(const CodeRange (&ranges)[N], char32_t c) {
    const CodeRange* it = std::upper_bound(ranges, ranges + N, c, [](char32_t v, const CodeRange& r) { return v < r.lo; });
    return it != ranges && c <= (it - 1)->hi;
}

template <size_t N>
const Mapping* find_mapping(const Mapping (&table)[N], char32_t c) {
    const Mapping* it = std::lower_bound(table, table + N, c, [](const Mapping& m, char32_t v) { return m.code < v; });
    return it != table + N && it->code == c ? it : nullptr;
}

uint8_t combining_class(char32_t c) {
    if (c < 0x300) return 0;
    const ClassRange* end = kCombiningClassRanges + std::size(kCombiningClassRanges);
    const ClassRange* it = std::upper_bound(kCombiningClassRanges, end, c, [](char32_t v, const ClassRange& r) { return v < r.lo; });
    return it != kCombiningClassRanges && c <= (it - 1)->hi ? (it - 1)->value : 0;
}

// Hangul syllables decompose and compose by arithmetic (Unicode 3.12).
constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr char32_t kLCount = 19, kVCount = 21, kTCount = 28, kSCount = kLCount * kVCount * kTCount;

char32_t compose(char32_t a, char32_t b) {
    if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
        return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
    if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount) return a + (b - kTBase);
    const Composition* end = kCompositions + std::size(kCompositions);
    const Composition* it =
        std::lower_bound(kCompositions, end, std::make_pair(a, b), [](const Composition& c, const std::pair<char32_t, char32_t>& v) {
            return c.first != v.first ? c.first < v.first : c.second < v.second;
        });
    return it != end && it->first == a && it->second == b ? it->composite : 0;
}

// Grapheme_Cluster_Break values, in the order of tools/gen_unicode_tables.py's GRAPHEME_BREAKS.
enum GraphemeBreak : uint8_t { Other, CR, LF, Control, Extend, ZWJ, RegionalIndicator, Prepend, SpacingMark, L, V, T, LV, LVT };
enum IndicConjunct : uint8_t { NoConjunct, Consonant, ConjunctExtend, Linker };

struct GraphemeProps {
    GraphemeBreak brk;
    bool pictographic;
    IndicConjunct incb;
};

GraphemeProps grapheme_props(char32_t c) {
    const ClassRange* end = kGraphemeRanges + std::size(kGraphemeRanges);
    const ClassRange* it = std::upper_bound(kGraphemeRanges, end, c, [](char32_t v, const ClassRange& r) { return v < r.lo; });
    const uint8_t p = it != kGraphemeRanges && c <= (it - 1)->hi ? (it - 1)->value : 0;
    return {static_cast<GraphemeBreak>(p & 15), ((p >> 4) & 1) != 0, static_cast<IndicConjunct>(p >> 5)};
}

}  // namespace

bool is_letter(char32_t c) { return c < 0x80 ? ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') : in_ranges(kLetterRanges, c); }
bool is_number(char32_t c) { return c < 0x80 ? (c >= '0' && c <= '9') : in_ranges(kNumberRanges, c); }
bool is_space(char32_t c) { return in_ranges(kSpaceRanges, c); }

void append_lowercase(char32_t c, std::u32string& out) {
    if (c < 0x80) {
        out += c >= 'A' && c <= 'Z' ? c + 32 : c;
    } else if (const Mapping* m = find_mapping(kLowercase, c)) {
        out.append(kLowercaseCodes + m->offset, kLowercaseCodes + m->offset + m->length);
    } else {
        out += c;
    }
}

// Unicode normalization form C: canonical decomposition, canonical ordering, canonical composition (UAX #15).
std::u32string nfc(const std::u32string& text) {
    std::u32string d;
    d.reserve(text.size());
    for (char32_t c : text) {
        if (c >= kSBase && c < kSBase + kSCount) {
            const char32_t s = c - kSBase;
            d += kLBase + s / (kVCount * kTCount);
            d += kVBase + (s % (kVCount * kTCount)) / kTCount;
            if (s % kTCount) d += kTBase + s % kTCount;
        } else if (const Mapping* m = c < 0xC0 ? nullptr : find_mapping(kDecompositions, c)) {
            d.append(kDecompositionCodes + m->offset, kDecompositionCodes + m->offset + m->length);
        } else {
            d += c;
        }
    }
    // Canonical ordering: each run of non-starters sorted by combining class, stably.
    for (size_t i = 0; i < d.size();) {
        if (!combining_class(d[i])) {
            ++i;
            continue;
        }
        size_t j = i;
        while (j < d.size() && combining_class(d[j])) ++j;
        std::stable_sort(d.begin() + i, d.begin() + j, [](char32_t a, char32_t b) { return combining_class(a) < combining_class(b); });
        i = j;
    }
    // Composition: a character joins the last starter unless a character of equal or higher class (or a
    // starter) stands between them.
    if (d.empty()) return d;
    size_t starter = 0, out = 1;
    int last_class = combining_class(d[0]) ? 256 : 0;
    for (size_t i = 1; i < d.size(); ++i) {
        const char32_t c = d[i];
        const int cls = combining_class(c);
        const char32_t composite = compose(d[starter], c);
        if (composite && (last_class < cls || last_class == 0)) {
            d[starter] = composite;
            continue;
        }
        if (cls == 0) starter = out;
        last_class = cls;
        d[out++] = c;
    }
    d.resize(out);
    return d;
}

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

std::u32string decode_utf8(const std::string& s) {
    std::u32string out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size();) {
        const auto c = static_cast<unsigned char>(s[i]);
        const size_t extra = c < 0x80 ? 0 : c < 0xE0 ? 1 : c < 0xF0 ? 2 : 3;
        char32_t code = extra == 0 ? c : c & (0x3F >> extra);
        size_t k = 1;
        for (; k <= extra && i + k < s.size() && (static_cast<unsigned char>(s[i + k]) & 0xC0) == 0x80; ++k)
            code = (code << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
        out += k == extra + 1 ? code : 0xFFFD;  // a truncated sequence (only from a hostile charsmap) as U+FFFD
        i += k;
    }
    return out;
}

void append_utf8(char32_t c, std::string& out) {
    if (c < 0x80) {
        out += static_cast<char>(c);
    } else if (c < 0x800) {
        out += static_cast<char>(0xC0 | (c >> 6));
        out += static_cast<char>(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
        out += static_cast<char>(0xE0 | (c >> 12));
        out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (c & 0x3F));
    } else {
        out += static_cast<char>(0xF0 | (c >> 18));
        out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
        out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (c & 0x3F));
    }
}

size_t grapheme_end(const std::u32string& s, size_t start) {
    // UAX #29's rules GB3 to GB999, first match wins; the state carries what GB9c, GB11 and GB12/13 look back at.
    GraphemeProps prev = grapheme_props(s[start]);
    bool pictographic_run = prev.pictographic;                // Extended_Pictographic Extend* up to prev (GB11)
    bool zwj_after_pictographic = false;                      // prev is a ZWJ ending such a run
    int regional = prev.brk == RegionalIndicator;             // regional indicators in a row up to prev (GB12, GB13)
    bool consonant = prev.incb == Consonant, linker = false;  // InCB Consonant [Extend Linker]* with a Linker (GB9c)
    for (size_t i = start + 1; i < s.size(); ++i) {
        const GraphemeProps cur = grapheme_props(s[i]);
        bool join;
        if (prev.brk == CR && cur.brk == LF)
            join = true;  // GB3
        else if (prev.brk == Control || prev.brk == CR || prev.brk == LF)
            join = false;  // GB4
        else if (cur.brk == Control || cur.brk == CR || cur.brk == LF)
            join = false;  // GB5
        else if (prev.brk == L && (cur.brk == L || cur.brk == V || cur.brk == LV || cur.brk == LVT))
            join = true;  // GB6
        else if ((prev.brk == LV || prev.brk == V) && (cur.brk == V || cur.brk == T))
            join = true;  // GB7
        else if ((prev.brk == LVT || prev.brk == T) && cur.brk == T)
            join = true;  // GB8
        else if (cur.brk == Extend || cur.brk == ZWJ || cur.brk == SpacingMark)
            join = true;  // GB9, GB9a
        else if (prev.brk == Prepend)
            join = true;  // GB9b
        else if (cur.incb == Consonant && consonant && linker)
            join = true;  // GB9c
        else if (zwj_after_pictographic && cur.pictographic)
            join = true;  // GB11
        else if (prev.brk == RegionalIndicator && cur.brk == RegionalIndicator)
            join = regional % 2 == 1;  // GB12, GB13
        else
            join = false;  // GB999
        if (!join) return i;
        zwj_after_pictographic = cur.brk == ZWJ && pictographic_run;
        pictographic_run = cur.pictographic || (cur.brk == Extend && pictographic_run);
        regional = cur.brk == RegionalIndicator ? regional + 1 : 0;
        if (cur.incb == Consonant) {
            consonant = true, linker = false;
        } else if (consonant && cur.incb == Linker) {
            linker = true;
        } else if (!(consonant && cur.incb == ConjunctExtend)) {
            consonant = false, linker = false;
        }
        prev = cur;
    }
    return s.size();
}

}  // namespace slim::unicode
