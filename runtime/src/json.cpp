#include "json.hpp"

#include <charconv>
#include <cmath>
#include <unordered_set>

namespace slim::json {

const Value* Value::find(const std::string& key) const {
    if (kind != Kind::Object) return nullptr;
    for (const auto& [k, v] : object)
        if (k == key) return &v;
    return nullptr;
}

namespace {

bool is_digit(char c) { return c >= '0' && c <= '9'; }

int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

void append_utf8(std::string& out, unsigned code) {
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

// `text` for an error message: printable ASCII as is, other bytes as \xNN, at most 80 bytes of it.
std::string printable(const std::string& text) {
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (size_t i = 0; i < text.size() && i < 80; ++i) {
        const unsigned char c = static_cast<unsigned char>(text[i]);
        if (c >= 0x20 && c < 0x7F) {
            out += static_cast<char>(c);
        } else {
            out += "\\x";
            out += hex[c >> 4];
            out += hex[c & 15];
        }
    }
    return text.size() > 80 ? out + "..." : out;
}

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
    const std::string& s_;
    size_t pos_ = 0;

    [[noreturn]] void fail(const std::string& what) const { throw ParseError("json: " + what + " at offset " + std::to_string(pos_)); }
    bool at(char c) const { return pos_ < s_.size() && s_[pos_] == c; }
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
        skip_ws();
        if (pos_ >= s_.size()) fail("unexpected end");
        const char c = s_[pos_];
        if (c == '{' || c == '[') {
            if (depth >= kMaxDepth) fail("nesting deeper than " + std::to_string(kMaxDepth));
            return c == '{' ? parse_object(depth) : parse_array(depth);
        }
        Value v;
        if (c == '"') {
            v.kind = Value::Kind::String;
            v.string = parse_string();
        } else if (consume("true")) {
            v.kind = Value::Kind::Bool;
            v.boolean = true;
        } else if (consume("false")) {
            v.kind = Value::Kind::Bool;
        } else if (consume("null")) {
        } else if (c == '-' || is_digit(c)) {
            v.kind = Value::Kind::Number;
            v.number = parse_number();
        } else {
            fail("unexpected character");  // NaN, Infinity, +1, .5, a byte-order mark, ...
        }
        return v;
    }

    Value parse_object(int depth) {
        Value v;
        v.kind = Value::Kind::Object;
        ++pos_;  // {
        skip_ws();
        if (at('}')) {
            ++pos_;
            return v;
        }
        std::unordered_set<std::string> keys;
        while (true) {
            skip_ws();
            if (!at('"')) fail("expected a key");
            const size_t key_at = pos_;
            std::string key = parse_string();
            if (!keys.insert(key).second) {
                pos_ = key_at;
                fail("duplicate key \"" + printable(key) + "\"");
            }
            skip_ws();
            if (!at(':')) fail("expected ':'");
            ++pos_;
            v.object.emplace_back(std::move(key), parse_value(depth + 1));
            skip_ws();
            if (at(',')) {
                ++pos_;
                continue;
            }
            if (at('}')) {
                ++pos_;
                return v;
            }
            fail("expected ',' or '}'");
        }
    }

    Value parse_array(int depth) {
        Value v;
        v.kind = Value::Kind::Array;
        ++pos_;  // [
        skip_ws();
        if (at(']')) {
            ++pos_;
            return v;
        }
        while (true) {
            v.array.push_back(parse_value(depth + 1));
            skip_ws();
            if (at(',')) {
                ++pos_;
                continue;
            }
            if (at(']')) {
                ++pos_;
                return v;
            }
            fail("expected ',' or ']'");
        }
    }

    // -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? checked here; from_chars (not strtod: a host
    // application's LC_NUMERIC must not change what 0.5 means) converts exactly that span.
    double parse_number() {
        const size_t start = pos_;
        if (at('-')) ++pos_;
        if (at('0')) {
            ++pos_;
            if (pos_ < s_.size() && is_digit(s_[pos_])) fail("number with a leading zero");
        } else if (pos_ < s_.size() && is_digit(s_[pos_])) {
            while (pos_ < s_.size() && is_digit(s_[pos_])) ++pos_;
        } else {
            fail("bad number");  // "-", "-Infinity", "-NaN"
        }
        if (at('.')) {
            ++pos_;
            if (!(pos_ < s_.size() && is_digit(s_[pos_]))) fail("bad number: digits must follow '.'");
            while (pos_ < s_.size() && is_digit(s_[pos_])) ++pos_;
        }
        if (at('e') || at('E')) {
            ++pos_;
            if (at('+') || at('-')) ++pos_;
            if (!(pos_ < s_.size() && is_digit(s_[pos_]))) fail("bad number: digits must follow the exponent");
            while (pos_ < s_.size() && is_digit(s_[pos_])) ++pos_;
        }
        double number = 0;
        const char* begin = s_.data() + start;
        const char* end = s_.data() + pos_;
        auto [stop, ec] = std::from_chars(begin, end, number);
        if (ec == std::errc::result_out_of_range || (ec == std::errc() && !std::isfinite(number))) {
            pos_ = start;
            fail("bad number: outside double's range");
        }
        if (ec != std::errc() || stop != end) {
            pos_ = start;
            fail("bad number");
        }
        return number;
    }

    unsigned parse_hex4() {
        if (pos_ + 4 > s_.size()) fail("bad \\u escape: 4 hex digits expected");
        unsigned code = 0;
        for (int i = 0; i < 4; ++i) {
            const int h = hex_value(s_[pos_ + i]);
            if (h < 0) fail("bad \\u escape: 4 hex digits expected");
            code = code << 4 | static_cast<unsigned>(h);
        }
        pos_ += 4;
        return code;
    }

    // One UTF-8 sequence starting at pos_ (a byte >= 0x80), checked (RFC 3629: no overlong forms, no
    // surrogates, nothing past U+10FFFF) and appended to `out`.
    void copy_utf8(std::string& out) {
        const auto byte = [&](size_t i) { return pos_ + i < s_.size() ? static_cast<unsigned char>(s_[pos_ + i]) : 0u; };
        const unsigned b0 = byte(0);
        size_t n = 0;
        unsigned lo = 0x80, hi = 0xBF;  // range of the second byte
        if (b0 >= 0xC2 && b0 <= 0xDF) {
            n = 2;
        } else if (b0 >= 0xE0 && b0 <= 0xEF) {
            n = 3;
            if (b0 == 0xE0) lo = 0xA0;
            if (b0 == 0xED) hi = 0x9F;
        } else if (b0 >= 0xF0 && b0 <= 0xF4) {
            n = 4;
            if (b0 == 0xF0) lo = 0x90;
            if (b0 == 0xF4) hi = 0x8F;
        } else {
            fail("invalid UTF-8 in string");
        }
        if (byte(1) < lo || byte(1) > hi) fail("invalid UTF-8 in string");
        for (size_t i = 2; i < n; ++i)
            if (byte(i) < 0x80 || byte(i) > 0xBF) fail("invalid UTF-8 in string");
        out.append(s_, pos_, n);
        pos_ += n;
    }

    std::string parse_string() {
        ++pos_;  // opening quote
        std::string out;
        while (pos_ < s_.size()) {
            // The run of plain ASCII up to the next quote, escape, control or non-ASCII byte, in one append.
            size_t run = pos_;
            while (run < s_.size()) {
                const unsigned char c = static_cast<unsigned char>(s_[run]);
                if (c == '"' || c == '\\' || c < 0x20 || c >= 0x80) break;
                ++run;
            }
            out.append(s_, pos_, run - pos_);
            pos_ = run;
            if (pos_ >= s_.size()) break;
            const unsigned char c = static_cast<unsigned char>(s_[pos_]);
            if (c == '"') {
                ++pos_;
                return out;
            }
            if (c < 0x20) fail("control character in string");
            if (c >= 0x80) {
                copy_utf8(out);
                continue;
            }
            ++pos_;  // backslash
            if (pos_ >= s_.size()) break;
            const char e = s_[pos_++];
            switch (e) {
                case '"':
                case '\\':
                case '/':
                    out += e;
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
                    unsigned code = parse_hex4();
                    if (code >= 0xDC00 && code <= 0xDFFF) fail("unpaired surrogate in \\u escape");
                    if (code >= 0xD800 && code <= 0xDBFF) {  // a high surrogate: its low half must follow
                        if (!(pos_ + 1 < s_.size() && s_[pos_] == '\\' && s_[pos_ + 1] == 'u')) fail("unpaired surrogate in \\u escape");
                        pos_ += 2;
                        const unsigned low = parse_hex4();
                        if (low < 0xDC00 || low > 0xDFFF) fail("unpaired surrogate in \\u escape");
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                    }
                    if (code == 0) fail("\\u0000 in a string (names and paths are C strings)");
                    append_utf8(out, code);
                    break;
                }
                default:
                    --pos_;
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

int64_t as_int64(const Value& v, const std::string& where, int64_t min, int64_t max) {
    double d = as_number(v, where);
    if (d != std::floor(d) || d < static_cast<double>(min) || d > static_cast<double>(max) || std::fabs(d) > 9007199254740992.0)
        bad(where, "must be an integer in [" + std::to_string(min) + ", " + std::to_string(max) + "]");
    return static_cast<int64_t>(d);
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
