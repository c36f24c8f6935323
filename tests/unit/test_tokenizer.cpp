// Tests of the GPT-2 BPE tokenizer (data/tokenizer.h) and its PCRE2 pre-tokenizer
// (data/pretokenize.h): ids against published reference encodings, exact byte round trips on
// fresh random bytes (invalid UTF-8 included) and random Unicode, the regex's piece boundaries,
// and the error for missing files. Errors are Error (src/check.h), caught here as its base
// std::runtime_error because check.h's FAIL macro clashes with GoogleTest's. The tokenizer files
// are found through $TOKENIZER_DIR, else $HOME/.cache/gpt-framework/gpt2-tokenizer
// (data/fetch_tokenizer.sh puts them there).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "data/pretokenize.h"
#include "data/tokenizer.h"

namespace {

std::string tokenizer_dir() {
    if (const char* dir = std::getenv("TOKENIZER_DIR")) return dir;
    const char* home = std::getenv("HOME");
    return std::string(home ? home : ".") + "/.cache/gpt-framework/gpt2-tokenizer";
}

// Loaded once for the whole file: parsing encoder.json is the slow part.
const Tokenizer& gpt2() {
    static Tokenizer tokenizer = Tokenizer::load(tokenizer_dir());
    return tokenizer;
}

std::string utf8(uint32_t cp) {
    std::string s;
    if (cp < 0x80) {
        s += (char)cp;
    } else if (cp < 0x800) {
        s += (char)(0xC0 | (cp >> 6));
        s += (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        s += (char)(0xE0 | (cp >> 12));
        s += (char)(0x80 | ((cp >> 6) & 0x3F));
        s += (char)(0x80 | (cp & 0x3F));
    } else {
        s += (char)(0xF0 | (cp >> 18));
        s += (char)(0x80 | ((cp >> 12) & 0x3F));
        s += (char)(0x80 | ((cp >> 6) & 0x3F));
        s += (char)(0x80 | (cp & 0x3F));
    }
    return s;
}

std::string printable(const std::string& s) {
    std::string out;
    for (unsigned char c : s) {
        char escaped[8];
        std::snprintf(escaped, sizeof escaped, "\\x%02X", c);
        out += (c >= 0x20 && c < 0x7F) ? std::string(1, (char)c) : std::string(escaped);
    }
    return out;
}

struct Reference {
    std::string text;
    std::vector<int> ids;
};

}  // namespace

TEST(TokenizerLoad, MissingFilesSayWhatToDo) {
    try {
        Tokenizer::load("/nonexistent/tokenizer-dir");
        GTEST_FAIL() << "load of a missing directory did not throw";
    } catch (const std::runtime_error& e) {
        std::string msg = e.what();
        EXPECT_NE(msg.find("/nonexistent/tokenizer-dir/encoder.json"), std::string::npos) << msg;
        EXPECT_NE(msg.find("run make data"), std::string::npos) << msg;
        EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
}

TEST(TokenizerLoad, VocabularyShape) {
    const Tokenizer& tok = gpt2();
    EXPECT_EQ(tok.vocab_size(), 50257);
    EXPECT_EQ(tok.token_bytes(Tokenizer::kEndOfText), "<|endoftext|>");
    EXPECT_EQ(tok.token_bytes(220), " ");
    EXPECT_EQ(tok.token_bytes(198), "\n");
    EXPECT_THROW(tok.decode({50257}), std::runtime_error);
    EXPECT_THROW(tok.decode({-1}), std::runtime_error);
}

// Published encodings: tiktoken's test suite (tests/test_encoding.py), gpt-3-encoder's
// Encoder.test.js, and tiktoken's gpt2 encoding (the js-tiktoken port) for the longer strings.
TEST(TokenizerReference, KnownIds) {
    const std::vector<Reference> references = {
        {"Hello world", {15496, 995}},
        {"hello world", {31373, 995}},
        {"Hello, world!", {15496, 11, 995, 0}},
        {"", {}},
        {" ", {220}},
        {"\t", {197}},
        {"This is some text", {1212, 318, 617, 2420}},
        {"indivisible", {521, 452, 12843}},
        {"hello \xF0\x9F\x91\x8B world \xF0\x9F\x8C\x8D", {31373, 50169, 233, 995, 12520, 234, 235}},
        {"0", {15}},
        {"00", {405}},
        {"000", {830}},
        {"0000", {2388}},
        {"00000", {20483}},
        {"000000", {10535}},
        {"0000000", {24598}},
        {"00000000", {8269}},
        {"000000000", {10535, 830}},
        {"0000000000000000", {25645}},
        {"00000000000000000", {8269, 10535, 830}},
        {"  leading spaces", {220, 3756, 9029}},
        {"trailing   ", {9535, 4386, 220, 220, 220}},
        {"a\n\n\nb", {64, 628, 198, 65}},
        {"tabs\t\tand\n \nnewlines", {8658, 82, 197, 197, 392, 198, 220, 198, 3605, 6615}},
        {"I'm sure they'll say we've done it, don't you think? You'd",
         {40, 1101, 1654, 484, 1183, 910, 356, 1053, 1760, 340, 11, 836, 470, 345, 892, 30, 921, 1549}},
        {"SHOUTING'S FINE", {9693, 12425, 2751, 6, 50, 376, 8881}},
        {"1234567890 3.14159 2024-01-01", {10163, 2231, 30924, 3829, 513, 13, 1415, 19707, 48609, 12, 486, 12, 486}},
        {"price: $1,000,000.00", {20888, 25, 720, 16, 11, 830, 11, 830, 13, 405}},
        {"emoji \xF0\x9F\x98\x80\xF0\x9F\x8E\x89\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD done",
         {368, 31370, 30325, 222, 8582, 236, 231, 41840, 235, 8582, 237, 121, 1760}},
        {"na\xC3\xAFve caf\xC3\xA9 \xE2\x80\x94 \xC2\xABquotes\xC2\xBB", {2616, 38776, 40304, 851, 21110, 421, 6421, 17730}},
        {"\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E\xE3\x81\xAE\xE3\x83\x86\xE3\x82\xAD\xE3\x82\xB9\xE3\x83\x88",
         {33768, 98, 17312, 105, 45739, 252, 5641, 24336, 25084, 43302}},
        {"        four-space indent\n    code()",
         {220, 220, 220, 220, 220, 220, 220, 1440, 12, 13200, 33793, 198, 220, 220, 220, 2438, 3419}},
    };
    for (const Reference& ref : references) {
        EXPECT_EQ(gpt2_encode(gpt2(), ref.text, false), ref.ids) << "text: \"" << printable(ref.text) << "\"";
        EXPECT_EQ(gpt2().decode(ref.ids), ref.text);
    }
}

TEST(TokenizerReference, EndOfText) {
    const Tokenizer& tok = gpt2();
    EXPECT_EQ(gpt2_encode(tok, "<|endoftext|>", true), std::vector<int>{50256});
    EXPECT_EQ(gpt2_encode(tok, "hello <|endoftext|>", true), (std::vector<int>{31373, 220, 50256}));
    EXPECT_EQ(gpt2_encode(tok, "<|endoftext|>Hello world<|endoftext|><|endoftext|>", true),
              (std::vector<int>{50256, 15496, 995, 50256, 50256}));
    // Not allowed: the marker is ordinary text, never id 50256, and still round-trips.
    std::vector<int> plain = gpt2_encode(tok, "hello <|endoftext|>", false);
    for (int id : plain) EXPECT_NE(id, Tokenizer::kEndOfText);
    EXPECT_EQ(tok.decode(plain), "hello <|endoftext|>");
}

TEST(TokenizerPretokenize, GPT2PieceBoundaries) {
    using Pieces = std::vector<std::string>;
    EXPECT_EQ(gpt2_pretokenize("Hello  world"), (Pieces{"Hello", " ", " world"}));
    EXPECT_EQ(gpt2_pretokenize("a   b\n\n"), (Pieces{"a", "  ", " b", "\n\n"}));
    EXPECT_EQ(gpt2_pretokenize("don't we'll I'M"), (Pieces{"don", "'t", " we", "'ll", " I", "'", "M"}));
    EXPECT_EQ(gpt2_pretokenize("abc123 4567!?"), (Pieces{"abc", "123", " 4567", "!?"}));
    EXPECT_EQ(gpt2_pretokenize(" \xC3\xA9t\xC3\xA9 \xE2\x85\xA0"), (Pieces{" \xC3\xA9t\xC3\xA9", " \xE2\x85\xA0"}));
    // Invalid UTF-8 cannot be matched; it becomes pieces of its own between the matches.
    EXPECT_EQ(gpt2_pretokenize("ab\xFF\xFE cd"), (Pieces{"ab", "\xFF\xFE", " cd"}));
    EXPECT_EQ(gpt2_pretokenize("\xC3"), (Pieces{"\xC3"}));
}

TEST(TokenizerRoundTrip, RandomBytes) {
    std::random_device device;
    const unsigned seed = device();
    SCOPED_TRACE("seed " + std::to_string(seed));
    std::mt19937 rng(seed);
    const Tokenizer& tok = gpt2();
    for (int trial = 0; trial < 300; trial++) {
        std::string text(rng() % 200, '\0');
        for (char& c : text) c = (char)(rng() % 256);
        std::vector<int> ids = gpt2_encode(tok, text, trial % 2 == 0);
        ASSERT_EQ(tok.decode(ids), text) << printable(text);
        std::string joined;
        for (const std::string& piece : gpt2_pretokenize(text)) joined += piece;
        ASSERT_EQ(joined, text) << printable(text);
    }
}

TEST(TokenizerRoundTrip, RandomUnicodeAndWhitespace) {
    std::random_device device;
    const unsigned seed = device();
    SCOPED_TRACE("seed " + std::to_string(seed));
    std::mt19937 rng(seed);
    const Tokenizer& tok = gpt2();
    const std::vector<std::string> fragments = {" ", "  ", "\t", "\n", "\r\n", "\xC2\xA0", "'s", "'re", "'ll", "'d",
                                                "don't", "42", "3.14", "\xF0\x9F\x98\x80", "<|endoftext|>", "Hello"};
    for (int trial = 0; trial < 300; trial++) {
        std::string text;
        int parts = 1 + rng() % 30;
        for (int p = 0; p < parts; p++) {
            if (rng() % 2) {
                text += fragments[rng() % fragments.size()];
            } else {
                uint32_t cp = rng() % 0x110000;
                if (cp >= 0xD800 && cp < 0xE000) cp = 'x';  // surrogates are not characters
                text += utf8(cp);
            }
        }
        std::vector<int> ids = gpt2_encode(tok, text, trial % 2 == 0);
        for (int id : ids) ASSERT_TRUE(id >= 0 && id < tok.vocab_size());
        ASSERT_EQ(tok.decode(ids), text) << printable(text);
        // BPE is deterministic and the piece cache must not change results.
        ASSERT_EQ(gpt2_encode(tok, text, trial % 2 == 0), ids);
    }
}

TEST(TokenizerRoundTrip, EveryByteAndLongRuns) {
    const Tokenizer& tok = gpt2();
    for (int b = 0; b < 256; b++) {
        std::string one(1, (char)b);
        std::vector<int> ids = gpt2_encode(tok, one, false);
        ASSERT_EQ(ids.size(), 1u) << "byte " << b;
        ASSERT_EQ(tok.decode(ids), one);
    }
    for (const std::string& run : {std::string(1000, ' '), std::string(500, '\n'), std::string(777, 'a'), std::string(300, '9')}) {
        EXPECT_EQ(tok.decode(gpt2_encode(tok, run, false)), run);
    }
}
