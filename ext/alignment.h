// O_DIRECT alignment planning: how one extent (a byte range of host memory and
// its place in a file) is split into requests the kernel accepts. Pure
// arithmetic, no I/O; Engine::write and Engine::read carry the plans out.
//
// O_DIRECT wants the file offset and length of each request to be multiples
// of the file's offset alignment (its logical block size), and the memory
// address a multiple of its memory alignment. What does not fit goes through
// page-aligned bounce memory or, for writes, through a second, buffered
// descriptor.
#pragma once

#include <cstdint>
#include <vector>

namespace fastpersist {

// What O_DIRECT requires of one file. `direct` false: the file is buffered
// and any request is accepted as is.
struct Alignment {
  bool direct = false;
  uint64_t offset = 1;  // file offsets and lengths: multiples of this
  uint64_t memory = 1;  // memory addresses: multiples of this
};

// How one extent of `len` bytes is written at file offset `offset`.
//
// First, `main_len` bytes at `offset` go through the file's main descriptor
// (O_DIRECT for a direct file): the leading whole blocks (`bulk` bytes) and,
// with `pad_tail`, the final partial block padded with zeros to a whole block
// (Engine::sync cuts the file back to its logical end). With `copy`, all of it
// comes from bounce memory (the source address is misaligned); otherwise the
// bulk comes straight from the caller's memory and only a padded tail block
// from bounce memory. Then, `buffered_len` bytes starting `buffered_from`
// bytes into the extent go through the buffered descriptor: the whole extent
// when its offset is unaligned, or a partial last block whose zero padding
// could land on bytes written before (it ends short of `prior_end`).
struct WritePlan {
  uint64_t main_len = 0;
  uint64_t bulk = 0;
  bool copy = false;
  bool pad_tail = false;
  uint64_t buffered_from = 0;
  uint64_t buffered_len = 0;
  uint64_t bounce_bytes = 0;  // bounce memory this plan takes (whole pages)
};

// `address`: where the extent's bytes are in memory; `prior_end`: the file's
// logical end before this batch of writes (nothing at or past it has been
// written, so padding there overwrites nothing).
WritePlan plan_write(const Alignment& a, uint64_t offset, uint64_t len, uintptr_t address,
                     uint64_t prior_end);

// One read request window of the file: `len` bytes at `file_offset`, read
// straight into the caller's memory, or (`bounce`) into bounce memory and
// copied out of it.
struct ReadWindow {
  uint64_t file_offset;
  uint64_t len;
  bool bounce;
};

// The windows that read `len` bytes at `offset` into memory at `address`: at
// most a bounce block before, the aligned middle read direct when its memory
// is aligned too, and a bounce block after; otherwise one bounce window over
// every block the extent touches. Empty for len 0. Windows may extend past
// the extent (and the file's end); only the extent's bytes are copied out.
std::vector<ReadWindow> plan_read(const Alignment& a, uint64_t offset, uint64_t len,
                                  uintptr_t address);

}  // namespace fastpersist
