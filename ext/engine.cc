#include "engine.h"

#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <thread>
#include <unordered_map>

#include "aligned_buffer.h"
#include "alignment.h"
#include "errors.h"

namespace fastpersist {

struct Op {
  enum Kind : uint8_t { kWrite, kRead, kSync };
  Kind kind;
  int fd;
  const File* file;
  char* buf;
  size_t len;
  uint64_t offset;
  size_t need;       // reads: bytes that must arrive; the rest may lie past EOF
  int fixed = -1;    // index of the registered buffer holding `buf`, or -1
  size_t done = 0;
};

namespace {

// First error wins; the others are usually consequences of it.
class ErrorSlot {
 public:
  void set(int err, const Op& op, const char* what) {
    std::lock_guard<std::mutex> lock(mu_);
    if (failed_.load()) return;
    err_ = err;
    path_ = op.file->path();
    what_ = what;
    offset_ = op.offset + op.done;
    failed_.store(true);
  }
  // A failure not tied to one request (the ring itself).
  void set_general(int err, const char* what) {
    std::lock_guard<std::mutex> lock(mu_);
    if (failed_.load()) return;
    err_ = err;
    path_ = "<io_uring>";
    what_ = what;
    offset_ = UINT64_MAX;
    failed_.store(true);
  }
  bool failed() const { return failed_.load(); }
  [[noreturn]] void raise() const { throw_io_error(err_, path_, what_, offset_); }

 private:
  std::mutex mu_;
  std::atomic<bool> failed_{false};
  int err_ = 0;
  std::string path_;
  std::string what_;
  uint64_t offset_ = 0;
};

const char* op_name(const Op& op) {
  switch (op.kind) {
    case Op::kWrite: return "write";
    case Op::kRead: return "read";
    default: return "fdatasync";
  }
}

// Applies a completion result to `op`. Returns true when the op is finished
// (successfully or with the error recorded), false when it must be resubmitted.
bool complete(Op& op, int res, ErrorSlot& errors) {
  if (res == -EINTR || res == -EAGAIN) return false;
  if (res < 0) {
    errors.set(-res, op, op_name(op));
    return true;
  }
  if (op.kind == Op::kSync) return true;
  if (res == 0) {
    if (op.kind == Op::kRead && op.done >= op.need) return true;  // EOF after the bytes we need
    errors.set(op.kind == Op::kRead ? ENODATA : EIO, op,
               op.kind == Op::kRead ? "read (unexpected end of file)" : "write (no progress)");
    return true;
  }
  op.done += static_cast<size_t>(res);
  // A read that stopped at end-of-file after the bytes it needs is done: its
  // remainder would start at an unaligned offset, which O_DIRECT refuses.
  if (op.kind == Op::kRead && op.done >= op.need) return true;
  return op.done >= op.len;  // short transfer: resubmit the remainder
}

void run_sync_op(Op& op, ErrorSlot& errors) {
  while (!errors.failed()) {
    ssize_t res;
    if (op.kind == Op::kWrite) {
      res = ::pwrite(op.fd, op.buf + op.done, op.len - op.done, static_cast<off_t>(op.offset + op.done));
    } else if (op.kind == Op::kRead) {
      res = ::pread(op.fd, op.buf + op.done, op.len - op.done, static_cast<off_t>(op.offset + op.done));
    } else {
      res = ::fdatasync(op.fd);
    }
    if (complete(op, res < 0 ? -errno : static_cast<int>(res), errors)) return;
  }
}

void prep(io_uring_sqe* sqe, const Op& op) {
  char* p = op.buf + op.done;
  const unsigned n = static_cast<unsigned>(op.len - op.done);
  const uint64_t off = op.offset + op.done;
  switch (op.kind) {
    case Op::kWrite:
      if (op.fixed >= 0) io_uring_prep_write_fixed(sqe, op.fd, p, n, off, op.fixed);
      else io_uring_prep_write(sqe, op.fd, p, n, off);
      break;
    case Op::kRead:
      if (op.fixed >= 0) io_uring_prep_read_fixed(sqe, op.fd, p, n, off, op.fixed);
      else io_uring_prep_read(sqe, op.fd, p, n, off);
      break;
    case Op::kSync:
      io_uring_prep_fsync(sqe, op.fd, IORING_FSYNC_DATASYNC);
      break;
  }
}

// user_data of a request taken back after a failed submission (see
// cancel_unsubmitted); its completion, whenever it comes, is ignored.
constexpr uint64_t kCancelled = UINT64_MAX;

// After io_uring_submit fails, the last `io_uring_sq_ready(ring)` SQEs we
// prepared never reached the kernel. They must not run later, when their
// buffers may be gone, and no completion counts for them in this call.
//
// liburing (2.3 here, and up to at least 2.5) has no call that takes queued
// SQEs back: io_uring_submit has already published them to the kernel's SQ
// tail before io_uring_enter failed, so the next io_uring_enter on this ring
// would submit them. So they are rewritten in place as no-ops marked
// kCancelled: the kernel reads an SQE only while io_uring_enter submits it
// (no SQPOLL here), so changing one it has not consumed is safe, and goes
// through liburing's own prep calls rather than its ring fields. `pending`
// holds our SQEs not yet known to be consumed, oldest first; returns how
// many were cancelled.
unsigned cancel_unsubmitted(io_uring* ring, std::deque<io_uring_sqe*>& pending) {
  const unsigned unsubmitted = std::min<size_t>(io_uring_sq_ready(ring), pending.size());
  for (size_t i = pending.size() - unsubmitted; i < pending.size(); ++i) {
    io_uring_prep_nop(pending[i]);
    io_uring_sqe_set_data64(pending[i], kCancelled);
  }
  pending.clear();
  return unsubmitted;
}

// Drops from `pending` the SQEs the kernel has consumed (all but the last
// io_uring_sq_ready(ring), which submission left queued).
void forget_consumed(io_uring* ring, std::deque<io_uring_sqe*>& pending) {
  const size_t queued = std::min<size_t>(io_uring_sq_ready(ring), pending.size());
  pending.erase(pending.begin(), pending.end() - queued);
}

// One ring, up to `depth` requests in flight, pulling ops from a shared cursor.
// On error it stops taking new ops but always drains what is in flight: the
// kernel may still be writing from (or into) the caller's buffers.
void ring_worker(io_uring* ring, unsigned depth, std::vector<Op>& ops,
                 std::atomic<size_t>& cursor, ErrorSlot& errors) {
  std::deque<size_t> retry;
  std::deque<io_uring_sqe*> pending;  // prepared, not yet known to be consumed
  unsigned in_flight = 0;
  for (;;) {
    while (in_flight < depth && !errors.failed()) {
      size_t idx;
      if (!retry.empty()) {
        idx = retry.front();
        retry.pop_front();
      } else {
        idx = cursor.fetch_add(1);
        if (idx >= ops.size()) break;
      }
      io_uring_sqe* sqe = io_uring_get_sqe(ring);
      if (sqe == nullptr) {
        // The SQ is full of cancelled no-ops left by an earlier failed
        // submission: submit them (their completions are ignored), then retry.
        io_uring_submit(ring);
        sqe = io_uring_get_sqe(ring);
      }
      if (sqe == nullptr) {
        retry.push_front(idx);
        if (in_flight == 0) {
          errors.set_general(EBUSY, "io_uring_get_sqe (submission queue full)");
        }
        break;
      }
      prep(sqe, ops[idx]);
      io_uring_sqe_set_data64(sqe, idx);
      pending.push_back(sqe);
      ++in_flight;
    }
    if (in_flight == 0) return;
    int rc = io_uring_submit_and_wait(ring, 1);
    const bool broken = rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY;
    if (broken) {
      // The submission itself failed: wait only for the requests the kernel took.
      in_flight -= std::min(in_flight, cancel_unsubmitted(ring, pending));
      errors.set_general(-rc, "io_uring_submit");
    } else {
      forget_consumed(ring, pending);
    }
    io_uring_cqe* cqe;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(ring, head, cqe) {
      const uint64_t idx = io_uring_cqe_get_data64(cqe);
      ++seen;
      if (idx == kCancelled) continue;
      --in_flight;
      if (!complete(ops[idx], cqe->res, errors) && !errors.failed()) retry.push_back(idx);
    }
    io_uring_cq_advance(ring, seen);
    if (seen == 0 && broken) {
      // Submission broke and nothing completes: wait for the rest one by one.
      while (in_flight > 0 && io_uring_wait_cqe(ring, &cqe) == 0) {
        if (io_uring_cqe_get_data64(cqe) != kCancelled) --in_flight;
        io_uring_cqe_seen(ring, cqe);
      }
      return;
    }
  }
}

unsigned pool_threads(const EngineConfig& c) {
  // Blocking pwrite gets its concurrency from threads: one per queue slot.
  return std::max(1u, std::min(c.queue_depth, 64u));
}

}  // namespace

const char* engine_kind_name(EngineKind kind) {
  return kind == EngineKind::kIoUring ? "io_uring" : "threads";
}

EngineKind parse_engine_kind(const std::string& name) {
  if (name == "io_uring") return EngineKind::kIoUring;
  if (name == "threads") return EngineKind::kThreads;
  throw std::invalid_argument("engine kind must be 'io_uring' or 'threads', got '" + name + "'");
}

Engine::Engine(const EngineConfig& config) : config_(config) {
  if (config_.queue_depth == 0) config_.queue_depth = 1;
  if (config_.threads == 0) config_.threads = 1;
  if (config_.chunk_bytes < kPageSize) config_.chunk_bytes = kPageSize;
  config_.chunk_bytes = align_down(config_.chunk_bytes, kPageSize);
  if (config_.chunk_bytes > (1u << 30)) config_.chunk_bytes = 1u << 30;
  if (config_.kind == EngineKind::kThreads) return;
  for (unsigned i = 0; i < config_.threads; ++i) {
    auto ring = std::make_unique<io_uring>();
    const int rc = io_uring_queue_init(config_.queue_depth, ring.get(), 0);
    if (rc < 0) {
      for (auto& r : rings_) io_uring_queue_exit(r.get());
      rings_.clear();
      throw RingUnavailable("io_uring_queue_init failed: " + errno_text(-rc));
    }
    rings_.push_back(std::move(ring));
  }
}

Engine::~Engine() {
  for (auto& r : rings_) io_uring_queue_exit(r.get());
}

void Engine::execute(std::vector<Op>& ops) {
  if (ops.empty()) return;
  ErrorSlot errors;
  std::atomic<size_t> cursor{0};
  if (rings_.empty()) {
    const unsigned n = std::min<size_t>(pool_threads(config_), ops.size());
    auto work = [&] {
      for (size_t i; !errors.failed() && (i = cursor.fetch_add(1)) < ops.size();) {
        run_sync_op(ops[i], errors);
      }
    };
    std::vector<std::thread> pool;
    for (unsigned t = 1; t < n; ++t) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
  } else {
    const size_t n = std::min(rings_.size(), ops.size());
    std::vector<std::thread> workers;
    for (size_t t = 1; t < n; ++t) {
      workers.emplace_back(ring_worker, rings_[t].get(), config_.queue_depth, std::ref(ops),
                           std::ref(cursor), std::ref(errors));
    }
    ring_worker(rings_[0].get(), config_.queue_depth, ops, cursor, errors);
    for (auto& t : workers) t.join();
  }
  if (errors.failed()) errors.raise();
}

int Engine::fixed_index(const char* p, size_t len) const {
  if (registered_.empty()) return -1;
  auto it = std::upper_bound(registered_.begin(), registered_.end(), p,
                             [](const char* v, const std::pair<char*, size_t>& r) { return v < r.first; });
  if (it == registered_.begin()) return -1;
  --it;
  if (p + len <= it->first + it->second) return static_cast<int>(it - registered_.begin());
  return -1;
}

namespace {

void check_mode(const File& f, File::Mode want) {
  if (!f.is_open()) throw IoError(EBADF, f.path(), "file is closed");
  if (f.mode() != want) {
    throw IoError(EBADF, f.path(),
                  want == File::Mode::kWrite ? "file is not open for writing"
                                             : "file is not open for reading");
  }
}

// Memory for the few pieces that cannot go straight between the caller's
// buffer and the disk under O_DIRECT rules (unaligned memory, partial blocks).
struct Bounce {
  std::unique_ptr<AlignedBuffer> buffer;
  size_t used = 0;
  char* take(size_t n) {
    char* p = buffer->data() + used;
    used += align_up(n, kPageSize);
    return p;
  }
};

struct Copy {
  const char* src;
  char* dst;
  size_t len;
};

}  // namespace

void Engine::write(const std::vector<Extent>& extents) {
  std::lock_guard<std::mutex> lock(call_mu_);
  const size_t chunk = config_.chunk_bytes;

  // Each file's logical end before this call. Nothing at or past it has been
  // written through this File, so zero padding there overwrites nothing: later
  // extents of this same call that share the padded block start at unaligned
  // offsets and are written after the direct ones (see plan_write).
  std::unordered_map<const File*, uint64_t> prior_end;
  for (const Extent& e : extents) {
    check_mode(*e.file, File::Mode::kWrite);
    prior_end.emplace(e.file, e.file->logical_end());
  }
  std::vector<WritePlan> plans;
  plans.reserve(extents.size());
  size_t bounce_bytes = 0;
  for (const Extent& e : extents) {
    plans.push_back(plan_write(e.file->alignment(), e.offset, e.len,
                               reinterpret_cast<uintptr_t>(e.data), prior_end[e.file]));
    bounce_bytes += plans.back().bounce_bytes;
  }
  Bounce bounce;
  if (bounce_bytes > 0) bounce.buffer = std::make_unique<AlignedBuffer>(bounce_bytes);

  std::vector<Op> first, second;  // main descriptor, then the buffered one
  auto add = [&](std::vector<Op>& ops, int fd, const File* f, char* p, size_t n, uint64_t off) {
    for (size_t done = 0; done < n; done += chunk) {
      const size_t len = std::min(chunk, n - done);
      ops.push_back(Op{Op::kWrite, fd, f, p + done, len, off + done, len, fixed_index(p + done, len)});
    }
  };
  for (size_t i = 0; i < extents.size(); ++i) {
    const Extent& e = extents[i];
    const WritePlan& pl = plans[i];
    File& f = *e.file;
    if (e.len == 0) continue;
    f.note_written(e.offset + e.len);
    if (pl.copy) {
      if (pl.main_len > 0) {
        char* p = bounce.take(pl.main_len);
        std::memcpy(p, e.data, pl.pad_tail ? e.len : pl.bulk);
        add(first, f.fd(), &f, p, pl.main_len, e.offset);
      }
    } else {
      add(first, f.fd(), &f, e.data, pl.bulk, e.offset);
      if (pl.pad_tail) {
        const size_t block = pl.main_len - pl.bulk;
        char* p = bounce.take(block);
        std::memcpy(p, e.data + pl.bulk, e.len - pl.bulk);
        add(first, f.fd(), &f, p, block, e.offset + pl.bulk);
      }
    }
    if (pl.buffered_len > 0) {
      add(second, f.buffered_fd(), &f, e.data + pl.buffered_from, pl.buffered_len,
          e.offset + pl.buffered_from);
    }
  }
  execute(first);
  execute(second);
}

void Engine::read(const std::vector<Extent>& extents) {
  std::lock_guard<std::mutex> lock(call_mu_);
  const size_t chunk = config_.chunk_bytes;

  // Each extent as windows read straight into the caller's memory and bounce
  // windows (read into scratch, then copied out); see plan_read.
  struct Piece {
    const Extent* e;
    ReadWindow w;
  };
  std::vector<Piece> pieces;
  size_t bounce_bytes = 0;
  for (const Extent& e : extents) {
    check_mode(*e.file, File::Mode::kRead);
    for (const ReadWindow& w :
         plan_read(e.file->alignment(), e.offset, e.len, reinterpret_cast<uintptr_t>(e.data))) {
      pieces.push_back({&e, w});
      if (!w.bounce) continue;
      for (uint64_t off = 0; off < w.len; off += chunk) {
        bounce_bytes += align_up(std::min<uint64_t>(chunk, w.len - off), kPageSize);
      }
    }
  }
  Bounce bounce;
  if (bounce_bytes > 0) bounce.buffer = std::make_unique<AlignedBuffer>(bounce_bytes);

  std::vector<Op> ops;
  std::vector<Copy> copies;
  for (const Piece& pc : pieces) {
    const Extent& e = *pc.e;
    const ReadWindow& w = pc.w;
    const uint64_t start = e.offset, end = e.offset + e.len;
    for (uint64_t off = w.file_offset; off < w.file_offset + w.len; off += chunk) {
      const size_t len = std::min<uint64_t>(chunk, w.file_offset + w.len - off);
      const size_t need = static_cast<size_t>(std::min<uint64_t>(len, end > off ? end - off : 0));
      if (!w.bounce) {
        char* dst = e.data + (off - start);
        ops.push_back(Op{Op::kRead, e.file->fd(), e.file, dst, len, off, need, fixed_index(dst, len)});
        continue;
      }
      char* p = bounce.take(len);
      ops.push_back(Op{Op::kRead, e.file->fd(), e.file, p, len, off, need, -1});
      const uint64_t lo = std::max(off, start), hi = std::min<uint64_t>(off + len, end);
      if (lo < hi) copies.push_back({p + (lo - off), e.data + (lo - start), hi - lo});
    }
  }
  execute(ops);
  for (const Copy& c : copies) std::memcpy(c.dst, c.src, c.len);
}

void Engine::sync(const std::vector<File*>& files) {
  std::lock_guard<std::mutex> lock(call_mu_);
  std::vector<Op> ops;
  for (File* f : files) {
    check_mode(*f, File::Mode::kWrite);
    f->truncate_to_logical_end();
    ops.push_back(Op{Op::kSync, f->fd(), f, nullptr, 0, 0, 0});
  }
  execute(ops);
}

bool Engine::register_buffers(const std::vector<std::pair<char*, size_t>>& buffers,
                              std::string* why) {
  std::lock_guard<std::mutex> lock(call_mu_);
  if (rings_.empty()) {
    *why = "the thread-pool engine has no rings to register buffers with";
    return false;
  }
  auto sorted = buffers;
  std::sort(sorted.begin(), sorted.end());
  std::vector<iovec> iov;
  for (auto& [p, n] : sorted) iov.push_back({p, n});
  for (auto& r : rings_) {
    if (!registered_.empty()) io_uring_unregister_buffers(r.get());
  }
  registered_.clear();
  for (size_t i = 0; i < rings_.size(); ++i) {
    const int rc = io_uring_register_buffers(rings_[i].get(), iov.data(), iov.size());
    if (rc < 0) {
      for (size_t j = 0; j < i; ++j) io_uring_unregister_buffers(rings_[j].get());
      *why = "io_uring_register_buffers: " + errno_text(-rc) +
             (rc == -ENOMEM ? " (RLIMIT_MEMLOCK too small?)" : "");
      return false;
    }
  }
  registered_ = std::move(sorted);
  return true;
}

void Engine::unregister_buffers() {
  std::lock_guard<std::mutex> lock(call_mu_);
  if (registered_.empty()) return;
  for (auto& r : rings_) io_uring_unregister_buffers(r.get());
  registered_.clear();
}

}  // namespace fastpersist
