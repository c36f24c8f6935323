// Helpers shared by the CPU unit tests (tests/unit/): a temporary folder removed with everything
// in it when it goes out of scope (also when an ASSERT leaves the test early); running a command
// through the shell with its exit code, stdout and stderr captured; the path of a program built
// before the suite (build/train, build/attn; an environment variable overrides it); whole-file
// reads and writes and folder listings that do not go through src/fileio (which some tests check);
// expecting an Error whose message holds given words; the step → loss lines of a training log; and
// a central finite difference of a scalar loss (the gradient checks).
// Include it before <gtest/gtest.h>, or define GTEST_DONT_DEFINE_FAIL 1 first: gtest's FAIL()
// would clash with check.h's FAIL (use GTEST_FAIL / ADD_FAILURE).
#pragma once
#ifndef GTEST_DONT_DEFINE_FAIL
#define GTEST_DONT_DEFINE_FAIL 1
#endif
#include <gtest/gtest.h>
#if defined(FAIL) && !defined(CHECK)
#error "gtest defined FAIL(), which clashes with check.h: define GTEST_DONT_DEFINE_FAIL 1 before including gtest"
#endif
#include <sys/wait.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include "check.h"

// A fresh folder /tmp/<prefix>_XXXXXX (mkdtemp), removed with everything in it at the end of its
// scope. dir / "name" is the path of an entry.
struct TempDir {
    std::string path;
    explicit TempDir(const std::string& prefix = "gpt_unit_test") {
        std::string name = "/tmp/" + prefix + "_XXXXXX";
        if (!mkdtemp(name.data())) throw std::runtime_error("mkdtemp " + name + ": " + std::strerror(errno));
        path = name;
    }
    ~TempDir() {
        std::error_code ignored;
        std::filesystem::remove_all(path, ignored);
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    std::string operator/(const std::string& name) const { return path + "/" + name; }
};

// The bytes of the file at `path`; throws std::runtime_error naming it when it cannot be opened.
inline std::string read_whole_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot read " + path);
    std::ostringstream bytes;
    bytes << in.rdbuf();
    return bytes.str();
}

// Replaces the file at `path` by `bytes`; throws std::runtime_error naming it on failure.
inline void write_whole_file(const std::string& path, const std::string& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), (std::streamsize)bytes.size());
    if (!out) throw std::runtime_error("cannot write " + path);
}

// Names of the entries of the folder `dir` (hidden ones too), sorted; throws if it cannot be read.
inline std::vector<std::string> names_in(const std::string& dir) {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(dir)) names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
}

// What a command did: its exit status (-1 when it did not exit normally, e.g. killed by a
// signal) and everything it wrote to stdout and stderr.
struct CommandResult {
    int exit_code;
    std::string out, err;
};

// Runs `command` through /bin/sh, capturing stdout and stderr in files of a TempDir of its own.
inline CommandResult run_command(const std::string& command) {
    TempDir capture("gpt_unit_test_output");
    const std::string out_path = capture / "stdout.txt", err_path = capture / "stderr.txt";
    const int status = std::system(("{ " + command + "\n} >" + out_path + " 2>" + err_path).c_str());
    CommandResult r;
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.out = read_whole_file(out_path);
    r.err = read_whole_file(err_path);
    return r;
}

// The path of a program built before the suite: $env_var when set, else default_path.
inline std::string program_path(const char* env_var, const char* default_path) {
    const char* set = std::getenv(env_var);
    return set ? set : default_path;
}
// build/train (TRAIN_BIN overrides it), and a run of it with the given arguments.
inline std::string train_binary() { return program_path("TRAIN_BIN", "build/train"); }
inline CommandResult run_train(const std::string& args) { return run_command(train_binary() + " " + args); }

// step → loss as logged by build/train (the text, so runs compare exactly), from its log.jsonl.
inline std::map<int, std::string> logged_losses(const std::string& log_path) {
    std::map<int, std::string> losses;
    std::ifstream in(log_path);
    std::string line;
    while (std::getline(in, line)) {
        const auto loss = line.find("\"loss\":"), step = line.find("\"step\":");
        if (loss == std::string::npos || step == std::string::npos) continue;
        losses[std::atoi(line.c_str() + step + 7)] = line.substr(loss + 7, line.find_first_of(",}", loss) - loss - 7);
    }
    return losses;
}

// Expects fn() to throw Error whose message contains every one of `needles`. Returns the message
// ("" when nothing was thrown) for checks of its own.
template <typename Fn>
std::string expect_error_containing(Fn fn, const std::vector<std::string>& needles) {
    try {
        fn();
    } catch (const Error& e) {
        const std::string message = e.what();
        for (const std::string& needle : needles)
            EXPECT_NE(message.find(needle), std::string::npos) << "message lacks '" << needle << "': " << message;
        return message;
    }
    std::string wanted;
    for (const std::string& needle : needles) wanted += " '" + needle + "'";
    ADD_FAILURE() << "no Error thrown; expected one mentioning" << wanted;
    return "";
}

// d loss / d x[e] by central differences with step h: loss() evaluates at the current x, and x[e]
// is restored afterwards.
inline double central_difference(std::vector<double>& x, size_t e, double h, const std::function<double()>& loss) {
    const double x0 = x[e];
    x[e] = x0 + h;
    const double lp = loss();
    x[e] = x0 - h;
    const double lm = loss();
    x[e] = x0;
    return (lp - lm) / (2 * h);
}
