// The I/O engine: batches of reads/writes/syncs, run on io_uring (a ring per
// worker thread) or, where io_uring is unavailable, on a pwrite/pread pool.
// Every call blocks until all of its work has completed or failed; callers
// release the GIL around it.
#pragma once

#include <liburing.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "file.h"

namespace fastpersist {

// A byte range of host memory and where it goes in (or comes from) a file.
struct Extent {
  File* file;
  uint64_t offset;
  char* data;
  size_t len;
};

// Which mechanism carries the I/O.
enum class EngineKind {
  kIoUring,  // io_uring, one ring per worker thread
  kThreads,  // blocking pwrite/pread on a thread pool
};

// "io_uring" / "threads": the names Python uses.
const char* engine_kind_name(EngineKind kind);
// Throws std::invalid_argument (Python: ValueError) for any other name.
EngineKind parse_engine_kind(const std::string& name);

// The engine's settings and their defaults (the Python binding takes its
// defaults from here; FastPersistOptions passes its own explicitly).
struct EngineConfig {
  EngineKind kind = EngineKind::kIoUring;
  unsigned queue_depth = 16;      // requests in flight per worker
  size_t chunk_bytes = 4u << 20;  // largest single request
  unsigned threads = 1;           // io_uring: rings; threads: ignored (see below)
};

struct Op;

class Engine {
 public:
  // Throws RingUnavailable when kind is kIoUring and the kernel (or a
  // seccomp profile, or kernel.io_uring_disabled) refuses io_uring_setup.
  explicit Engine(const EngineConfig& config);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const EngineConfig& config() const { return config_; }

  // Writes every extent, and no byte outside them. Extents at unaligned
  // offsets of an O_DIRECT file go through a buffered descriptor after the
  // aligned ones, so the zero padding of an aligned extent's last block never
  // lands on top of them. That padding is used only past the file's logical
  // end as it stood before this call; a partial last block that earlier calls
  // may have written into (extents written out of order) is written through
  // the buffered descriptor instead.
  void write(const std::vector<Extent>& extents);
  // Reads every extent fully; a read that ends past end-of-file raises.
  void read(const std::vector<Extent>& extents);
  // Cuts each written file to its logical size, then fdatasyncs all of them
  // in one batch.
  void sync(const std::vector<File*>& files);

  // Registers host buffers as io_uring fixed buffers. Returns false (with the
  // reason in *why) when the kernel refuses, e.g. RLIMIT_MEMLOCK too small;
  // I/O then simply uses the buffers unregistered.
  bool register_buffers(const std::vector<std::pair<char*, size_t>>& buffers, std::string* why);
  void unregister_buffers();
  size_t registered_count() const { return registered_.size(); }

 private:
  void execute(std::vector<Op>& ops);
  int fixed_index(const char* p, size_t len) const;

  EngineConfig config_;
  std::vector<std::unique_ptr<io_uring>> rings_;
  std::vector<std::pair<char*, size_t>> registered_;  // sorted by address
  std::mutex call_mu_;  // one batch at a time: rings are not thread-safe
};

}  // namespace fastpersist
