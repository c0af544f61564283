// Errors raised by the engine; bindings.cc turns them into Python exceptions.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastpersist {

// A failed system call on a file: becomes Python's OSError(errno, text, path),
// so callers can match on errno (ENOSPC, EACCES, ...) like any other OSError.
class IoError : public std::runtime_error {
 public:
  IoError(int err, std::string path, std::string what)
      : std::runtime_error(std::move(what)), err_(err), path_(std::move(path)) {}
  int err() const { return err_; }
  const std::string& path() const { return path_; }

 private:
  int err_;
  std::string path_;
};

// io_uring cannot be used in this process (old kernel, seccomp, sysctl).
class RingUnavailable : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// strerror(err), for messages.
std::string errno_text(int err);

// Throws IoError(err, path, "<op>[ at offset N]: <errno text>"); offset
// UINT64_MAX leaves the offset out.
[[noreturn]] void throw_io_error(int err, const std::string& path,
                                 const std::string& op, uint64_t offset = UINT64_MAX);

}  // namespace fastpersist
