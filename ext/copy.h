// Parallel copy for the snapshot: the training step is blocked while shards
// are copied into staging, so every core may help, and large pieces are
// copied with non-temporal stores (see copy.cc).
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
