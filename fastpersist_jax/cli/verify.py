"""`verify`: read every byte of a checkpoint and check every manifest and
every CRC-32C, without building arrays or needing the saved devices.

Data files are read sequentially in large windows into one reusable aligned
buffer (two halves: the next window is read while the previous one is
checksummed), so the pass runs at the disk's speed in bounded memory.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Callable

import crc32c
import numpy as np

from fastpersist_jax import checksums, disk_format, reader
from fastpersist_jax.errors import FastPersistError
from fastpersist_jax.io_engine import AlignedBuffer, IOEngine
from fastpersist_jax.options import FastPersistOptions

MiB = 1 << 20
# Bytes of the reusable read buffer (--buffer_mib=256).
DEFAULT_BUFFER_BYTES = 256 * MiB
# A gap this large between two shards of a file starts a new read window
# rather than reading the bytes between them.
_MAX_GAP = 1 * MiB


@dataclasses.dataclass
class ItemReport:
  """The outcome of verifying one item directory.

  Attributes:
    directory: the item directory.
    process_count: processes that saved it (from the metadata; 0 when the
      metadata could not be read).
    processes_checked: process indices whose manifest was read and checked.
    placement: "shared" (one directory for all processes) or "per_host"
      (each host's files on its own disk).
    leaves: leaves in the saved tree.
    shards: shard records whose CRC-32C was checked.
    bytes_read: bytes of data files read (the read windows; may include the
      gaps of up to 1 MiB between shards).
    seconds: wall-clock seconds the item took.
    damage: one message per problem found (empty: intact).
  """
  directory: str
  process_count: int = 0
  processes_checked: list[int] = dataclasses.field(default_factory=list)
  placement: str = "shared"
  leaves: int = 0
  shards: int = 0            # shard records whose checksum was checked
  bytes_read: int = 0
  seconds: float = 0.0
  damage: list[str] = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    """Whether no damage was found."""
    return not self.damage

  @property
  def partial(self) -> bool:
    """A per-host checkpoint of which only some processes' files are here."""
    return len(self.processes_checked) < self.process_count and self.placement == "per_host"


@dataclasses.dataclass
class _Piece:
  process: int
  rec: disk_format.ShardRecord
  at: int       # offset in the window
  nbytes: int


@dataclasses.dataclass
class _Window:
  process: int
  file_id: int
  start: int    # file offset, SHARD_ALIGN-aligned
  length: int
  pieces: list[_Piece]


def _windows(process: int, file_id: int, records: list[disk_format.ShardRecord],
             limit: int) -> list[_Window]:
  """Read windows of at most `limit` bytes covering every record of one file,
  in file order; a record larger than `limit` spans several windows."""
  out: list[_Window] = []
  win: _Window | None = None
  for rec in sorted(records, key=lambda r: r.offset):
    offset, left = rec.offset, rec.nbytes
    if win is not None and offset - (win.start + win.length) > _MAX_GAP:
      win = None
    while left:
      if win is None or offset - win.start >= limit:
        win = _Window(process, file_id, offset, 0, [])
        out.append(win)
      take = min(left, win.start + limit - offset)
      win.pieces.append(_Piece(process, rec, offset - win.start, take))
      win.length = offset + take - win.start
      offset += take
      left -= take
  return out


def verify_item(directory: str, engine: IOEngine, buffer: np.ndarray,
                on_damage: Callable[[str], None] | None = None) -> ItemReport:
  """Verifies one item directory: metadata (and custom metadata), every manifest present, that the
  shards tile every array (unless per-host files are missing), and every
  shard's CRC-32C.

  Args:
    directory: the item directory (holding fastpersist.json).
    engine: the IOEngine that reads the data files.
    buffer: a 1-D uint8 numpy array over page-aligned memory (an
      AlignedBuffer) of at least 2 * 4096 bytes, split in two halves, each a
      multiple of 4096 bytes: one is read into while the other is
      checksummed, so read windows are at most half of it.
    on_damage: called with each damage message as it is found.

  Returns:
    The ItemReport. Damage (unreadable or corrupt metadata, manifests or
    data, a missing manifest, shards that do not tile an array, a checksum
    mismatch, a read error) is collected in it, never raised.
  """
  report = ItemReport(directory)

  def damaged(msg: str) -> None:
    report.damage.append(msg)
    if on_damage:
      on_damage(msg)

  t0 = time.perf_counter()
  try:
    rd = reader.CheckpointReader(directory, engine, manifests=False)
  except FastPersistError as e:
    damaged(str(e))
    return report
  try:
    disk_format.read_custom_metadata(directory)
  except FastPersistError as e:
    damaged(str(e))
  with rd:
    report.process_count = rd.meta.process_count
    report.placement = rd.meta.placement
    report.leaves = len(rd.meta.leaves)
    for p in rd.present_processes():
      try:
        rd.manifests[p] = disk_format.read_manifest(directory, p, rd.meta)
        report.processes_checked.append(p)
      except FastPersistError as e:
        damaged(str(e))
    if not rd.present_processes():
      damaged(f"{directory}: no manifest of any process")
    if rd.manifests and not report.damage:
      try:
        for i in range(len(rd.meta.leaves)):
          if not report.partial and (why := rd.coverage_error(i)):
            damaged(why)
      except FastPersistError as e:   # parts or shards overlap
        damaged(str(e))
    _check_data(rd, engine, buffer, report, damaged)
  report.seconds = time.perf_counter() - t0
  return report


def _check_data(rd: reader.CheckpointReader, engine: IOEngine, buffer: np.ndarray,
                report: ItemReport, damaged: Callable[[str], None]) -> None:
  """Streams every data file listed by the manifests read and checks each
  record's CRC-32C, and its chunks' where the manifest records them."""
  half = (buffer.nbytes // 2) // disk_format.SHARD_ALIGN * disk_format.SHARD_ALIGN
  halves = (buffer[:half], buffer[half:2 * half])
  windows: list[_Window] = []
  for p, m in sorted(rd.manifests.items()):
    by_file: dict[int, list[disk_format.ShardRecord]] = {}
    for rec in m.shards:
      if rec.nbytes == 0:
        report.shards += 1
        if rec.crc32c != 0:   # the CRC-32C of no bytes
          damaged(f"{rd.directory}: {rd.describe(p, rec)}: checksum mismatch")
      else:
        by_file.setdefault(rec.file, []).append(rec)
    for file_id, records in sorted(by_file.items()):
      windows.extend(_windows(p, file_id, records, half))

  def load(k: int) -> None:
    w = windows[k]
    engine.read([(rd.file(w.process, w.file_id), w.start, halves[k % 2][:w.length])])

  crcs: dict[int, int] = {}   # id(record) -> CRC of its bytes so far
  # Records with chunk CRCs: their chunks' CRCs, as the bytes stream by.
  chunked = {id(rec): checksums.ShardChecksums([rec.nbytes], rec.chunk_bytes)
             for m in rd.manifests.values() for rec in m.shards if rec.chunk_crc32c is not None}
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fastpersist-verify") as pool:
    pending = pool.submit(load, 0) if windows else None
    for k, w in enumerate(windows):
      try:
        pending.result()
      except (FastPersistError, OSError, RuntimeError) as e:
        damaged(f"{rd.directory}: {rd.manifests[w.process].files[w.file_id][0]} cannot be "
                f"read at {w.start}: {e}")
        pending = pool.submit(load, k + 1) if k + 1 < len(windows) else None
        for piece in w.pieces:
          crcs[id(piece.rec)] = -1
        continue
      pending = pool.submit(load, k + 1) if k + 1 < len(windows) else None
      data = halves[k % 2]
      report.bytes_read += w.length
      for piece in w.pieces:
        key = id(piece.rec)
        prev = crcs.get(key, 0)
        if prev == -1:
          continue   # part of it could not be read: already reported
        piece_bytes = data[piece.at:piece.at + piece.nbytes]
        if key in chunked:   # one pass: the record's CRC is combined from its chunks'
          chunked[key].update(0, piece_bytes)
        else:
          crc = crc32c.crc32c(piece_bytes, prev)
        end = piece.rec.offset + piece.rec.nbytes
        if w.start + piece.at + piece.nbytes < end:
          crcs[key] = 0 if key in chunked else crc   # more of this record in the next window
          continue
        crcs.pop(key, None)
        report.shards += 1
        if key in chunked:
          crc = chunked[key].crc(0)
        if crc != piece.rec.crc32c:
          damaged(f"{rd.directory}: {rd.describe(piece.process, piece.rec)}: checksum mismatch")
        elif key in chunked and chunked[key].chunk_crcs(0) != piece.rec.chunk_crc32c:
          bad = next(c for c, (a, b) in enumerate(zip(chunked[key].chunk_crcs(0),
                                                     piece.rec.chunk_crc32c)) if a != b)
          step = piece.rec.chunk_bytes
          damaged(f"{rd.directory}: {rd.describe(piece.process, piece.rec)}: chunk checksum "
                  f"mismatch at bytes [{bad * step}, {min((bad + 1) * step, piece.rec.nbytes)})")


def verify(path: str, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
           on_damage: Callable[[str], None] | None = None) -> list[ItemReport]:
  """Verifies an item directory, or every item of an Orbax step directory.

  Args:
    path: an item directory or an Orbax step directory of items.
    buffer_bytes: size of the read buffer in bytes; it is cut to twice the
      largest item's data files (rounded up to 4096) and is at least 8192.
    on_damage: called with each damage message as it is found.

  Returns:
    One ItemReport per item, in item-name order; damage is reported in them,
    not raised.

  Raises:
    CheckpointNotFoundError: `path` is not a directory or holds no
      fastpersist checkpoint (a usage error).
    IOUringUnavailableError / ValueError: FASTPERSIST_ENGINE asks for
      io_uring, which is refused / holds an unknown engine name.
    OSError: the read buffer cannot be allocated (mmap(2)).
  """
  items = reader.item_directories(path)
  engine = IOEngine(FastPersistOptions())
  # No larger than the data files need (two halves of a window each).
  data = max((_data_bytes(item) for item in items), default=0)
  size = min(buffer_bytes, 2 * disk_format.align_up(data))
  buffer = np.frombuffer(AlignedBuffer(max(size, 2 * disk_format.SHARD_ALIGN)), np.uint8)
  return [verify_item(item, engine, buffer, on_damage) for item in items]


def _data_bytes(directory: str) -> int:
  try:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
               if f.startswith("data."))
  except OSError:
    return 0


def format_report(r: ItemReport) -> str:
  """One line about `r`: leaves, shards and manifests checked, bytes read,
  seconds, GB/s (1e9 bytes/s of bytes_read) and the verdict ("OK" or
  "DAMAGED (n problem(s))")."""
  gbps = r.bytes_read / r.seconds / 1e9 if r.seconds > 0 else 0.0
  procs = (f"processes {r.processes_checked} of {r.process_count} ({r.placement} placement: the "
           "others' files are on their hosts; verified what is here)" if r.partial else
           f"{len(r.processes_checked)} of {r.process_count} manifests")
  verdict = "OK" if r.ok else f"DAMAGED ({len(r.damage)} problem(s))"
  return (f"{r.directory}: {r.leaves} leaves, {r.shards} shards, {procs}; {r.bytes_read} bytes "
          f"in {r.seconds:.3f} s, {gbps:.2f} GB/s: {verdict}")


def main(path: str, buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> int:
  """The verify command: prints "DAMAGED: MESSAGE" for each problem as
  found, one format_report line per item, and a total line (bytes, seconds,
  GB/s, verdict).

  Args:
    path: an item directory or an Orbax step directory of items.
    buffer_bytes: read buffer size in bytes (--buffer_mib << 20).

  Returns:
    The exit status: 0 every item intact, 1 any damage.

  Raises:
    As verify(): CheckpointNotFoundError (a usage error: exit 2 in
    __main__), IOUringUnavailableError, ValueError, OSError.
  """
  reports = verify(path, buffer_bytes, on_damage=lambda msg: print(f"DAMAGED: {msg}", flush=True))
  for r in reports:
    print(format_report(r))
    if "orbax-checkpoint-tmp" in r.directory:
      print(f"note: {r.directory} is in an uncommitted Orbax step directory (a save still being "
            "written, or one that never finished)")
  total = sum(r.bytes_read for r in reports)
  seconds = sum(r.seconds for r in reports)
  ok = all(r.ok for r in reports)
  print(f"total: {total} bytes in {seconds:.3f} s, "
        f"{total / seconds / 1e9 if seconds else 0.0:.2f} GB/s: "
        f"{'OK' if ok else 'DAMAGED'}")
  return 0 if ok else 1
