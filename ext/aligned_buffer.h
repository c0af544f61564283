// Page-aligned, pre-faulted host memory for O_DIRECT I/O and staging.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastpersist {

class AlignedBuffer {
 public:
  // Maps `nbytes` (rounded up to a page) of anonymous memory with every page
  // faulted in now (MAP_POPULATE): first-touch faults are slow and erratic,
  // and a staging buffer is reused across many saves, so paying once up
  // front keeps saves predictable.
  explicit AlignedBuffer(size_t nbytes, bool lock = false);
  ~AlignedBuffer();
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  char* data() const { return data_; }
  size_t size() const { return size_; }
  size_t mapped_size() const { return mapped_; }
  bool locked() const { return locked_; }

 private:
  char* data_ = nullptr;
  size_t size_ = 0;
  size_t mapped_ = 0;
  bool locked_ = false;
};

// Allocation alignment used everywhere: a page satisfies every O_DIRECT
// memory-alignment rule seen in practice (512 B or 4 KiB).
constexpr size_t kPageSize = 4096;

inline uint64_t align_down(uint64_t v, uint64_t a) { return v - (v % a); }
inline uint64_t align_up(uint64_t v, uint64_t a) { return align_down(v + a - 1, a); }

}  // namespace fastpersist
