// JSON-lines log and the terminal status line (see log.h).
#include "log.h"

#include <unistd.h>

#include <fstream>
#include <sstream>

#include "check.h"
#include "fileio.h"

JsonlLog::JsonlLog(const std::string& path, long keep_upto_step) : path_(path) {
    if (keep_upto_step >= 0) {  // rewrite, keeping only what the resumed checkpoint covers
        std::ifstream in(path);
        std::string line, kept;
        while (std::getline(in, line)) {
            if (line.empty()) continue;
            auto j = nlohmann::json::parse(line, nullptr, false);
            if (j.is_discarded() || !j.contains("step") || j["step"].get<long>() <= keep_upto_step) kept += line + "\n";
        }
        write_file_atomic(path, kept.data(), kept.size());
        f_ = std::fopen(path.c_str(), "a");
    } else {
        f_ = std::fopen(path.c_str(), "w");
    }
    CHECK(f_, "cannot open the log %s for writing; pass another --out", path.c_str());
}

JsonlLog::~JsonlLog() { if (f_) std::fclose(f_); }

void JsonlLog::write(const nlohmann::json& j) {
    std::string s = j.dump() + "\n";
    CHECK(std::fwrite(s.data(), 1, s.size(), f_) == s.size() && std::fflush(f_) == 0, "writing the log %s failed (disk full?)", path_.c_str());
}

StatusLine::StatusLine() : tty_(isatty(fileno(stdout))) {}

void StatusLine::update(const std::string& line) {
    if (tty_) {
        std::printf("\r\033[K%s", line.c_str());
        pending_ = true;
    } else {
        std::printf("%s\n", line.c_str());
    }
    std::fflush(stdout);
}

void StatusLine::print(const std::string& line) {
    if (tty_ && pending_) std::printf("\r\033[K");
    std::printf("%s\n", line.c_str());
    pending_ = false;
    std::fflush(stdout);
}

std::string format_duration(double s) {
    if (s < 0 || s != s) return "?";
    long t = (long)(s + 0.5);
    if (t >= 3600) return strformat("%ldh%02ldm", t / 3600, (t / 60) % 60);
    if (t >= 60) return strformat("%ldm%02lds", t / 60, t % 60);
    return strformat("%lds", t);
}
