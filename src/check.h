// Errors that help: one exception type carrying a one-line message that names the file or value
// and what to do about it. Programs catch it in main, print "error: <message>" and exit 1.
// FAIL builds the message printf-style; CHECK fails when a condition does not hold.
#pragma once
#include <cstdio>
#include <stdexcept>
#include <string>

struct Error : std::runtime_error {
    explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

template <typename... Args>
inline std::string strformat(const char* fmt, Args... args) {
    int n = std::snprintf(nullptr, 0, fmt, args...);
    std::string s(n > 0 ? n : 0, '\0');
    std::snprintf(&s[0], s.size() + 1, fmt, args...);
    return s;
}
inline std::string strformat(const char* fmt) { return fmt; }

#define FAIL(...) throw Error(strformat(__VA_ARGS__))
#define CHECK(cond, ...) do { if (!(cond)) FAIL(__VA_ARGS__); } while (0)
