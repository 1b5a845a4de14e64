// The native tokenizers (runtime/src/clip_tokenizer.cpp, t5_tokenizer.cpp) outside the engine, for
// tests/test_tokenizer.py to run under the sanitizers: hostile tokenizer files and fuzzed prompts.
// Usage: tokenizer_check clip|t5 FILE MAX_LENGTH PROMPTS
//   FILE: a bundle's tokenizer file; PROMPTS: records "<byte count>\n<bytes>". Prints one line of ids per prompt;
//   a file the tokenizer refuses: "refused: <message>" on stdout, exit 2.
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>

#include "clip_tokenizer.hpp"
#include "error.hpp"
#include "t5_tokenizer.hpp"
#include "unicode_text.hpp"

namespace {

std::string read_file(const char* path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

template <class Tokenizer>
int run(const std::string& file, const char* where, int max_length, const char* prompts_path) {
    std::unique_ptr<Tokenizer> tokenizer;
    try {
        tokenizer = std::make_unique<Tokenizer>(file, where);
    } catch (const slim::Error& e) {
        std::cout << "refused: " << e.what() << "\n";
        return 2;
    }
    std::ifstream prompts(prompts_path, std::ios::binary);
    std::string line;
    while (std::getline(prompts, line)) {
        std::string text(std::stoul(line), '\0');
        prompts.read(&text[0], static_cast<std::streamsize>(text.size()));
        if (!slim::unicode::is_utf8(text.data(), text.size())) {
            std::cout << "not utf-8\n";
            continue;
        }
        const std::vector<int64_t> ids = tokenizer->encode(text, max_length);
        for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? " " : "") << ids[i];
        std::cout << "\n";
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 5) {
        std::cerr << "usage: tokenizer_check clip|t5 FILE MAX_LENGTH PROMPTS\n";
        return 1;
    }
    const std::string kind = argv[1], file = read_file(argv[2]);
    const int max_length = std::stoi(argv[3]);
    return kind == "clip" ? run<slim::ClipTokenizer>(file, argv[2], max_length, argv[4])
                          : run<slim::T5Tokenizer>(file, argv[2], max_length, argv[4]);
}
