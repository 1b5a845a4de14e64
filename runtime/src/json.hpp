// A small strict JSON reader for manifest.json (objects, arrays, strings, numbers, bools, null).
#pragma once

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace slim::json {

struct Value {
    enum class Kind { Null, Bool, Number, String, Array, Object };
    Kind kind = Kind::Null;
    bool boolean = false;
    double number = 0.0;
    std::string string;
    std::vector<Value> array;
    std::vector<std::pair<std::string, Value>> object;

    const Value* find(const std::string& key) const;
    bool is_null() const { return kind == Kind::Null; }
};

// Parses `text`; throws std::runtime_error("json: <what> at offset N") on malformed input.
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
double number_field(const Value& obj, const std::string& key, const std::string& where);
int int_field(const Value& obj, const std::string& key, const std::string& where, int min, int max);
bool bool_field(const Value& obj, const std::string& key, const std::string& where);

}  // namespace slim::json
