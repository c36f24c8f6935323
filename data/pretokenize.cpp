// GPT-2 pre-tokenization with PCRE2 (UTF + UCP for \p{L} and \p{N}, MATCH_INVALID_UTF so that
// arbitrary bytes never make the matcher fail), and gpt2_encode: special-token split, regex
// pieces, BPE per piece.
#include "data/pretokenize.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "check.h"

namespace {

// GPT-2's pattern. \s is spelled out as the Unicode White_Space set that the reference
// implementations use (tiktoken's regex, Python's regex module); PCRE2's own \s differs from it
// (e.g. U+0085), and spelling it out also keeps the result independent of the PCRE2 version.
#define WS_CHARS "\\t\\n\\x{0B}\\f\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"
const char* kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d"
    "| ?\\p{L}+| ?\\p{N}+"
    "| ?[^" WS_CHARS "\\p{L}\\p{N}]+"
    "|[" WS_CHARS "]+(?![^" WS_CHARS "])"
    "|[" WS_CHARS "]+";
#undef WS_CHARS

// Compiled once, shared by all threads (pcre2_code is read-only after compile and JIT).
const pcre2_code* gpt2_regex() {
    static pcre2_code* code = [] {
        int error_code;
        PCRE2_SIZE error_offset;
        pcre2_code* re = pcre2_compile((PCRE2_SPTR)kGpt2Pattern, PCRE2_ZERO_TERMINATED,
                                       PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error_code, &error_offset,
                                       nullptr);
        if (!re) {
            PCRE2_UCHAR message[256];
            pcre2_get_error_message(error_code, message, sizeof message);
            FAIL("PCRE2 cannot compile GPT-2's pattern at offset %zu: %s", (size_t)error_offset, (const char*)message);
        }
        pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);  // speed only: without JIT pcre2_match interprets
        return re;
    }();
    return code;
}

// Calls emit(begin, length) for each piece of text[begin, end), unmatched byte runs included.
template <typename Emit>
void for_each_piece(const std::string& text, size_t begin, size_t end, Emit emit) {
    const pcre2_code* re = gpt2_regex();
    pcre2_match_data* match = pcre2_match_data_create_from_pattern(re, nullptr);
    CHECK(match, "PCRE2: out of memory for match data");
    const PCRE2_SPTR subject = (PCRE2_SPTR)text.data() + begin;
    const size_t length = end - begin;
    size_t pos = 0;
    while (pos < length) {
        int rc = pcre2_match(re, subject, length, pos, 0, match, nullptr);
        if (rc == PCRE2_ERROR_NOMATCH) {  // only invalid UTF-8 is left
            emit(begin + pos, length - pos);
            break;
        }
        if (rc < 0) {
            pcre2_match_data_free(match);
            PCRE2_UCHAR message[256];
            pcre2_get_error_message(rc, message, sizeof message);
            FAIL("PCRE2 match failed at byte %zu: %s", begin + pos, (const char*)message);
        }
        const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match);
        size_t start = ovector[0], stop = ovector[1];
        if (start > pos) emit(begin + pos, start - pos);  // invalid UTF-8 the regex skipped
        if (stop == start) stop = start + 1;              // cannot happen (no empty alternative); never loop
        emit(begin + start, stop - start);
        pos = stop;
    }
    pcre2_match_data_free(match);
}

}  // namespace

std::vector<std::string> gpt2_pretokenize(const std::string& text) {
    std::vector<std::string> pieces;
    for_each_piece(text, 0, text.size(), [&](size_t at, size_t n) { pieces.push_back(text.substr(at, n)); });
    return pieces;
}

std::vector<int> gpt2_encode(const Tokenizer& tokenizer, const std::string& text, bool allow_special) {
    std::vector<int> ids;
    std::string piece;
    auto encode_range = [&](size_t begin, size_t end) {
        for_each_piece(text, begin, end, [&](size_t at, size_t n) {
            piece.assign(text, at, n);
            std::vector<int> piece_ids = tokenizer.encode_piece(piece);
            ids.insert(ids.end(), piece_ids.begin(), piece_ids.end());
        });
    };
    const std::string special = Tokenizer::kEndOfTextText;
    size_t pos = 0;
    while (allow_special) {
        size_t found = text.find(special, pos);
        if (found == std::string::npos) break;
        encode_range(pos, found);
        ids.push_back(Tokenizer::kEndOfText);
        pos = found + special.size();
    }
    encode_range(pos, text.size());
    return ids;
}
