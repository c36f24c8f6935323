// The GPT-2 byte-level BPE tokenizer, minus the regex pre-tokenizer (that part needs PCRE2 and
// lives in data/pretokenize.h so this file builds everywhere). Loads the two files GPT-2 ships:
// encoder.json (token string -> id, strings written in GPT-2's byte-to-unicode alphabet) and
// vocab.bpe (the 50,000 merges, best first). Internally everything is raw bytes: each id maps to
// the exact bytes it stands for, and a merge is a pair of ids -> (rank, merged id), so
// encode_piece works on any byte string and decode returns the exact bytes.
#pragma once
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

class Tokenizer {
public:
    static constexpr int kEndOfText = 50256;              // id of "<|endoftext|>"
    static constexpr const char* kEndOfTextText = "<|endoftext|>";

    // Reads DIR/encoder.json and DIR/vocab.bpe; throws Error naming a missing or malformed file.
    static Tokenizer load(const std::string& dir);

    // BPE of one pre-tokenized piece (any bytes, valid UTF-8 or not) -> ids. Cached.
    std::vector<int> encode_piece(const std::string& piece) const;
    // ids -> the exact bytes they stand for; throws on an id outside the vocabulary.
    std::string decode(const std::vector<int>& ids) const;
    const std::string& token_bytes(int id) const;
    int vocab_size() const { return (int)bytes_of_id_.size(); }
    const std::string& dir() const { return dir_; }

    Tokenizer() = default;
    Tokenizer(Tokenizer&& other) noexcept;
    Tokenizer& operator=(Tokenizer&& other) noexcept;

private:
    struct Merge {
        int rank;       // position in vocab.bpe, lower merges first
        int merged_id;  // id of the concatenation
    };
    static uint64_t pair_key(int left, int right) { return ((uint64_t)(uint32_t)left << 32) | (uint32_t)right; }

    std::string dir_;
    std::vector<std::string> bytes_of_id_;              // (vocab) raw bytes of each token
    int id_of_byte_[256] = {};                          // single-byte tokens, the BPE start
    std::unordered_map<uint64_t, Merge> merges_;        // (left id, right id) -> merge

    // Pieces repeat a lot in natural text, so results are memoized (bounded, see encode_piece).
    mutable std::unordered_map<std::string, std::vector<int>> cache_;
    mutable std::mutex cache_mutex_;
};

// GPT-2's byte -> unicode code point table (printable bytes map to themselves, the rest to 256+).
const std::vector<int>& gpt2_byte_to_codepoint();
