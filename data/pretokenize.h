// GPT-2's regex pre-tokenizer and the full text -> ids encoder built on it. This is the only
// part of the tokenizer that needs PCRE2 (Unicode letter/number classes), so it is linked only
// into build/prepare and build/test_unit; everything else uses data/tokenizer.h.
#pragma once
#include <string>
#include <vector>

#include "data/tokenizer.h"

// Splits text into GPT-2's pieces ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|
// \s+(?!\S)|\s+). Bytes that are not valid UTF-8 cannot be matched by the regex; each run of them
// becomes a piece of its own, so the pieces always concatenate back to the input exactly.
std::vector<std::string> gpt2_pretokenize(const std::string& text);

// Text (any bytes) -> GPT-2 ids. With allow_special, "<|endoftext|>" becomes id 50256; without,
// it is encoded as ordinary text.
std::vector<int> gpt2_encode(const Tokenizer& tokenizer, const std::string& text, bool allow_special);
