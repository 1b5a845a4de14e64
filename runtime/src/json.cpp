#include "json.hpp"

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <stdexcept>

namespace slim::json {

const Value* Value::find(const std::string& key) const {
    if (kind != Kind::Object) return nullptr;
    for (const auto& [k, v] : object)
        if (k == key) return &v;
    return nullptr;
}

namespace {

class Parser {
  public:
    explicit Parser(const std::string& text) : s_(text) {}

    Value parse_document() {
        Value v = parse_value(0);
        skip_ws();
        if (pos_ != s_.size()) fail("trailing characters");
        return v;
    }

  private:
    static constexpr int kMaxDepth = 64;
    const std::string& s_;
    size_t pos_ = 0;

    [[noreturn]] void fail(const char* what) const {
        throw std::runtime_error(std::string("json: ") + what + " at offset " + std::to_string(pos_));
    }
    void skip_ws() {
        while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t')) ++pos_;
    }
    bool consume(const char* word) {
        size_t n = std::char_traits<char>::length(word);
        if (s_.compare(pos_, n, word) != 0) return false;
        pos_ += n;
        return true;
    }

    Value parse_value(int depth) {
        if (depth > kMaxDepth) fail("nesting too deep");
        skip_ws();
        if (pos_ >= s_.size()) fail("unexpected end");
        Value v;
        char c = s_[pos_];
        if (c == '{') {
            v.kind = Value::Kind::Object;
            ++pos_;
            skip_ws();
            if (pos_ < s_.size() && s_[pos_] == '}') {
                ++pos_;
                return v;
            }
            while (true) {
                skip_ws();
                if (pos_ >= s_.size() || s_[pos_] != '"') fail("expected a key");
                std::string key = parse_string();
                skip_ws();
                if (pos_ >= s_.size() || s_[pos_] != ':') fail("expected ':'");
                ++pos_;
                v.object.emplace_back(std::move(key), parse_value(depth + 1));
                skip_ws();
                if (pos_ < s_.size() && s_[pos_] == ',') {
                    ++pos_;
                    continue;
                }
                if (pos_ < s_.size() && s_[pos_] == '}') {
                    ++pos_;
                    return v;
                }
                fail("expected ',' or '}'");
            }
        }
        if (c == '[') {
            v.kind = Value::Kind::Array;
            ++pos_;
            skip_ws();
            if (pos_ < s_.size() && s_[pos_] == ']') {
                ++pos_;
                return v;
            }
            while (true) {
                v.array.push_back(parse_value(depth + 1));
                skip_ws();
                if (pos_ < s_.size() && s_[pos_] == ',') {
                    ++pos_;
                    continue;
                }
                if (pos_ < s_.size() && s_[pos_] == ']') {
                    ++pos_;
                    return v;
                }
                fail("expected ',' or ']'");
            }
        }
        if (c == '"') {
            v.kind = Value::Kind::String;
            v.string = parse_string();
            return v;
        }
        if (consume("true")) {
            v.kind = Value::Kind::Bool;
            v.boolean = true;
            return v;
        }
        if (consume("false")) {
            v.kind = Value::Kind::Bool;
            return v;
        }
        if (consume("null")) return v;
        if (c == '-' || (c >= '0' && c <= '9')) {
            // JSON's number grammar exactly, -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?, as the Python binding's
            // parser reads it ("1." or "01" would open here and fail there). Then from_chars, not strtod: a host
            // application's LC_NUMERIC must not change what 0.5 means.
            const size_t start = pos_;
            auto digits = [&] {
                const size_t from = pos_;
                while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
                return pos_ > from;
            };
            if (s_[pos_] == '-') ++pos_;
            if (pos_ < s_.size() && s_[pos_] == '0')
                ++pos_;
            else if (!digits())
                fail("bad number");
            if (pos_ < s_.size() && s_[pos_] == '.') {
                ++pos_;
                if (!digits()) fail("bad number");
            }
            if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
                ++pos_;
                if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
                if (!digits()) fail("bad number");
            }
            v.kind = Value::Kind::Number;
            const char* end = s_.data() + pos_;
            auto [stop, ec] = std::from_chars(s_.data() + start, end, v.number);
            if (ec != std::errc() || stop != end) {
                pos_ = start;
                fail("bad number");  // out of double's range
            }
            return v;
        }
        if (consume("NaN") || consume("Infinity") || consume("-Infinity")) fail("non-finite number");
        fail("unexpected character");
    }

    // The four hex digits of a \u escape.
    unsigned hex4() {
        if (pos_ + 4 > s_.size()) fail("bad \\u escape");
        unsigned code = 0;
        for (int i = 0; i < 4; ++i) {
            const char h = s_[pos_];
            const int digit = h >= '0' && h <= '9'   ? h - '0'
                              : h >= 'a' && h <= 'f' ? h - 'a' + 10
                              : h >= 'A' && h <= 'F' ? h - 'A' + 10
                                                     : -1;
            if (digit < 0) fail("bad \\u escape");
            code = code * 16 + static_cast<unsigned>(digit);
            ++pos_;
        }
        return code;
    }

    static void append_utf8(std::string& out, unsigned code) {
        if (code < 0x80) {
            out += static_cast<char>(code);
        } else if (code < 0x800) {
            out += static_cast<char>(0xC0 | (code >> 6));
            out += static_cast<char>(0x80 | (code & 0x3F));
        } else if (code < 0x10000) {
            out += static_cast<char>(0xE0 | (code >> 12));
            out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (code & 0x3F));
        } else {
            out += static_cast<char>(0xF0 | (code >> 18));
            out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
            out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (code & 0x3F));
        }
    }

    // One multi-byte UTF-8 character at pos_, copied to `out` if it is valid (no overlong form, no surrogate, <= U+10FFFF).
    void utf8_sequence(std::string& out) {
        const auto byte = [&](size_t i) { return static_cast<unsigned char>(s_[pos_ + i]); };
        const unsigned char lead = byte(0);
        const size_t n = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 0;
        if (n == 0 || lead > 0xF4 || pos_ + n > s_.size()) fail("invalid UTF-8 in string");
        unsigned code = lead & (0x7Fu >> n);
        for (size_t i = 1; i < n; ++i) {
            if ((byte(i) & 0xC0) != 0x80) fail("invalid UTF-8 in string");
            code = (code << 6) | (byte(i) & 0x3F);
        }
        static constexpr unsigned kSmallest[] = {0, 0, 0x80, 0x800, 0x10000};
        if (code < kSmallest[n] || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) fail("invalid UTF-8 in string");
        out.append(s_, pos_, n);
        pos_ += n;
    }

    std::string parse_string() {
        ++pos_;  // opening quote
        std::string out;
        while (pos_ < s_.size()) {
            char c = s_[pos_++];
            if (c == '"') return out;
            if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
            if (static_cast<unsigned char>(c) >= 0x80) {  // JSON text is UTF-8: keep only valid sequences
                --pos_;
                utf8_sequence(out);
                continue;
            }
            if (c != '\\') {
                out += c;
                continue;
            }
            if (pos_ >= s_.size()) break;
            char e = s_[pos_++];
            switch (e) {
                case '"':
                    out += '"';
                    break;
                case '\\':
                    out += '\\';
                    break;
                case '/':
                    out += '/';
                    break;
                case 'b':
                    out += '\b';
                    break;
                case 'f':
                    out += '\f';
                    break;
                case 'n':
                    out += '\n';
                    break;
                case 'r':
                    out += '\r';
                    break;
                case 't':
                    out += '\t';
                    break;
                case 'u': {
                    unsigned code = hex4();
                    if (code >= 0xD800 && code <= 0xDBFF) {  // a UTF-16 surrogate pair: one code point above the BMP
                        if (!consume("\\u")) fail("unpaired surrogate in \\u escape");
                        const unsigned low = hex4();
                        if (low < 0xDC00 || low > 0xDFFF) fail("unpaired surrogate in \\u escape");
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                    } else if (code >= 0xDC00 && code <= 0xDFFF) {
                        fail("unpaired surrogate in \\u escape");
                    }
                    if (code == 0) fail("\\u0000 in a string (names and paths are C strings)");
                    append_utf8(out, code);
                    break;
                }
                default:
                    fail("bad escape");
            }
        }
        fail("unterminated string");
    }
};

}  // namespace

Value parse(const std::string& text) { return Parser(text).parse_document(); }

[[noreturn]] static void bad(const std::string& where, const std::string& what) { throw FieldError(where, what); }

const Value& field(const Value& obj, const std::string& key, const std::string& where) {
    const Value* v = obj.find(key);
    if (!v) bad(where + "." + key, "is missing");
    return *v;
}

const Value& object_field(const Value& obj, const std::string& key, const std::string& where) {
    const Value& v = field(obj, key, where);
    if (v.kind != Value::Kind::Object) bad(where + "." + key, "must be an object");
    return v;
}

const Value& array_field(const Value& obj, const std::string& key, const std::string& where) {
    const Value& v = field(obj, key, where);
    if (v.kind != Value::Kind::Array) bad(where + "." + key, "must be an array");
    return v;
}

std::string string_field(const Value& obj, const std::string& key, const std::string& where) {
    const Value& v = field(obj, key, where);
    if (v.kind != Value::Kind::String) bad(where + "." + key, "must be a string");
    return v.string;
}

double as_number(const Value& v, const std::string& where) {
    if (v.kind != Value::Kind::Number || !std::isfinite(v.number)) bad(where, "must be a finite number");
    return v.number;
}

int as_int(const Value& v, const std::string& where, int min, int max) {
    double d = as_number(v, where);
    if (d != std::floor(d) || d < min || d > max)
        bad(where, "must be an integer in [" + std::to_string(min) + ", " + std::to_string(max) + "], got " + std::to_string(d));
    return static_cast<int>(d);
}

double number_field(const Value& obj, const std::string& key, const std::string& where) {
    return as_number(field(obj, key, where), where + "." + key);
}

int int_field(const Value& obj, const std::string& key, const std::string& where, int min, int max) {
    return as_int(field(obj, key, where), where + "." + key, min, max);
}

bool bool_field(const Value& obj, const std::string& key, const std::string& where) {
    const Value& v = field(obj, key, where);
    if (v.kind != Value::Kind::Bool) bad(where + "." + key, "must be true or false");
    return v.boolean;
}

}  // namespace slim::json
