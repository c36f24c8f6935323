// Safe file I/O and checkpoint folders: see fileio.h for the protocol. POSIX calls are used
// directly where durability matters (fsync of files and folders); std::filesystem for listing
// and recursive removal.
#include "fileio.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"

namespace fs = std::filesystem;

static std::string errno_text() { return std::strerror(errno); }

std::string read_file(const std::string& path, const char* what) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) FAIL("cannot read %s %s: %s", what, path.c_str(), errno_text().c_str());
    struct stat st;
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        std::string why = errno_text();
        if (::fstat(fd, &st) == 0) why = S_ISDIR(st.st_mode) ? "it is a folder" : "not a regular file";
        ::close(fd);
        FAIL("cannot read %s %s: %s", what, path.c_str(), why.c_str());
    }
    std::string bytes((size_t)st.st_size, '\0');
    size_t done = 0;
    while (done < bytes.size()) {
        ssize_t got = ::read(fd, &bytes[done], bytes.size() - done);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            std::string why = got < 0 ? errno_text() : "file shrank while reading";
            ::close(fd);
            FAIL("cannot read %s %s: %s", what, path.c_str(), why.c_str());
        }
        done += (size_t)got;
    }
    ::close(fd);
    return bytes;
}

static std::string parent_dir(const std::string& path) {
    std::string parent = fs::path(path).parent_path().string();
    return parent.empty() ? "." : parent;
}

// Makes a rename or creation inside `dir` durable. Some file systems cannot fsync folders
// (EINVAL); that is not an error worth failing a run for.
static void fsync_dir(const std::string& dir) {
    int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) FAIL("cannot open folder %s to sync it: %s", dir.c_str(), errno_text().c_str());
    int rc = ::fsync(fd);
    int err = errno;
    ::close(fd);
    if (rc != 0 && err != EINVAL && err != EROFS)
        FAIL("cannot sync folder %s: %s", dir.c_str(), std::strerror(err));
}

void write_file_atomic(const std::string& path, const void* data, size_t n) {
    std::string tmp = path + ".tmp." + std::to_string(::getpid());
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) FAIL("cannot write %s: %s", path.c_str(), errno_text().c_str());
    auto fail = [&](const std::string& why) {
        if (fd >= 0) ::close(fd);
        ::unlink(tmp.c_str());
        FAIL("cannot write %s: %s", path.c_str(), why.c_str());
    };
    const char* bytes = static_cast<const char*>(data);
    size_t done = 0;
    while (done < n) {
        ssize_t put = ::write(fd, bytes + done, n - done);
        if (put < 0 && errno == EINTR) continue;
        if (put <= 0) fail(put < 0 ? errno_text() : "write made no progress");
        done += (size_t)put;
    }
    if (::fsync(fd) != 0) fail(errno_text());
    int rc = ::close(fd);
    fd = -1;
    if (rc != 0) fail(errno_text());
    if (::rename(tmp.c_str(), path.c_str()) != 0) fail(errno_text());
    fsync_dir(parent_dir(path));
}

void ensure_writable_dir(const std::string& dir, const char* what) {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) FAIL("cannot write to %s %s: %s; pass another --out", what, dir.c_str(), ec.message().c_str());
    if (!fs::is_directory(dir, ec))
        FAIL("cannot write to %s %s: it is not a folder; pass another --out", what, dir.c_str());
    // Permission bits do not tell the whole story (root, read-only mounts): try a real file.
    std::string probe = (fs::path(dir) / (".write_probe." + std::to_string(::getpid()))).string();
    int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) FAIL("cannot write to %s %s: %s; pass another --out", what, dir.c_str(), errno_text().c_str());
    ::close(fd);
    ::unlink(probe.c_str());
}

// ---- checkpoint folders

static std::string step_name(const char* fmt, int64_t step) {
    CHECK(step >= 0, "checkpoint step %lld is negative", (long long)step);
    return strformat(fmt, (long long)step);
}

std::string checkpoint_dir(const std::string& out, int64_t step) {
    return (fs::path(out) / step_name("ckpt_%08lld", step)).string();
}

static std::string checkpoint_tmp_dir(const std::string& out, int64_t step) {
    return (fs::path(out) / step_name(".ckpt_%08lld.tmp", step)).string();
}

static void remove_tree(const std::string& path) {
    std::error_code ec;
    fs::remove_all(path, ec);
    if (ec) FAIL("cannot remove %s: %s", path.c_str(), ec.message().c_str());
}

std::string begin_checkpoint(const std::string& out, int64_t step) {
    ensure_writable_dir(out, "output folder");
    std::string tmp = checkpoint_tmp_dir(out, step);
    remove_tree(tmp);
    if (::mkdir(tmp.c_str(), 0755) != 0) FAIL("cannot create checkpoint folder %s: %s", tmp.c_str(), errno_text().c_str());
    return tmp;
}

void commit_checkpoint(const std::string& out, int64_t step) {
    std::string tmp = checkpoint_tmp_dir(out, step), final_dir = checkpoint_dir(out, step);
    CHECK(fs::is_directory(tmp), "cannot commit checkpoint of step %lld: %s does not exist (call begin_checkpoint first)",
          (long long)step, tmp.c_str());
    // Every file inside was written by write_file_atomic (synced); the marker goes last.
    write_file_atomic((fs::path(tmp) / "DONE").string(), "", 0);
    if (::rename(tmp.c_str(), final_dir.c_str()) == 0) {
        fsync_dir(out);
        return;
    }
    if (errno != EEXIST && errno != ENOTEMPTY) FAIL("cannot rename %s to %s: %s", tmp.c_str(), final_dir.c_str(), errno_text().c_str());
    // An older checkpoint of the same step is there: swap atomically, then delete the old one
    // (now under the temporary name, where prune would also find it).
    if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) != 0) {
        if (errno != EINVAL && errno != ENOSYS)
            FAIL("cannot replace %s with %s: %s", final_dir.c_str(), tmp.c_str(), errno_text().c_str());
        // No atomic exchange here: move the old one aside first. A crash in between leaves the
        // step without a complete checkpoint; resume then uses the previous one.
        std::string aside = tmp + ".old";
        remove_tree(aside);
        if (::rename(final_dir.c_str(), aside.c_str()) != 0 || ::rename(tmp.c_str(), final_dir.c_str()) != 0)
            FAIL("cannot replace %s with %s: %s", final_dir.c_str(), tmp.c_str(), errno_text().c_str());
        fsync_dir(out);
        remove_tree(aside);
        return;
    }
    fsync_dir(out);
    remove_tree(tmp);
}

// Parses "ckpt_" followed by 8 or more digits; -1 for any other name.
static int64_t parse_checkpoint_name(const std::string& name) {
    const std::string prefix = "ckpt_";
    if (name.size() < prefix.size() + 8 || name.compare(0, prefix.size(), prefix) != 0) return -1;
    int64_t step = 0;
    for (size_t i = prefix.size(); i < name.size(); i++) {
        if (name[i] < '0' || name[i] > '9') return -1;
        step = step * 10 + (name[i] - '0');
    }
    return step;
}

std::vector<int64_t> list_complete_checkpoints(const std::string& out) {
    std::vector<int64_t> steps;
    std::error_code ec;
    if (!fs::is_directory(out, ec)) return steps;
    for (fs::directory_iterator it(out, ec), end; !ec && it != end; it.increment(ec)) {
        int64_t step = parse_checkpoint_name(it->path().filename().string());
        if (step < 0 || !fs::is_directory(it->path())) continue;
        if (fs::exists(it->path() / "DONE")) steps.push_back(step);
    }
    if (ec) FAIL("cannot list checkpoints in %s: %s", out.c_str(), ec.message().c_str());
    std::sort(steps.begin(), steps.end());
    return steps;
}

void prune_checkpoints(const std::string& out, int keep) {
    std::error_code ec;
    if (!fs::is_directory(out, ec)) return;
    std::vector<std::string> stale;
    for (fs::directory_iterator it(out, ec), end; !ec && it != end; it.increment(ec)) {
        std::string name = it->path().filename().string();
        if (name.compare(0, 6, ".ckpt_") == 0) stale.push_back(it->path().string());
    }
    if (ec) FAIL("cannot list checkpoints in %s: %s", out.c_str(), ec.message().c_str());
    for (const std::string& path : stale) remove_tree(path);
    if (keep <= 0) return;
    std::vector<int64_t> steps = list_complete_checkpoints(out);
    for (size_t i = 0; i + (size_t)keep < steps.size(); i++) {
        // Rename first: a deletion cut short must not leave a folder that still looks complete.
        std::string doomed = (fs::path(out) / step_name(".ckpt_%08lld.del", steps[i])).string();
        remove_tree(doomed);
        if (::rename(checkpoint_dir(out, steps[i]).c_str(), doomed.c_str()) != 0)
            FAIL("cannot remove old checkpoint %s: %s", checkpoint_dir(out, steps[i]).c_str(), errno_text().c_str());
        remove_tree(doomed);
    }
}

std::string latest_checkpoint(const std::string& out) {
    std::vector<int64_t> steps = list_complete_checkpoints(out);
    return steps.empty() ? "" : checkpoint_dir(out, steps.back());
}
