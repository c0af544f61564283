#include "aligned_buffer.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <system_error>

namespace fastpersist {

AlignedBuffer::AlignedBuffer(size_t nbytes, bool lock) : size_(nbytes) {
  mapped_ = align_up(nbytes == 0 ? 1 : nbytes, kPageSize);
  void* p = mmap(nullptr, mapped_, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    throw std::system_error(errno, std::generic_category(),
                            "mmap of " + std::to_string(mapped_) + " bytes");
  }
  data_ = static_cast<char*>(p);
  // Transparent huge pages cut the number of faults (and TLB misses on the
  // copy path) by 512x where the kernel allows them; harmless where not.
  if (mapped_ >= (2u << 20)) madvise(data_, mapped_, MADV_HUGEPAGE);
  if (lock && mlock(data_, mapped_) == 0) {
    locked_ = true;  // mlock faults every page in itself.
  } else {
    for (size_t off = 0; off < mapped_; off += kPageSize) data_[off] = 0;
  }
}

AlignedBuffer::~AlignedBuffer() {
  if (data_ != nullptr) {
    if (locked_) munlock(data_, mapped_);
    munmap(data_, mapped_);
  }
}

}  // namespace fastpersist
