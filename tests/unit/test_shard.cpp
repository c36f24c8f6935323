// Tests of data/shard: round trip of random tokens, the exact byte layout of the llm.c format,
// and that every malformed file fails with an Error naming the file and the problem.
// gtest's FAIL() would clash with check.h's FAIL; tests here use ADD_FAILURE/GTEST_FAIL.
#define GTEST_DONT_DEFINE_FAIL 1
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>

#include "check.h"
#include "data/shard.h"
#include "fileio.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace {

std::vector<uint16_t> random_tokens(size_t n, int vocab, uint32_t seed) {
    std::mt19937 gen(seed);
    std::vector<uint16_t> tokens(n);
    for (auto& t : tokens) t = (uint16_t)(gen() % vocab);
    return tokens;
}

// A shard file written by hand, field by field, so the tests do not trust write_shard.
std::string shard_bytes(int32_t magic, int32_t version, int32_t count, size_t actual_tokens) {
    std::string bytes(kShardHeaderBytes + 2 * actual_tokens, '\0');
    int32_t header[3] = {magic, version, count};
    std::memcpy(&bytes[0], header, sizeof(header));  // the test host is little endian
    return bytes;
}

// Expects fn() to throw Error with a one-line message containing every one of `needles`.
template <typename Fn>
void expect_one_line_error(Fn fn, const std::vector<std::string>& needles) {
    const std::string msg = expect_error_containing(fn, needles);
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "message is not one line: " << msg;
}

}  // namespace

TEST(Shard, RoundTripRandomTokens) {
    TempDir dir;
    std::random_device rd;
    size_t n = 1000 + rd() % 9000;  // not a round number
    if (n % 2 == 0) n++;
    auto tokens = random_tokens(n, 65536, rd());
    std::string path = dir / "train_000000.bin";
    write_shard(path, tokens);
    EXPECT_EQ(peek_shard(path).num_tokens, n);
    EXPECT_EQ(read_shard(path), tokens);
    EXPECT_EQ(fs::file_size(path), kShardHeaderBytes + 2 * n);
    // Exact layout: llm.c's header and little-endian uint16 tokens.
    std::string bytes = read_file(path, "shard");
    int32_t header[256];
    std::memcpy(header, bytes.data(), sizeof(header));
    EXPECT_EQ(header[0], 20240520);
    EXPECT_EQ(header[1], 1);
    EXPECT_EQ(header[2], (int32_t)n);
    for (int i = 3; i < 256; i++) EXPECT_EQ(header[i], 0);
    size_t k = rd() % n;
    EXPECT_EQ((uint8_t)bytes[1024 + 2 * k] | (uint8_t)bytes[1024 + 2 * k + 1] << 8, tokens[k]);
    // Empty shards are legal.
    write_shard(path, {});
    EXPECT_TRUE(read_shard(path).empty());
}

TEST(Shard, MissingFile) {
    TempDir dir;
    std::string path = dir / "absent.bin";
    expect_one_line_error([&] { read_shard(path); }, {path, "No such file"});
    expect_one_line_error([&] { peek_shard(path); }, {path});
}

TEST(Shard, ShorterThanHeader) {
    TempDir dir;
    std::string path = dir / "short.bin";
    write_file_atomic(path, shard_bytes(kShardMagic, 1, 0, 0).substr(0, 100 + std::random_device{}() % 900));
    expect_one_line_error([&] { read_shard(path); }, {path, "shorter than its 1024-byte header"});
}

TEST(Shard, WrongMagic) {
    TempDir dir;
    std::string path = dir / "magic.bin";
    write_file_atomic(path, shard_bytes(20240326, 1, 10, 10));  // llm.c's model-file magic
    expect_one_line_error([&] { read_shard(path); }, {path, "not a token shard: magic 20240326, expected 20240520"});
}

TEST(Shard, WrongVersion) {
    TempDir dir;
    std::string path = dir / "version.bin";
    write_file_atomic(path, shard_bytes(kShardMagic, 2, 10, 10));
    expect_one_line_error([&] { peek_shard(path); }, {path, "version 2, expected 1"});
}

TEST(Shard, Truncated) {
    TempDir dir;
    std::string path = dir / "truncated.bin";
    write_shard(path, random_tokens(500, 50257, std::random_device{}()));
    std::string bytes = read_file(path, "shard");
    write_file_atomic(path, bytes.substr(0, bytes.size() - 3));
    expect_one_line_error([&] { read_shard(path); }, {path, "truncated", "500 tokens"});
    write_file_atomic(path, bytes + "xy");  // trailing bytes are corruption too
    expect_one_line_error([&] { peek_shard(path); }, {path, "2 bytes after"});
}

TEST(Shard, TokenOutOfRange) {
    TempDir dir;
    std::random_device rd;
    auto tokens = random_tokens(2000, 50257, rd());
    size_t bad_pos = 100 + rd() % 1800;
    tokens[bad_pos] = 60000;
    tokens[bad_pos + 50] = 50257;  // a later one: the first is reported
    std::string path = dir / "tok.bin";
    write_shard(path, tokens);
    auto read = read_shard(path);
    expect_one_line_error([&] { check_tokens(path, read, 50257); },
                            {path, "token id 60000 at position " + std::to_string(bad_pos) + " >= vocab size 50257",
                             "another tokenizer"});
    tokens[bad_pos] = 50256;
    tokens[bad_pos + 50] = 0;
    check_tokens(path, tokens, 50257);  // the largest legal id passes
}
