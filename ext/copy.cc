#include "copy.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>

namespace fastpersist {

namespace {
constexpr size_t kPiece = 2u << 20;          // unit of work shared among threads
constexpr size_t kMinParallelBytes = 4u << 20;  // below this a thread costs more than it saves
}  // namespace

void parallel_copy(const std::vector<CopyTask>& tasks, unsigned threads) {
  size_t total = 0;
  for (const CopyTask& t : tasks) total += t.len;
  if (threads <= 1 || total < kMinParallelBytes) {
    for (const CopyTask& t : tasks) std::memcpy(t.dst, t.src, t.len);
    return;
  }
  std::vector<CopyTask> pieces;
  pieces.reserve(tasks.size() + total / kPiece);
  for (const CopyTask& t : tasks) {
    for (size_t off = 0; off < t.len; off += kPiece) {
      pieces.push_back({t.dst + off, t.src + off, std::min(kPiece, t.len - off)});
    }
  }
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < pieces.size();) {
      std::memcpy(pieces[i].dst, pieces[i].src, pieces[i].len);
    }
  };
  const unsigned n = static_cast<unsigned>(std::min<size_t>(threads, pieces.size()));
  std::vector<std::thread> helpers;
  for (unsigned i = 1; i < n; ++i) helpers.emplace_back(work);
  work();
  for (auto& t : helpers) t.join();
}

}  // namespace fastpersist
