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
            // from_chars, not strtod: a host application's LC_NUMERIC must not change what 0.5 means.
            const char* begin = s_.data() + pos_;
            v.kind = Value::Kind::Number;
            auto [end, ec] = std::from_chars(begin, s_.data() + s_.size(), v.number);
            if (ec != std::errc() || end == begin) fail("bad number");
            pos_ += static_cast<size_t>(end - begin);
            return v;
        }
        if (consume("NaN") || consume("Infinity") || consume("-Infinity")) fail("non-finite number");
        fail("unexpected character");
    }

    std::string parse_string() {
        ++pos_;  // opening quote
        std::string out;
        while (pos_ < s_.size()) {
            char c = s_[pos_++];
            if (c == '"') return out;
            if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
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
                    if (pos_ + 4 > s_.size()) fail("bad \\u escape");
                    unsigned code = std::stoul(s_.substr(pos_, 4), nullptr, 16);
                    pos_ += 4;
                    // Manifests are ASCII in practice; encode the BMP code point as UTF-8.
                    if (code < 0x80)
                        out += static_cast<char>(code);
                    else if (code < 0x800) {
                        out += static_cast<char>(0xC0 | (code >> 6));
                        out += static_cast<char>(0x80 | (code & 0x3F));
                    } else {
                        out += static_cast<char>(0xE0 | (code >> 12));
                        out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
                        out += static_cast<char>(0x80 | (code & 0x3F));
                    }
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
