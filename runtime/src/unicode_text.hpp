// The Unicode text processing the native tokenizers share (docs/tokenizers.md), with tables generated off the
// reference tokenizers themselves (tools/gen_unicode_tables.py -> unicode_tables.inc): UTF-8 decoding and encoding,
// character classes, lower case, NFC and extended grapheme clusters.
#pragma once

#include <cstddef>
#include <string>

namespace slim::unicode {

// True when the `length` bytes are well-formed UTF-8 (no overlong forms, surrogates or code points above
// U+10FFFF), as Python's and the tokenizers' decoders require.
bool is_utf8(const char* text, size_t length);

// UTF-8 to code points (prompts are checked well-formed; a truncated sequence becomes U+FFFD), and one code point
// appended as UTF-8.
std::u32string decode_utf8(const std::string& s);
void append_utf8(char32_t c, std::string& out);

// The regex classes \p{L}, \p{N} and \s as the tokenizers library's regex engine matches them; is_space is also
// Unicode's White_Space (Rust's char::is_whitespace).
bool is_letter(char32_t c);
bool is_number(char32_t c);
bool is_space(char32_t c);

// Lower case one code point at a time (Rust's char::to_lowercase, as tokenizers' Lowercase), appended to `out`.
void append_lowercase(char32_t c, std::u32string& out);

// Unicode normalization form C (UAX #15).
std::u32string nfc(const std::u32string& text);

// The end of the extended grapheme cluster (UAX #29, as Rust's unicode-segmentation) that starts at text[start].
size_t grapheme_end(const std::u32string& text, size_t start);

}  // namespace slim::unicode
