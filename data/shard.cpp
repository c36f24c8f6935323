// Token shards (llm.c format): writing, header checks, reading, token-range checks. Bytes are
// encoded and decoded explicitly as little endian, so the format does not depend on the host.
#include "data/shard.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "fileio.h"

static void put_le32(unsigned char* p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t get_le32(const unsigned char* p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

void write_shard(const std::string& path, const std::vector<uint16_t>& tokens) {
    CHECK(tokens.size() <= (size_t)INT32_MAX, "cannot write token shard %s: %zu tokens do not fit the int32 count of the format; split it",
          path.c_str(), tokens.size());
    std::string bytes(kShardHeaderBytes + 2 * tokens.size(), '\0');
    unsigned char* p = reinterpret_cast<unsigned char*>(&bytes[0]);
    put_le32(p + 0, (uint32_t)kShardMagic);
    put_le32(p + 4, (uint32_t)kShardVersion);
    put_le32(p + 8, (uint32_t)tokens.size());
    unsigned char* body = p + kShardHeaderBytes;  // (num_tokens,) uint16 LE
    for (size_t i = 0; i < tokens.size(); i++) {
        body[2 * i] = (unsigned char)(tokens[i] & 0xFF);
        body[2 * i + 1] = (unsigned char)(tokens[i] >> 8);
    }
    write_file_atomic(path, bytes);
}

// Opens path, checks header and size, returns the open fd (caller closes) and the count.
static int open_checked_shard(const std::string& path, size_t* num_tokens) {
    const char* name = path.c_str();
    int fd = ::open(name, O_RDONLY | O_CLOEXEC);
    if (fd < 0) FAIL("cannot read token shard %s: %s", name, std::strerror(errno));
    struct stat st;
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        FAIL("cannot read token shard %s: not a regular file", name);
    }
    size_t file_bytes = (size_t)st.st_size;
    unsigned char header[kShardHeaderBytes];
    if (file_bytes < kShardHeaderBytes) {
        ::close(fd);
        FAIL("token shard %s is %zu bytes, shorter than its %zu-byte header: truncated or not a token shard", name,
             file_bytes, kShardHeaderBytes);
    }
    size_t got = 0;
    while (got < kShardHeaderBytes) {
        ssize_t r = ::read(fd, header + got, kShardHeaderBytes - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            ::close(fd);
            FAIL("cannot read token shard %s: %s", name, r < 0 ? std::strerror(errno) : "file shrank while reading");
        }
        got += (size_t)r;
    }
    int32_t magic = (int32_t)get_le32(header), version = (int32_t)get_le32(header + 4);
    int32_t count = (int32_t)get_le32(header + 8);
    auto fail = [&](const std::string& msg) {
        ::close(fd);
        throw Error(msg);
    };
    if (magic != kShardMagic)
        fail(strformat("%s: not a token shard: magic %d, expected %d", name, magic, kShardMagic));
    if (version != kShardVersion)
        fail(strformat("%s: token shard version %d, expected %d; re-make it with build/prepare", name, version, kShardVersion));
    if (count < 0) fail(strformat("%s: token shard header has a negative token count %d: the file is corrupt", name, count));
    size_t expected = kShardHeaderBytes + 2 * (size_t)count;
    if (file_bytes < expected)
        fail(strformat("token shard %s is truncated: its header says %d tokens (%zu bytes) but the file has %zu bytes; re-make it",
                       name, count, expected, file_bytes));
    if (file_bytes > expected)
        fail(strformat("token shard %s has %zu bytes after its %d tokens: the header count is wrong or the file is corrupt",
                       name, file_bytes - expected, count));
    *num_tokens = (size_t)count;
    return fd;
}

ShardInfo peek_shard(const std::string& path) {
    ShardInfo info;
    info.path = path;
    ::close(open_checked_shard(path, &info.num_tokens));
    return info;
}

std::vector<uint16_t> read_shard(const std::string& path) {
    size_t n = 0;
    int fd = open_checked_shard(path, &n);
    std::vector<unsigned char> body(2 * n);  // (n,) uint16 LE
    size_t got = 0;
    while (got < body.size()) {
        ssize_t r = ::read(fd, body.data() + got, body.size() - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            std::string why = r < 0 ? std::strerror(errno) : "file shrank while reading";
            ::close(fd);
            FAIL("cannot read token shard %s: %s", path.c_str(), why.c_str());
        }
        got += (size_t)r;
    }
    ::close(fd);
    std::vector<uint16_t> tokens(n);
    for (size_t i = 0; i < n; i++) tokens[i] = (uint16_t)(body[2 * i] | body[2 * i + 1] << 8);
    return tokens;
}

void check_tokens(const std::string& path, const uint16_t* tokens, size_t n, int vocab_size) {
    for (size_t i = 0; i < n; i++) {
        if ((int)tokens[i] >= vocab_size)
            FAIL("%s: token id %d at position %zu >= vocab size %d: the shard was made with another tokenizer",
                 path.c_str(), (int)tokens[i], i, vocab_size);
    }
}
