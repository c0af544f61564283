"""CRC-32C of saved shards: of each record's bytes, and of its fixed-size
chunks.

Every shard record carries the CRC-32C (Castagnoli; the `crc32c` package,
hardware-accelerated) of all its bytes. A record longer than the chunk size
also carries one per chunk of `crc_chunk_bytes` (the last one shorter), so a
restore that needs only some rows of a saved shard (a resharding restore on
another topology) reads and verifies only the chunks holding them instead of
the whole shard. The bytes are read once: a chunked record's own CRC is
combined from its chunks' (`combine`, a few microseconds a chunk), where a
second pass would cost about 70 ms of CPU per GiB (crc32c at 14.5 GB/s on
this project's 2-core VM).
"""

from __future__ import annotations

import functools
from typing import Sequence

import crc32c


class ShardChecksums:
  """Running CRC-32Cs of records whose bytes arrive in order, piece by piece.

  Args:
    sizes: bytes of each record (by record number).
    chunk_bytes: chunk size (a multiple of 4096); records longer than this
      get chunk CRCs. 0: none.
  """

  def __init__(self, sizes: Sequence[int], chunk_bytes: int):
    self._sizes = list(sizes)
    self._chunk_bytes = chunk_bytes
    self._crcs = [0] * len(self._sizes)
    self._done = [0] * len(self._sizes)   # bytes seen so far
    self._chunks: dict[int, list[int]] = {
        i: [] for i, n in enumerate(self._sizes) if chunk_bytes and n > chunk_bytes}
    self._chunk_crc = dict.fromkeys(self._chunks, 0)

  def update(self, record: int, data) -> None:
    """Adds `data` (the record's next bytes: bytes or a 1-D uint8 array)."""
    chunks = self._chunks.get(record)
    if chunks is None:
      self._crcs[record] = crc32c.crc32c(data, self._crcs[record])
      self._done[record] += len(data)
      return
    at, size, step = 0, len(data), self._chunk_bytes
    while at < size:
      done = self._done[record]
      take = min(size - at, step - done % step)
      self._chunk_crc[record] = crc32c.crc32c(data[at:at + take], self._chunk_crc[record])
      at += take
      self._done[record] = done + take
      if self._done[record] % step == 0 or self._done[record] == self._sizes[record]:
        chunks.append(self._chunk_crc[record])
        self._chunk_crc[record] = 0

  def crc(self, record: int) -> int:
    """The CRC-32C of the record's bytes seen so far (of a chunked record:
    its chunks' CRCs combined)."""
    chunks = self._chunks.get(record)
    if chunks is None:
      return self._crcs[record]
    step, size, total = self._chunk_bytes, self._sizes[record], 0
    for c, chunk_crc in enumerate(chunks):
      total = combine(total, chunk_crc, min(step, size - c * step))
    partial = self._done[record] - len(chunks) * step   # bytes of the chunk under way
    return combine(total, self._chunk_crc[record], partial) if partial > 0 else total

  def chunk_crcs(self, record: int) -> tuple[int, ...] | None:
    """The CRC-32C of each whole chunk of the record, or None (a record of
    at most one chunk, or chunk CRCs off). Complete once every byte was
    added."""
    chunks = self._chunks.get(record)
    return None if chunks is None else tuple(chunks)


# Combining CRCs without the data ----------------------------------------------
#
# A CRC is the remainder of the message polynomial modulo the generator P, so
# CRC(A || B) = CRC(A) * x^(8 len(B)) mod P  xor  CRC(B): the initial value and
# final xor of CRC-32C cancel out in that sum (the reasoning behind zlib's
# crc32_combine; see also Castagnoli's paper for P). Polynomials here are in
# CRC-32C's reflected bit order: bit 31 is x^0.

_POLY = 0x82F63B78   # CRC-32C (Castagnoli), reflected
_X0 = 1 << 31        # the polynomial 1


def _multiply(a: int, b: int) -> int:
  """a * b mod P, both reflected 32-bit polynomials."""
  product = 0
  for bit in range(31, -1, -1):
    if a & (1 << bit):
      product ^= b
    b = (b >> 1) ^ _POLY if b & 1 else b >> 1
  return product


# _X_POW2[k] = x^(2^k) mod P.
_X_POW2 = [_X0 >> 1]
for _ in range(63):
  _X_POW2.append(_multiply(_X_POW2[-1], _X_POW2[-1]))


@functools.lru_cache(maxsize=64)
def _shift_by(nbytes: int) -> int:
  """x^(8 nbytes) mod P: what appending `nbytes` bytes multiplies a CRC by."""
  out, k, n = _X0, 3, nbytes
  while n:
    if n & 1:
      out = _multiply(_X_POW2[k % 64], out)
    n >>= 1
    k += 1
  return out


def combine(crc_a: int, crc_b: int, len_b: int) -> int:
  """CRC-32C of A || B from CRC-32C(A), CRC-32C(B) and len(B) in bytes."""
  return _multiply(_shift_by(len_b), crc_a) ^ crc_b


def chunks_combine_to(crc: int, chunk_crcs: Sequence[int], nbytes: int, chunk_bytes: int) -> bool:
  """Whether chunk CRCs of a record of `nbytes` (chunks of `chunk_bytes`, the
  last shorter) combine to the record's `crc`: then a reader checking chunks
  can never accept bytes the record's CRC refuses."""
  total = 0
  for c, chunk_crc in enumerate(chunk_crcs):
    total = combine(total, chunk_crc, min(chunk_bytes, nbytes - c * chunk_bytes))
  return total == crc


def chunk_count(nbytes: int, chunk_bytes: int) -> int:
  """Chunks of `chunk_bytes` covering `nbytes` (the last may be shorter)."""
  return -(-nbytes // chunk_bytes)


def chunks_covering(ranges: Sequence[tuple[int, int]], chunk_bytes: int
                    ) -> list[tuple[int, int]]:
  """The chunk runs [first, stop) covering byte ranges [start, end) of a
  record, merged and in order; empty ranges cover nothing."""
  ids = sorted({c for start, end in ranges if end > start
                for c in range(start // chunk_bytes, (end - 1) // chunk_bytes + 1)})
  runs: list[tuple[int, int]] = []
  for c in ids:
    if runs and runs[-1][1] == c:
      runs[-1] = (runs[-1][0], c + 1)
    else:
      runs.append((c, c + 1))
  return runs
