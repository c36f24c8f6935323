// Token shards in llm.c's format: a header of 256 little-endian int32 — [0] = 20240520 (magic),
// [1] = 1 (version), [2] = number of tokens — followed by that many uint16 little-endian token
// ids. Files made here load in llm.c and vice versa. Every malformed file is reported with one
// line that names the file and the problem (missing, shorter than the header, wrong magic or
// version, size not matching the count, token id >= vocab).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

constexpr int32_t kShardMagic = 20240520;
constexpr int32_t kShardVersion = 1;
constexpr size_t kShardHeaderInts = 256;
constexpr size_t kShardHeaderBytes = kShardHeaderInts * sizeof(int32_t);  // 1024

struct ShardInfo {
    std::string path;
    size_t num_tokens = 0;  // from the header, checked against the file size
};

// Writes tokens as a shard, atomically (see src/fileio.h).
void write_shard(const std::string& path, const std::vector<uint16_t>& tokens);

// Reads and checks only the header and the file size: cheap for sizing a dataset.
ShardInfo peek_shard(const std::string& path);

// Reads the whole shard (checked as in peek_shard).
std::vector<uint16_t> read_shard(const std::string& path);

// Fails on the first token id >= vocab_size, naming its position: "PATH: token id 60000 at
// position 123 >= vocab size 50257: the shard was made with another tokenizer".
void check_tokens(const std::string& path, const uint16_t* tokens, size_t n, int vocab_size);
inline void check_tokens(const std::string& path, const std::vector<uint16_t>& tokens, int vocab_size) {
    check_tokens(path, tokens.data(), tokens.size(), vocab_size);
}
