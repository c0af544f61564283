"""Record and chunk CRC-32Cs (fastpersist_jax/checksums.py): the same values
whatever pieces the bytes arrive in."""

from __future__ import annotations

import crc32c
import numpy as np
from hypothesis import given, settings, strategies as st

from fastpersist_jax import checksums


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 3 * 4096 + 17), min_size=1, max_size=3),
       st.sampled_from([0, 4096, 8192]), st.data())
def test_record_and_chunk_crcs_whatever_the_pieces(sizes, chunk, data):
  rng = np.random.default_rng(len(sizes))
  records = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
  sums = checksums.ShardChecksums(sizes, chunk)
  for i, rec in enumerate(records):   # each record's bytes in random pieces, in order
    at = 0
    while at < len(rec):
      n = data.draw(st.integers(1, len(rec) - at))
      sums.update(i, rec[at:at + n])
      at += n
      assert sums.crc(i) == crc32c.crc32c(rec[:at])   # also part way through a record
  for i, rec in enumerate(records):
    assert sums.crc(i) == crc32c.crc32c(rec)
    expected = ([crc32c.crc32c(rec[c:c + chunk]) for c in range(0, len(rec), chunk)]
                if chunk and len(rec) > chunk else None)
    assert sums.chunk_crcs(i) == (tuple(expected) if expected is not None else None)
    if expected is not None:
      assert len(expected) == checksums.chunk_count(len(rec), chunk)


def test_chunks_covering_merges_runs():
  assert checksums.chunks_covering([(0, 1)], 4096) == [(0, 1)]
  assert checksums.chunks_covering([(4095, 4097)], 4096) == [(0, 2)]
  assert checksums.chunks_covering([(8192, 12288), (0, 4096)], 4096) == [(0, 1), (2, 3)]
  assert checksums.chunks_covering([(0, 4096), (4096, 8192), (20000, 20000)], 4096) == [(0, 2)]
  assert checksums.chunks_covering([], 4096) == []


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.binary(max_size=5000), st.binary(max_size=5000))
def test_combine_gives_the_crc_of_the_concatenation(a, b):
  assert checksums.combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b)) == crc32c.crc32c(a + b)


def test_chunk_crcs_combine_to_the_record_crc_and_nothing_else():
  data = np.random.default_rng(1).integers(0, 256, 3 * 4096 + 5, dtype=np.uint8)
  sums = checksums.ShardChecksums([data.nbytes], 4096)
  sums.update(0, data)
  chunks = list(sums.chunk_crcs(0))
  assert checksums.chunks_combine_to(sums.crc(0), chunks, data.nbytes, 4096)
  for c in range(len(chunks)):
    bad = list(chunks)
    bad[c] ^= 1 << (c * 7 % 32)
    assert not checksums.chunks_combine_to(sums.crc(0), bad, data.nbytes, 4096)
