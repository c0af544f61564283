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

// One ring, up to `depth` requests in flight, pulling ops from a shared cursor.
// On error it stops taking new ops but always drains what is in flight: the
// kernel may still be writing from (or into) the caller's buffers.
void ring_worker(io_uring* ring, unsigned depth, std::vector<Op>& ops,
                 std::atomic<size_t>& cursor, ErrorSlot& errors) {
  std::deque<size_t> retry;
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
      if (sqe == nullptr) {  // cannot happen with depth <= ring size; be safe
        retry.push_front(idx);
        break;
      }
      prep(sqe, ops[idx]);
      io_uring_sqe_set_data64(sqe, idx);
      ++in_flight;
    }
    if (in_flight == 0) return;
    int rc = io_uring_submit_and_wait(ring, 1);
    if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
      // The submission itself failed. Requests still queued in the SQ never
      // reached the kernel: drop them (they must not be submitted by a later
      // call, and no completion will come for them), then wait only for the
      // ones the kernel did take.
      const unsigned never_submitted = io_uring_sq_ready(ring);
      ring->sq.sqe_tail = ring->sq.sqe_head;
      in_flight -= std::min(in_flight, never_submitted);
      errors.set_general(-rc, "io_uring_submit");
    }
    io_uring_cqe* cqe;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(ring, head, cqe) {
      const size_t idx = io_uring_cqe_get_data64(cqe);
      ++seen;
      --in_flight;
      if (!complete(ops[idx], cqe->res, errors) && !errors.failed()) retry.push_back(idx);
    }
    io_uring_cq_advance(ring, seen);
    if (seen == 0 && rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
      // Submission broke and nothing completes: wait for the rest one by one.
      while (in_flight > 0 && io_uring_wait_cqe(ring, &cqe) == 0) {
        io_uring_cqe_seen(ring, cqe);
        --in_flight;
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

Engine::Engine(const EngineConfig& config) : config_(config) {
  if (config_.queue_depth == 0) config_.queue_depth = 1;
  if (config_.threads == 0) config_.threads = 1;
  if (config_.chunk_bytes < kPageSize) config_.chunk_bytes = kPageSize;
  config_.chunk_bytes = align_down(config_.chunk_bytes, kPageSize);
  if (config_.chunk_bytes > (1u << 30)) config_.chunk_bytes = 1u << 30;
  if (config_.kind == "threads") return;
  if (config_.kind != "io_uring") {
    throw std::invalid_argument("engine kind must be 'io_uring' or 'threads', got '" +
                                config_.kind + "'");
  }
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

  // How each extent of an O_DIRECT file at an aligned offset is written: the
  // whole blocks (`bulk`) go direct, from the caller's memory or, when that is
  // misaligned, from a bounce copy. A final partial block is either padded
  // with zeros to a whole block and written direct (sync() cuts the file back
  // to its logical end), or, when those zeros could land on bytes an earlier
  // write() call put there, written as is through the buffered descriptor.
  struct Plan {
    size_t bulk = 0;
    bool copy = false;         // bulk (and a padded tail) come from bounce memory
    bool pad_tail = false;     // tail written direct, padded with zeros
  };
  // Each file's logical end before this call. Nothing at or past it has been
  // written through this File, so zero padding there overwrites nothing: later
  // extents of this same call that share the padded block start at unaligned
  // offsets and are written after the direct ones.
  std::unordered_map<const File*, uint64_t> prior_end;
  for (const Extent& e : extents) {
    check_mode(*e.file, File::Mode::kWrite);
    prior_end.emplace(e.file, e.file->logical_end());
  }
  std::vector<Plan> plans(extents.size());
  size_t bounce_bytes = 0;
  for (size_t i = 0; i < extents.size(); ++i) {
    const Extent& e = extents[i];
    const File& f = *e.file;
    if (e.len == 0 || !f.direct() || e.offset % f.offset_align() != 0) continue;
    Plan& pl = plans[i];
    pl.bulk = align_down(e.len, f.offset_align());
    pl.copy = reinterpret_cast<uintptr_t>(e.data) % f.mem_align() != 0;
    pl.pad_tail = pl.bulk != e.len && e.offset + e.len >= prior_end[&f];
    const size_t direct_len = pl.pad_tail ? align_up(e.len, f.offset_align()) : pl.bulk;
    if (pl.copy) {
      bounce_bytes += align_up(direct_len, kPageSize);
    } else if (pl.pad_tail) {
      bounce_bytes += align_up(f.offset_align(), kPageSize);
    }
  }
  Bounce bounce;
  if (bounce_bytes > 0) bounce.buffer = std::make_unique<AlignedBuffer>(bounce_bytes);

  std::vector<Op> aligned, unaligned;
  auto add = [&](std::vector<Op>& ops, int fd, const File* f, char* p, size_t n, uint64_t off) {
    for (size_t done = 0; done < n; done += chunk) {
      const size_t len = std::min(chunk, n - done);
      ops.push_back(Op{Op::kWrite, fd, f, p + done, len, off + done, len, fixed_index(p + done, len)});
    }
  };
  for (size_t i = 0; i < extents.size(); ++i) {
    const Extent& e = extents[i];
    File& f = *e.file;
    if (e.len == 0) continue;
    f.note_written(e.offset + e.len);
    if (!f.direct()) {
      add(aligned, f.fd(), &f, e.data, e.len, e.offset);
      continue;
    }
    if (e.offset % f.offset_align() != 0) {
      add(unaligned, f.buffered_fd(), &f, e.data, e.len, e.offset);
      continue;
    }
    const Plan& pl = plans[i];
    const size_t tail = e.len - pl.bulk;
    if (pl.copy) {
      const size_t direct_len = pl.pad_tail ? align_up(e.len, f.offset_align()) : pl.bulk;
      if (direct_len > 0) {
        char* p = bounce.take(direct_len);
        std::memcpy(p, e.data, pl.pad_tail ? e.len : pl.bulk);
        add(aligned, f.fd(), &f, p, direct_len, e.offset);
      }
    } else {
      add(aligned, f.fd(), &f, e.data, pl.bulk, e.offset);
      if (tail > 0 && pl.pad_tail) {
        char* p = bounce.take(f.offset_align());
        std::memcpy(p, e.data + pl.bulk, tail);
        add(aligned, f.fd(), &f, p, f.offset_align(), e.offset + pl.bulk);
      }
    }
    if (tail > 0 && !pl.pad_tail) {
      add(unaligned, f.buffered_fd(), &f, e.data + pl.bulk, tail, e.offset + pl.bulk);
    }
  }
  execute(aligned);
  execute(unaligned);
}

void Engine::read(const std::vector<Extent>& extents) {
  std::lock_guard<std::mutex> lock(call_mu_);
  const size_t chunk = config_.chunk_bytes;

  // Plan each extent as direct pieces (straight into the caller's memory) and
  // bounce pieces (an aligned window read into scratch, then copied out).
  struct Piece {
    const Extent* e;
    uint64_t file_off;  // aligned start of the window read from the file
    size_t len;         // window length
    bool bounce;
  };
  std::vector<Piece> pieces;
  size_t bounce_bytes = 0;
  auto push = [&](const Piece& pc) {
    pieces.push_back(pc);
    if (!pc.bounce) return;
    for (uint64_t off = 0; off < pc.len; off += chunk) {
      bounce_bytes += align_up(std::min<uint64_t>(chunk, pc.len - off), kPageSize);
    }
  };
  for (const Extent& e : extents) {
    check_mode(*e.file, File::Mode::kRead);
    if (e.len == 0) continue;
    const File& f = *e.file;
    const uint64_t start = e.offset, end = e.offset + e.len;
    if (!f.direct()) {
      push({&e, start, e.len, false});
      continue;
    }
    const uint64_t a = f.offset_align();
    const uint64_t mid_s = align_up(start, a), mid_e = align_down(end, a);
    const bool mid_ok = mid_s < mid_e &&
                        reinterpret_cast<uintptr_t>(e.data + (mid_s - start)) % f.mem_align() == 0;
    if (mid_ok) {
      if (start < mid_s) push({&e, mid_s - a, a, true});
      push({&e, mid_s, mid_e - mid_s, false});
      if (mid_e < end) push({&e, mid_e, a, true});
    } else {
      const uint64_t as = align_down(start, a);
      push({&e, as, align_up(end, a) - as, true});
    }
  }
  Bounce bounce;
  if (bounce_bytes > 0) bounce.buffer = std::make_unique<AlignedBuffer>(bounce_bytes);

  std::vector<Op> ops;
  std::vector<Copy> copies;
  for (const Piece& pc : pieces) {
    const Extent& e = *pc.e;
    const uint64_t start = e.offset, end = e.offset + e.len;
    for (uint64_t off = pc.file_off; off < pc.file_off + pc.len; off += chunk) {
      const size_t len = std::min<uint64_t>(chunk, pc.file_off + pc.len - off);
      const size_t need = static_cast<size_t>(std::min<uint64_t>(len, end > off ? end - off : 0));
      if (!pc.bounce) {
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
