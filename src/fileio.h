// Safe file I/O and checkpoint folders. Reads name the file and what it was meant to be when they
// fail; writes are atomic (temporary file, fsync, rename, fsync of the folder), so a crash never
// leaves a half-written file under the final name and a failed write leaves no temporary behind.
//
// Checkpoint folders: a checkpoint of step S is the directory OUT/ckpt_%08d. It is written as
// OUT/.ckpt_%08d.tmp (begin_checkpoint), its files go in there, and commit_checkpoint writes the
// marker file DONE last and renames the folder to its final name. Only folders with the final
// name and a DONE marker count as complete; anything else (a crash mid-write) is ignored by
// list/latest and removed by prune.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

// The whole file as bytes. `what` names what the file is for the error ("vocab file", ...):
// "cannot read vocab file PATH: No such file or directory".
std::string read_file(const std::string& path, const char* what);

// Writes n bytes to path atomically: path.tmp.PID, fsync, rename over path, fsync the folder.
// On any failure the temporary is removed and Error names the path and the errno text.
void write_file_atomic(const std::string& path, const void* data, size_t n);
inline void write_file_atomic(const std::string& path, const std::string& bytes) {
    write_file_atomic(path, bytes.data(), bytes.size());
}

// mkdir -p dir, then proves it writable by creating and removing a probe file. Error:
// "cannot write to <what> DIR: <reason>; pass another --out" (what = "output folder", ...).
void ensure_writable_dir(const std::string& dir, const char* what);

// OUT/ckpt_%08d: where the complete checkpoint of `step` lives.
std::string checkpoint_dir(const std::string& out, int64_t step);

// Creates an empty OUT/.ckpt_%08d.tmp (removing a stale one of the same step) and returns it;
// the caller writes the checkpoint's files there, then calls commit_checkpoint.
std::string begin_checkpoint(const std::string& out, int64_t step);

// Writes DONE into the temporary folder and renames it to OUT/ckpt_%08d. An older checkpoint of
// the same step is replaced: the two folders are swapped atomically where the file system allows
// (renameat2 RENAME_EXCHANGE), so some complete checkpoint of that step exists at every moment.
void commit_checkpoint(const std::string& out, int64_t step);

// Steps of the complete checkpoints in out (final name and DONE present), ascending. An absent
// folder has none.
std::vector<int64_t> list_complete_checkpoints(const std::string& out);

// Deletes the oldest complete checkpoints so that `keep` remain (keep <= 0 keeps all), and every
// stale temporary folder (.ckpt_*) left by an interrupted write.
void prune_checkpoints(const std::string& out, int keep);

// Folder of the newest complete checkpoint, or "" if there is none.
std::string latest_checkpoint(const std::string& out);
