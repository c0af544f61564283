#include "file.h"

#include <fcntl.h>
#include <linux/stat.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "aligned_buffer.h"
#include "errors.h"

namespace fastpersist {

namespace {

int open_retry(const char* path, int flags) {
  int fd;
  do {
    fd = ::open(path, flags, 0644);
  } while (fd < 0 && errno == EINTR);
  return fd;
}

// Logical block size of the device holding the file, from sysfs; 0 if unknown.
uint32_t sysfs_logical_block_size(dev_t dev) {
  const std::string base = "/sys/dev/block/" + std::to_string(major(dev)) + ":" +
                           std::to_string(minor(dev));
  for (const char* rel : {"/queue/logical_block_size", "/../queue/logical_block_size"}) {
    std::ifstream in(base + rel);
    uint32_t v = 0;
    if (in >> v && v > 0) return v;
  }
  return 0;
}

}  // namespace

File::File(const std::string& path, Mode mode, bool try_direct, uint64_t preallocate)
    : path_(path), mode_(mode) {
  const int base = (mode == Mode::kWrite ? O_WRONLY | O_CREAT | O_TRUNC : O_RDONLY) | O_CLOEXEC;
  if (try_direct) {
    fd_ = open_retry(path.c_str(), base | O_DIRECT);
    if (fd_ >= 0) {
      direct_ = true;
    } else if (errno == EINVAL || errno == EOPNOTSUPP) {
      direct_note_ = "O_DIRECT refused by the filesystem (" + errno_text(errno) +
                     "); using buffered I/O";
    } else {
      throw_io_error(errno, path, mode == Mode::kWrite ? "open for write" : "open for read");
    }
  } else {
    direct_note_ = "O_DIRECT disabled by option";
  }
  if (!direct_) {
    fd_ = open_retry(path.c_str(), base);
    if (fd_ < 0) {
      throw_io_error(errno, path, mode == Mode::kWrite ? "open for write" : "open for read");
    }
  }
  detect_alignment();
  if (mode == Mode::kWrite && preallocate > 0) {
    const uint64_t len = align_up(preallocate, offset_align_);
    int rc;
    do {
      rc = ::fallocate(fd_, 0, 0, static_cast<off_t>(len));
    } while (rc != 0 && errno == EINTR);
    if (rc != 0 && errno != EOPNOTSUPP && errno != ENOSYS) {
      const int err = errno;
      ::close(fd_);
      fd_ = -1;
      ::unlink(path.c_str());  // Never leave a half-made file behind.
      throw_io_error(err, path, "preallocate " + std::to_string(len) + " bytes");
    }
  }
}

void File::detect_alignment() {
  if (!direct_) {
    offset_align_ = mem_align_ = 1;
    return;
  }
  struct statx stx;
  std::memset(&stx, 0, sizeof(stx));
  if (::syscall(SYS_statx, fd_, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 &&
      (stx.stx_mask & STATX_DIOALIGN)) {
    if (stx.stx_dio_offset_align == 0) {
      // The filesystem says this file cannot do direct I/O at all.
      ::close(fd_);
      direct_ = false;
      direct_note_ = "statx reports no direct I/O support; using buffered I/O";
      const int base = (mode_ == Mode::kWrite ? O_WRONLY : O_RDONLY) | O_CLOEXEC;
      fd_ = open_retry(path_.c_str(), base);
      if (fd_ < 0) throw_io_error(errno, path_, "reopen buffered");
      offset_align_ = mem_align_ = 1;
      return;
    }
    offset_align_ = stx.stx_dio_offset_align;
    mem_align_ = stx.stx_dio_mem_align;
    return;
  }
  // No STATX_DIOALIGN (older kernel, tmpfs): the device's logical block size,
  // else a page, which every O_DIRECT implementation accepts.
  struct stat st;
  uint32_t lbs = 0;
  if (::fstat(fd_, &st) == 0) lbs = sysfs_logical_block_size(st.st_dev);
  offset_align_ = mem_align_ = lbs > 0 ? lbs : static_cast<uint32_t>(kPageSize);
}

File::~File() { close(); }

int File::fd() const {
  if (fd_ < 0) throw IoError(EBADF, path_, "file is closed");
  return fd_;
}

int File::buffered_fd() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!direct_) return fd();
  if (buffered_fd_ < 0) {
    buffered_fd_ = open_retry(path_.c_str(), O_WRONLY | O_CLOEXEC);
    if (buffered_fd_ < 0) throw_io_error(errno, path_, "open buffered");
  }
  return buffered_fd_;
}

uint64_t File::size() const {
  struct stat st;
  if (::fstat(fd(), &st) != 0) throw_io_error(errno, path_, "fstat");
  return static_cast<uint64_t>(st.st_size);
}

void File::note_written(uint64_t end) {
  uint64_t cur = logical_end_.load();
  while (end > cur && !logical_end_.compare_exchange_weak(cur, end)) {
  }
}

void File::truncate_to_logical_end() {
  const uint64_t want = logical_end_.load();
  if (size() == want) return;
  int rc;
  do {
    rc = ::ftruncate(fd(), static_cast<off_t>(want));
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) throw_io_error(errno, path_, "ftruncate to " + std::to_string(want));
}

void File::close() {
  if (buffered_fd_ >= 0) {
    ::close(buffered_fd_);
    buffered_fd_ = -1;
  }
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
}

}  // namespace fastpersist
