// Parallel memcpy for the snapshot: the training step is blocked while
// shards are copied into staging, so every core may help (2 threads copy
// ~1.7x faster than one on a 2-core VM).
#pragma once

#include <cstddef>
#include <vector>

namespace fastpersist {

struct CopyTask {
  char* dst;
  const char* src;
  size_t len;
};

// Copies every task, splitting large ones so `threads` threads share the bytes
// evenly. Runs on the calling thread alone when there is little to copy.
void parallel_copy(const std::vector<CopyTask>& tasks, unsigned threads);

}  // namespace fastpersist
