// GPT-2 BPE: loading encoder.json / vocab.bpe into byte-level tables, the merge loop of GPT-2's
// encoder.py (lowest-ranked adjacent pair first, all its occurrences left to right) done on ids
// instead of strings, and decode. See tokenizer.h for the representation.
#include "data/tokenizer.h"

#include <algorithm>
#include <climits>
#include <fstream>
#include <sstream>
#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include "check.h"

const std::vector<int>& gpt2_byte_to_codepoint() {
    // encoder.py's bytes_to_unicode(): bytes that are printable Latin-1 keep their code point,
    // the other 68 get 256, 257, ... in byte order, so every token string is printable.
    static const std::vector<int> table = [] {
        std::vector<int> cp(256, -1);
        for (int b = '!'; b <= '~'; b++) cp[b] = b;
        for (int b = 0xA1; b <= 0xAC; b++) cp[b] = b;
        for (int b = 0xAE; b <= 0xFF; b++) cp[b] = b;
        int next = 256;
        for (int b = 0; b < 256; b++)
            if (cp[b] < 0) cp[b] = next++;
        return cp;
    }();
    return table;
}

namespace {

// Token string in GPT-2's unicode alphabet -> the raw bytes it stands for.
std::string unicode_alphabet_to_bytes(const std::string& s, const std::string& file) {
    static const std::unordered_map<int, char> byte_of_codepoint = [] {
        std::unordered_map<int, char> m;
        const std::vector<int>& cp = gpt2_byte_to_codepoint();
        for (int b = 0; b < 256; b++) m[cp[b]] = (char)b;
        return m;
    }();
    std::string out;
    size_t i = 0;
    while (i < s.size()) {
        unsigned char c = s[i];
        int len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
        CHECK(len > 0 && i + len <= s.size(), "%s: token '%s' is not valid UTF-8; re-fetch it with data/fetch_tokenizer.sh",
              file.c_str(), s.c_str());
        int cp = len == 1 ? c : c & (0x7F >> len);
        for (int k = 1; k < len; k++) cp = (cp << 6) | (s[i + k] & 0x3F);
        auto it = byte_of_codepoint.find(cp);
        CHECK(it != byte_of_codepoint.end(), "%s: token '%s' has code point U+%04X outside GPT-2's byte alphabet; wrong tokenizer file?",
              file.c_str(), s.c_str(), cp);
        out += it->second;
        i += len;
    }
    return out;
}

std::string read_file_or_fail(const std::string& path) {
    struct stat st;
    CHECK(stat(path.c_str(), &st) == 0, "tokenizer file %s not found; run make data (or data/fetch_tokenizer.sh %s)",
          path.c_str(), path.substr(0, path.rfind('/')).c_str());
    std::ifstream in(path, std::ios::binary);
    CHECK(in, "cannot read tokenizer file %s; check its permissions", path.c_str());
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

}  // namespace

Tokenizer::Tokenizer(Tokenizer&& other) noexcept { *this = std::move(other); }

Tokenizer& Tokenizer::operator=(Tokenizer&& other) noexcept {
    dir_ = std::move(other.dir_);
    bytes_of_id_ = std::move(other.bytes_of_id_);
    std::copy(other.id_of_byte_, other.id_of_byte_ + 256, id_of_byte_);
    merges_ = std::move(other.merges_);
    cache_ = std::move(other.cache_);
    return *this;
}

Tokenizer Tokenizer::load(const std::string& dir) {
    Tokenizer tok;
    tok.dir_ = dir;
    const std::string encoder_path = dir + "/encoder.json";
    const std::string merges_path = dir + "/vocab.bpe";
    std::string encoder_text = read_file_or_fail(encoder_path);
    std::string merges_text = read_file_or_fail(merges_path);

    // encoder.json: {"token": id, ...}; ids must be exactly 0..N-1.
    nlohmann::json encoder = nlohmann::json::parse(encoder_text, nullptr, /*allow_exceptions=*/false);
    CHECK(encoder.is_object() && !encoder.empty(), "%s is not a JSON object of token -> id; re-fetch it with data/fetch_tokenizer.sh",
          encoder_path.c_str());
    tok.bytes_of_id_.assign(encoder.size(), std::string());
    std::vector<bool> seen(encoder.size(), false);
    std::unordered_map<std::string, int> id_of_bytes;
    for (auto it = encoder.begin(); it != encoder.end(); ++it) {
        CHECK(it.value().is_number_integer(), "%s: token '%s' has a non-integer id", encoder_path.c_str(), it.key().c_str());
        long id = it.value().get<long>();
        CHECK(id >= 0 && id < (long)encoder.size() && !seen[id], "%s: id %ld of token '%s' is out of range or repeated",
              encoder_path.c_str(), id, it.key().c_str());
        seen[id] = true;
        std::string bytes = it.key() == kEndOfTextText ? it.key() : unicode_alphabet_to_bytes(it.key(), encoder_path);
        tok.bytes_of_id_[id] = bytes;
        id_of_bytes.emplace(bytes, (int)id);
    }
    CHECK((int)encoder.size() > kEndOfText && tok.bytes_of_id_[kEndOfText] == kEndOfTextText,
          "%s: id %d is not <|endoftext|>; this is not GPT-2's encoder.json", encoder_path.c_str(), kEndOfText);
    for (int b = 0; b < 256; b++) {
        auto it = id_of_bytes.find(std::string(1, (char)b));
        CHECK(it != id_of_bytes.end(), "%s has no token for byte %d; this is not a byte-level BPE vocabulary", encoder_path.c_str(), b);
        tok.id_of_byte_[b] = it->second;
    }

    // vocab.bpe: a "#version" line, then one merge "left right" per line, best first.
    std::istringstream lines(merges_text);
    std::string line;
    int line_no = 0, rank = 0;
    while (std::getline(lines, line)) {
        line_no++;
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (line.empty() || (line_no == 1 && line.rfind("#version", 0) == 0)) continue;
        size_t space = line.find(' ');
        CHECK(space != std::string::npos && space > 0 && space + 1 < line.size() && line.find(' ', space + 1) == std::string::npos,
              "%s:%d: expected 'left right', got '%s'", merges_path.c_str(), line_no, line.c_str());
        std::string left = unicode_alphabet_to_bytes(line.substr(0, space), merges_path);
        std::string right = unicode_alphabet_to_bytes(line.substr(space + 1), merges_path);
        auto l = id_of_bytes.find(left), r = id_of_bytes.find(right), m = id_of_bytes.find(left + right);
        CHECK(l != id_of_bytes.end() && r != id_of_bytes.end() && m != id_of_bytes.end(),
              "%s:%d: merge '%s' uses a token missing from encoder.json; the two files do not belong together",
              merges_path.c_str(), line_no, line.c_str());
        tok.merges_.emplace(pair_key(l->second, r->second), Merge{rank++, m->second});
    }
    CHECK(rank > 0, "%s holds no merges; re-fetch it with data/fetch_tokenizer.sh", merges_path.c_str());
    return tok;
}

std::vector<int> Tokenizer::encode_piece(const std::string& piece) const {
    {
        std::lock_guard<std::mutex> lock(cache_mutex_);
        auto it = cache_.find(piece);
        if (it != cache_.end()) return it->second;
    }
    std::vector<int> word;  // (symbols) current segmentation, starts as one token per byte
    word.reserve(piece.size());
    for (unsigned char c : piece) word.push_back(id_of_byte_[c]);

    std::vector<int> merged;
    while (word.size() >= 2) {
        // The adjacent pair with the lowest merge rank, as in encoder.py's bpe().
        int best_rank = INT_MAX, first = -1, second = -1, merged_id = -1;
        for (size_t i = 0; i + 1 < word.size(); i++) {
            auto it = merges_.find(pair_key(word[i], word[i + 1]));
            if (it != merges_.end() && it->second.rank < best_rank) {
                best_rank = it->second.rank;
                first = word[i];
                second = word[i + 1];
                merged_id = it->second.merged_id;
            }
        }
        if (merged_id < 0) break;
        // Merge every occurrence, scanning left to right without overlap.
        merged.clear();
        for (size_t i = 0; i < word.size();) {
            if (i + 1 < word.size() && word[i] == first && word[i + 1] == second) {
                merged.push_back(merged_id);
                i += 2;
            } else {
                merged.push_back(word[i]);
                i += 1;
            }
        }
        word.swap(merged);
    }

    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (cache_.size() >= (1u << 20)) cache_.clear();  // bound memory on huge, diverse inputs
    cache_.emplace(piece, word);
    return word;
}

const std::string& Tokenizer::token_bytes(int id) const {
    CHECK(id >= 0 && id < vocab_size(), "token id %d is outside the vocabulary (size %d)", id, vocab_size());
    return bytes_of_id_[id];
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
    std::string out;
    for (int id : ids) out += token_bytes(id);
    return out;
}
