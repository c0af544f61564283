// An open file plus what O_DIRECT needs to know about it.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>

#include "alignment.h"

namespace fastpersist {

class File {
 public:
  enum class Mode { kRead, kWrite };

  // Opens `path`. With `try_direct`, O_DIRECT is used where the filesystem
  // accepts it; where it refuses (tmpfs on old kernels, overlayfs, FUSE) the
  // file is opened buffered and `direct_note()` says why. For writes the file
  // is created or truncated, and `preallocate` bytes are reserved up front so
  // that a full disk fails here rather than half-way through the data.
  File(const std::string& path, Mode mode, bool try_direct, uint64_t preallocate);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  const std::string& path() const { return path_; }
  Mode mode() const { return mode_; }
  bool is_open() const { return fd_ >= 0; }
  bool direct() const { return direct_; }
  const std::string& direct_note() const { return direct_note_; }
  uint32_t offset_align() const { return offset_align_; }
  uint32_t mem_align() const { return mem_align_; }
  Alignment alignment() const { return {direct_, offset_align_, mem_align_}; }

  int fd() const;
  // A second, buffered descriptor for the few writes O_DIRECT cannot do
  // (those starting at an unaligned offset).
  int buffered_fd();
  uint64_t size() const;

  // Bytes the caller has written: the file is cut back to this before it is
  // synced, dropping the zero padding of a final partial block.
  uint64_t logical_end() const { return logical_end_.load(); }
  void note_written(uint64_t end);
  void truncate_to_logical_end();
  void close();

 private:
  void detect_alignment();

  std::string path_;
  Mode mode_;
  int fd_ = -1;
  int buffered_fd_ = -1;
  bool direct_ = false;
  std::string direct_note_;
  uint32_t offset_align_ = 1;
  uint32_t mem_align_ = 1;
  std::atomic<uint64_t> logical_end_{0};
  std::mutex mu_;
};

}  // namespace fastpersist
