// A small strict JSON reader (RFC 8259) for manifest.json and request policies.
//
// Hand-written rather than a library on purpose: the documents are small and fixed-shape, the wheel must
// build from PyPI alone (no registry we build from ships a C++ JSON library as a build dependency), and
// the strictness we need is not the libraries' default (duplicate keys, invalid UTF-8, depth). It refuses
// what RFC 8259 leaves open: duplicate object keys, invalid UTF-8 (overlong forms, encoded surrogates,
// code points past U+10FFFF), unpaired surrogate \u escapes, \u0000 (strings become C strings), numbers outside the JSON grammar (leading
// zeros,
// "+1", ".5", "1.", NaN, Infinity with or without a sign) or outside double's range, nesting deeper than
// kMaxDepth, a byte-order mark. Parsing is linear in the input. runtime/tests/json_test.cpp is its corpus.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace slim::json {

constexpr int kMaxDepth = 64;  // arrays/objects nested deeper are refused

struct Value {
    enum class Kind { Null, Bool, Number, String, Array, Object };
    Kind kind = Kind::Null;
    bool boolean = false;
    double number = 0.0;
    std::string string;
    std::vector<Value> array;
    std::vector<std::pair<std::string, Value>> object;  // in document order, keys unique

    const Value* find(const std::string& key) const;
    bool is_null() const { return kind == Kind::Null; }
};

// Malformed input: what() is "json: <what> at offset N".
class ParseError : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

// Parses `text`; throws ParseError on malformed input.
Value parse(const std::string& text);

// A field of the wrong type or value: what() is "<where> <what>", e.g. "program.steps[3].sigma is missing".
// The reader of a document (manifest, request) maps it to its own status code and prefix.
class FieldError : public std::runtime_error {
  public:
    FieldError(const std::string& where, const std::string& what) : std::runtime_error(where + " " + what) {}
};

// Typed field readers; `where` names the object (".config", "program") for the error message.
const Value& field(const Value& obj, const std::string& key, const std::string& where);
const Value& object_field(const Value& obj, const std::string& key, const std::string& where);
const Value& array_field(const Value& obj, const std::string& key, const std::string& where);
std::string string_field(const Value& obj, const std::string& key, const std::string& where);
double as_number(const Value& v, const std::string& where);
int as_int(const Value& v, const std::string& where, int min, int max);
// An integer up to 2^53 (exact in a double), e.g. a file size.
int64_t as_int64(const Value& v, const std::string& where, int64_t min, int64_t max);
double number_field(const Value& obj, const std::string& key, const std::string& where);
int int_field(const Value& obj, const std::string& key, const std::string& where, int min, int max);
bool bool_field(const Value& obj, const std::string& key, const std::string& where);

}  // namespace slim::json
