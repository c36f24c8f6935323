// Run logs: `JsonlLog` appends one JSON object per line to OUT/log.jsonl (flushed per line, so a
// crash loses nothing written); `StatusLine` prints the one-line progress (step, loss, lr,
// tokens/s, ETA) over itself on a terminal and as plain lines otherwise.
#pragma once
#include <cstdio>
#include <string>

#include <nlohmann/json.hpp>

class JsonlLog {
public:
    // keep_upto_step >= 0: drop lines whose "step" is beyond it (a resumed run redoes them).
    JsonlLog(const std::string& path, long keep_upto_step);
    ~JsonlLog();
    void write(const nlohmann::json& j);
private:
    std::FILE* f_ = nullptr;
    std::string path_;
};

class StatusLine {
public:
    StatusLine();
    void update(const std::string& line);  // replaces the current status line
    void print(const std::string& line);   // a permanent line (eval, sample), status kept below
private:
    bool tty_;
    bool pending_ = false;
};

std::string format_duration(double seconds);
