#include "alignment.h"

#include "aligned_buffer.h"

namespace fastpersist {

WritePlan plan_write(const Alignment& a, uint64_t offset, uint64_t len, uintptr_t address,
                     uint64_t prior_end) {
  WritePlan p;
  if (len == 0) return p;
  if (!a.direct) {
    p.main_len = p.bulk = len;
    return p;
  }
  if (offset % a.offset != 0) {
    p.buffered_len = len;
    return p;
  }
  p.bulk = align_down(len, a.offset);
  p.copy = address % a.memory != 0;
  p.pad_tail = p.bulk != len && offset + len >= prior_end;
  p.main_len = p.pad_tail ? align_up(len, a.offset) : p.bulk;
  if (p.copy) {
    p.bounce_bytes = align_up(p.main_len, kPageSize);
  } else if (p.pad_tail) {
    p.bounce_bytes = align_up(a.offset, kPageSize);
  }
  if (p.bulk != len && !p.pad_tail) {
    p.buffered_from = p.bulk;
    p.buffered_len = len - p.bulk;
  }
  return p;
}

std::vector<ReadWindow> plan_read(const Alignment& a, uint64_t offset, uint64_t len,
                                  uintptr_t address) {
  std::vector<ReadWindow> windows;
  if (len == 0) return windows;
  const uint64_t start = offset, end = offset + len;
  if (!a.direct) {
    windows.push_back({start, len, false});
    return windows;
  }
  const uint64_t mid_s = align_up(start, a.offset), mid_e = align_down(end, a.offset);
  const bool mid_ok = mid_s < mid_e && (address + (mid_s - start)) % a.memory == 0;
  if (mid_ok) {
    if (start < mid_s) windows.push_back({mid_s - a.offset, a.offset, true});
    windows.push_back({mid_s, mid_e - mid_s, false});
    if (mid_e < end) windows.push_back({mid_e, a.offset, true});
  } else {
    const uint64_t as = align_down(start, a.offset);
    windows.push_back({as, align_up(end, a.offset) - as, true});
  }
  return windows;
}

}  // namespace fastpersist
