#include "copy.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace fastpersist {

namespace {
constexpr size_t kPiece = 2u << 20;          // unit of work shared among threads
constexpr size_t kMinParallelBytes = 4u << 20;  // below this a thread costs more than it saves
// Staged bytes are read next by the disk's DMA and the checksum, not from
// this core's cache, so large copies bypass the cache with non-temporal
// stores: no read-for-ownership of the destination, ~2x memcpy's rate for
// 2 MiB pieces here (glibc streams only copies above ~3/4 of the L3 size).
constexpr size_t kStreamMinBytes = 16u << 10;

void copy_bytes(char* dst, const char* src, size_t len) {
#if defined(__SSE2__)
  if (len >= kStreamMinBytes) {
    const size_t head = (16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15;
    std::memcpy(dst, src, head);
    size_t i = head;
    for (; i + 64 <= len; i += 64) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
      const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
    }
    std::memcpy(dst + i, src + i, len - i);
    return;
  }
#endif
  std::memcpy(dst, src, len);
}

// Non-temporal stores are weakly ordered: fence them before another thread
// (the joiner, then the writer) may read the bytes.
void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}
}  // namespace

void parallel_copy(const std::vector<CopyTask>& tasks, unsigned threads) {
  size_t total = 0;
  for (const CopyTask& t : tasks) total += t.len;
  if (threads <= 1 || total < kMinParallelBytes) {
    for (const CopyTask& t : tasks) copy_bytes(t.dst, t.src, t.len);
    store_fence();
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
      copy_bytes(pieces[i].dst, pieces[i].src, pieces[i].len);
    }
    store_fence();
  };
  const unsigned n = static_cast<unsigned>(std::min<size_t>(threads, pieces.size()));
  std::vector<std::thread> helpers;
  for (unsigned i = 1; i < n; ++i) helpers.emplace_back(work);
  work();
  for (auto& t : helpers) t.join();
}

}  // namespace fastpersist
