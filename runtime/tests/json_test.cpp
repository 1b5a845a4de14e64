// The JSON reader's corpus: valid and invalid documents, seeded random mutations, deep nesting and a
// linear-time bound. Built and run by tests/test_json.py (also a CMake target, slim-json-test).
//
//   json_test                 run the corpus; prints "N passed, M failed", exit 0 when none failed
//   json_test --classify F    F holds documents as <decimal length>\n<bytes>; prints one line per
//                             document: "ok" or "error <message>" (for the differential test in Python)
#include "json.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

using slim::json::Value;

namespace {

int passed = 0, failed = 0;

void check(bool ok, const std::string& what) {
    if (ok) {
        ++passed;
    } else {
        ++failed;
        std::cout << "FAIL: " << what << "\n";
    }
}

// "" when `text` parses, else the ParseError's message; any other exception is a failure of its own.
std::string error_of(const std::string& text) {
    try {
        slim::json::parse(text);
        return "";
    } catch (const slim::json::ParseError& e) { return e.what(); } catch (const std::exception& e) {
        return std::string("NOT A ParseError: ") + e.what();
    }
}

void valid(const std::string& text) {
    const std::string err = error_of(text);
    check(err.empty(), "valid document refused: " + text.substr(0, 60) + " (" + err + ")");
}

void invalid(const std::string& text, const std::string& message) {
    const std::string err = error_of(text);
    check(err.rfind("json: ", 0) == 0 && err.find(message) != std::string::npos,
          "invalid document " + text.substr(0, 60) + " gave '" + err + "', expected '" + message + "'");
}

std::string string_of(const std::string& text) {
    Value v = slim::json::parse(text);
    return v.kind == Value::Kind::String ? v.string : "<not a string>";
}

double number_of(const std::string& text) { return slim::json::parse(text).number; }

void values() {
    check(string_of(R"("a\"\\\/\b\f\n\r\t")") == "a\"\\/\b\f\n\r\t", "simple escapes");
    check(string_of(R"("\u0041\u00e9\u20AC")") == "A\xC3\xA9\xE2\x82\xAC", "BMP \\u escapes to UTF-8");
    check(string_of(R"("\ud83d\ude00")") == "\xF0\x9F\x98\x80", "a surrogate pair is one 4-byte UTF-8 character");
    check(string_of("\"\xF0\x9F\x98\x80 \xE2\x82\xAC \xC3\xA9\"") == "\xF0\x9F\x98\x80 \xE2\x82\xAC \xC3\xA9", "raw UTF-8 kept");
    check(number_of("0") == 0 && number_of("-0") == 0 && number_of("0.5") == 0.5 && number_of("-12.5e2") == -1250, "numbers");
    check(number_of("1E+2") == 100 && number_of("1e-2") == 0.01 && number_of("123456789") == 123456789, "exponents");
    check(number_of("4.9e-324") > 0, "the smallest denormal");
    Value o = slim::json::parse(R"( {"b": [1, true, null, {"c": "d"}], "a": false} )");
    check(o.kind == Value::Kind::Object && o.object.size() == 2 && o.object[0].first == "b" && o.find("a") && !o.find("c"),
          "object in document order");
    check(o.find("b")->array.size() == 4 && o.find("b")->array[3].find("c")->string == "d", "nested values");
}

void corpus() {
    for (const char* doc : {"{}", "[]", "0", "-0", "\"\"", "true", "false", "null", " \t\r\n[ 1 , 2 ]\n", "{\"a\":{\"a\":1}}",
                            "[1e5, 1E-5, 0.0, -0.0e0]", "{\"\": 1}", "[\"\\ud800\\udc00\"]", "{\"a\": 1, \"b\": 1}"})
        valid(doc);
    const std::vector<std::pair<std::string, std::string>> bad = {
        {"", "unexpected end"},
        {"   ", "unexpected end"},
        {"[1,]", "unexpected character"},
        {"[1 2]", "expected ',' or ']'"},
        {"{\"a\" 1}", "expected ':'"},
        {"{\"a\": 1,}", "expected a key"},
        {"{a: 1}", "expected a key"},
        {"{\"a\": 1} x", "trailing characters"},
        {"{\"a\": 1, \"a\": 2}", "duplicate key \"a\""},
        {"{\"x\": {\"k\": 1, \"j\": 2, \"k\": 3}}", "duplicate key \"k\""},
        {"{\"\\u0061\": 1, \"a\": 2}", "duplicate key \"a\""},  // the same key, spelt differently
        {"\"abc", "unterminated string"},
        {"\"a\\", "unterminated string"},
        {"\"a\nb\"", "control character in string"},
        {"\"\\x41\"", "bad escape"},
        {"\"a\\u0000b\"", "\\u0000 in a string"},
        {"\"\\uZZZZ\"", "bad \\u escape"},
        {"\"\\u12\"", "bad \\u escape"},
        {"\"\\u12", "bad \\u escape"},
        {"\"\\u+123\"", "bad \\u escape"},
        {"\"\\u 123\"", "bad \\u escape"},
        {"\"\\ud800\"", "unpaired surrogate"},
        {"\"\\ud800\\u0041\"", "unpaired surrogate"},
        {"\"\\ud800x\"", "unpaired surrogate"},
        {"\"\\udc00\"", "unpaired surrogate"},
        {"\"\\udbff\\udbff\"", "unpaired surrogate"},
        {"01", "leading zero"},
        {"-01", "leading zero"},
        {"[00]", "leading zero"},
        {"+1", "unexpected character"},
        {".5", "unexpected character"},
        {"1.", "digits must follow '.'"},
        {"1.e5", "digits must follow '.'"},
        {"1e", "digits must follow the exponent"},
        {"1e+", "digits must follow the exponent"},
        {"-", "bad number"},
        {"- 1", "bad number"},
        {"NaN", "unexpected character"},
        {"-NaN", "bad number"},
        {"nan", "unexpected character"},
        {"Infinity", "unexpected character"},
        {"-Infinity", "bad number"},
        {"-inf", "bad number"},
        {"inf", "unexpected character"},
        {"0x10", "trailing characters"},
        {"1e999", "outside double's range"},
        {"-1e999", "outside double's range"},
        {"1e-999", "outside double's range"},
        {"[1" + std::string(400, '0') + "]", "outside double's range"},
        {"tru", "unexpected character"},
        {"nul", "unexpected character"},
        {"True", "unexpected character"},
        {"\xEF\xBB\xBF{}", "unexpected character"},  // a byte-order mark
        {"\"\x80\"", "invalid UTF-8"},               // a lone continuation byte
        {"\"\xC0\xAF\"", "invalid UTF-8"},           // overlong '/'
        {"\"\xC1\xBF\"", "invalid UTF-8"},           // overlong
        {"\"\xE0\x80\xAF\"", "invalid UTF-8"},       // overlong 3-byte
        {"\"\xF0\x80\x80\xAF\"", "invalid UTF-8"},   // overlong 4-byte
        {"\"\xED\xA0\x80\"", "invalid UTF-8"},       // an encoded surrogate (CESU-8)
        {"\"\xF4\x90\x80\x80\"", "invalid UTF-8"},   // past U+10FFFF
        {"\"\xF5\x80\x80\x80\"", "invalid UTF-8"},
        {"\"\xFF\"", "invalid UTF-8"},
        {"\"\xC3\"", "invalid UTF-8"},  // truncated sequence at the end of the string
        {"\"\xE2\x82\"", "invalid UTF-8"},
        {std::string("\"a\0b\"", 5), "control character in string"},
        {"\xC3\xA9", "unexpected character"},  // non-ASCII outside a string
    };
    for (const auto& [doc, message] : bad) invalid(doc, message);
}

void depth() {
    const int limit = slim::json::kMaxDepth;
    valid(std::string(limit, '[') + std::string(limit, ']'));
    invalid(std::string(limit + 1, '[') + std::string(limit + 1, ']'), "nesting deeper than 64");
    std::string objects;
    for (int i = 0; i < limit + 1; ++i) objects += "{\"a\":";
    invalid(objects + "1" + std::string(limit + 1, '}'), "nesting deeper than 64");
    // A million open brackets: refused at the limit, long before the stack could overflow.
    invalid(std::string(1000000, '['), "nesting deeper than 64");
}

// The best of three runs: a shared machine's noise only ever adds time.
double seconds_to_parse(const std::string& text) {
    double best = 1e30;
    for (int run = 0; run < 3; ++run) {
        const auto start = std::chrono::steady_clock::now();
        slim::json::parse(text);
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    return best;
}

// Linear time: 100k elements parse in well under a second, and 4x the input takes about 4x as long
// (a quadratic step would take 16x; generous bounds for a shared, slow machine and sanitizer builds).
void linear_time() {
    const auto array = [](int n) {
        std::string s = "[";
        for (int i = 0; i < n; ++i) s += (i ? "," : "") + std::string("{\"name\": \"block_") + std::to_string(i) + "\", \"x\": 1.5}";
        return s + "]";
    };
    const auto object = [](int n) {
        std::string s = "{";
        for (int i = 0; i < n; ++i) s += (i ? ",\"" : "\"") + std::string("stages/block_") + std::to_string(i) + ".onnx\": 1";
        return s + "}";
    };
    const auto long_string = [](int n) { return "\"" + std::string(static_cast<size_t>(n) * 40, 'x') + "\\u00e9\""; };
    for (const auto& [what, make] :
         std::vector<std::pair<std::string, std::string (*)(int)>>{{"array", +array}, {"object", +object}, {"string", +long_string}}) {
        const double small = seconds_to_parse(make(100000)), big = seconds_to_parse(make(400000));
        std::printf("linear time: %s of 100k in %.3f s, 400k in %.3f s\n", what.c_str(), small, big);
        check(small < 2.0, what + " of 100k elements parsed in " + std::to_string(small) + " s (bound 2 s)");
        check(big < 10 * small + 0.05, what + ": 4x the input took " + std::to_string(big / small) + "x as long (quadratic?)");
    }
}

// Seeded random mutations of valid documents: each must parse or fail with a ParseError, never crash
// or throw anything else (the sanitizer build catches out-of-bounds reads).
void mutations() {
    const std::vector<std::string> seeds = {
        R"({"format": "slimengine-bundle", "format_version": 2, "files": {"stages/a.onnx": {"sha256": "ab", "size": 12}}})",
        R"({"kind": "xslim", "mode": "online", "early_warning": 0.05, "schedule": [{"level": "full"}, {"level": "token", "sample_ratio": 0.5}]})",
        R"(["\u00e9\ud83d\ude00", -0.5e-3, 12, true, false, null, {"": []}, "\\\"/"])",
        "{\"caf\xC3\xA9\": \"\xF0\x9F\x98\x80\", \"n\": [1, [2, [3, [4]]]]}",
    };
    const std::string alphabet = "{}[]\":,\\u0123456789abcdefABCDEF.eE+- \n\t\r\x80\xBF\xC3\xED\xF0\xF4\xFFtrunlsfaNI";
    std::mt19937 rng(20240611);
    int ok = 0, refused = 0;
    for (int iter = 0; iter < 20000; ++iter) {
        std::string doc = seeds[rng() % seeds.size()];
        const int edits = 1 + static_cast<int>(rng() % 4);
        for (int e = 0; e < edits && !doc.empty(); ++e) {
            const size_t at = rng() % doc.size();
            switch (rng() % 5) {
                case 0:
                    doc[at] = alphabet[rng() % alphabet.size()];
                    break;
                case 1:
                    doc.insert(doc.begin() + static_cast<long>(at), alphabet[rng() % alphabet.size()]);
                    break;
                case 2:
                    doc.erase(at, 1 + rng() % 3);
                    break;
                case 3:
                    doc.insert(at, doc.substr(rng() % doc.size(), 1 + rng() % 8));
                    break;
                default:
                    doc.resize(at);
                    break;
            }
        }
        try {
            slim::json::parse(doc);
            ++ok;
        } catch (const slim::json::ParseError&) { ++refused; } catch (const std::exception& ex) {
            check(false, "mutated document threw a non-ParseError: " + std::string(ex.what()));
        }
    }
    std::printf("mutations: %d parsed, %d refused\n", ok, refused);
    check(ok > 0 && refused > 0, "mutations reach both outcomes");
}

int classify(const char* path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        std::cerr << "cannot open " << path << "\n";
        return 2;
    }
    std::stringstream buffer;
    buffer << in.rdbuf();
    const std::string all = buffer.str();
    size_t pos = 0;
    while (pos < all.size()) {
        const size_t newline = all.find('\n', pos);
        const size_t length = std::stoul(all.substr(pos, newline - pos));
        const std::string err = error_of(all.substr(newline + 1, length));
        std::cout << (err.empty() ? "ok" : "error " + err) << "\n";
        pos = newline + 1 + length;
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc == 3 && std::string(argv[1]) == "--classify") return classify(argv[2]);
    values();
    corpus();
    depth();
    mutations();
    linear_time();
    std::printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
