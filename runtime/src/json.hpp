// A small strict JSON reader for manifest.json (objects, arrays, strings, numbers, bools, null).
#pragma once

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

}  // namespace slim::json
