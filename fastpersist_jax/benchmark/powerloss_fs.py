"""A one-file FUSE filesystem that logs every write and every flush, in order:
the recording half of the dm-log-writes / CrashMonkey method, for kernels
without device-mapper.

The filesystem serves a single file, `disk.img`, backed by a file on the
real disk (the "live" image, which every write reaches). A loop device on
`disk.img` carries the filesystem under test (ext4); the loop driver turns
its block writes into FUSE writes and every cache flush it receives
(REQ_PREFLUSH / FUA, emulated as a flush) into an fsync of `disk.img`, so
this server sees, in order, what a disk with a volatile write cache would:

  W offset bytes     a write (acknowledged once logged and applied)
  F                  a flush: every write acknowledged before it is durable

The log is a file of records (see LogRecord / read_log). A "power cut"
(the `cut` command) stops the log: whatever arrives afterwards still
reaches the live image (so the running kernel sees a coherent disk and
nothing wedges), but is not logged, so no crash image built from the log
contains it. Crash images are built by replaying the log onto the image as
it was when logging started (the base): everything up to the last flush,
plus any in-order subset of the writes after it (powerloss.py).

Run as a server process: `python -m fastpersist_jax.benchmark.powerloss_fs
BACKING LOG MOUNTPOINT`. It mounts itself (foreground), prints `ready` once
the kernel has initialised the mount, and reads commands on stdin, one a
line, answering each with one line on stdout:

  cut          -> "cut <records logged> <time>"   stop logging now (idempotent)
  cutafter M   -> "armed", later "cut <records logged> <time>" once M more
                  records are logged (the M-th is the last one logged)
  stats        -> "stats <writes> <flushes> <bytes> <cut: 0|1>"

<time> is time.monotonic() at the cut (CLOCK_MONOTONIC: comparable with
the controlling process's clock).

It exits when unmounted (fusermount3 -u MOUNTPOINT) or killed.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import sys
import threading
import time
from typing import Iterator, NamedTuple

FILE_NAME = "disk.img"
# A record's header: kind (b"W" or b"F"), offset, length; the data follows
# a W header.
_HEADER = struct.Struct("<cQQ")


class LogRecord(NamedTuple):
  """One logged event: kind "W" (a write of `length` bytes at `offset`,
  whose bytes are at `data_at` in the log file) or "F" (a flush)."""
  kind: str
  offset: int
  length: int
  data_at: int


def read_log(path: str) -> list[LogRecord]:
  """The records of a log file written by the server, in order (a record
  cut short at the end of the file, which the server never leaves once it
  answered `cut`, is dropped)."""
  records = []
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    pos = 0
    while pos + _HEADER.size <= size:
      f.seek(pos)
      kind, offset, length = _HEADER.unpack(f.read(_HEADER.size))
      data_at = pos + _HEADER.size
      if kind == b"W":
        if data_at + length > size:
          break
        records.append(LogRecord("W", offset, length, data_at))
        pos = data_at + length
      else:
        records.append(LogRecord("F", 0, 0, data_at))
        pos = data_at
  return records


def iter_write_data(path: str, records: list[LogRecord]) -> Iterator[tuple[int, bytes]]:
  """(offset, bytes) of each W record of `records` (read from the log file
  `path`)."""
  with open(path, "rb") as f:
    for r in records:
      if r.kind == "W":
        f.seek(r.data_at)
        yield r.offset, f.read(r.length)


def _operations_class():
  """The mfusepy Operations subclass (mfusepy is imported only here, so
  that the module imports without it)."""
  import mfusepy  # pylint: disable=g-import-not-at-top

  class LoggingDisk(mfusepy.Operations):
    """Serves /disk.img over the live image file; logs writes and fsyncs."""

    use_ns = True

    def __init__(self, backing: str, log_path: str):
      self._fd = os.open(backing, os.O_RDWR)
      self._size = os.fstat(self._fd).st_size
      self._log = open(log_path, "wb")
      self._lock = threading.Lock()
      self.cut = False
      self.cut_at: int | None = None
      self.writes = self.flushes = self.bytes = 0
      self._now = time.time_ns()
      self._say_lock = threading.Lock()

    def say(self, line: str) -> None:
      with self._say_lock:
        print(line, flush=True)

    # Commands from the controlling process.
    def do_cut(self) -> None:
      with self._lock:
        self._cut_locked()

    def do_cut_after(self, more: int) -> None:
      with self._lock:
        if not self.cut:
          self.cut_at = self.writes + self.flushes + max(1, more)
        self.say("armed")

    def _cut_locked(self) -> None:
      if not self.cut:
        self.cut = True
        self._log.flush()
      self.say(f"cut {self.writes + self.flushes} {time.monotonic():.6f}")

    def _logged_locked(self) -> None:
      if self.cut_at is not None and self.writes + self.flushes >= self.cut_at:
        self.cut_at = None
        self._cut_locked()

    # Filesystem operations.
    def init(self, path):
      self.say("ready")

    def getattr(self, path, fh=None):
      t = self._now
      if path == "/":
        return dict(st_mode=stat.S_IFDIR | 0o755, st_nlink=2, st_size=0,
                    st_atime=t, st_mtime=t, st_ctime=t)
      if path == "/" + FILE_NAME:
        return dict(st_mode=stat.S_IFREG | 0o644, st_nlink=1, st_size=self._size,
                    st_atime=t, st_mtime=t, st_ctime=t)
      raise mfusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
      if path != "/":
        raise mfusepy.FuseOSError(errno.ENOTDIR)
      return [".", "..", FILE_NAME]

    def open(self, path, flags):
      if path != "/" + FILE_NAME:
        raise mfusepy.FuseOSError(errno.ENOENT)
      return 0

    def read(self, path, size, offset, fh):
      return os.pread(self._fd, size, offset)

    def write(self, path, data, offset, fh):
      if offset + len(data) > self._size:
        raise mfusepy.FuseOSError(errno.ENOSPC)
      with self._lock:
        if not self.cut:
          self._log.write(_HEADER.pack(b"W", offset, len(data)))
          self._log.write(data)
          self.writes += 1
          self.bytes += len(data)
          self._logged_locked()
        os.pwrite(self._fd, data, offset)
      return len(data)

    def fsync(self, path, datasync, fh):
      with self._lock:
        if not self.cut:
          self._log.write(_HEADER.pack(b"F", 0, 0))
          self.flushes += 1
          self._logged_locked()
      return 0

    def flush(self, path, fh):
      return 0      # close(): not a durability point

    def release(self, path, fh):
      return 0

    def truncate(self, path, length, fh=None):
      if length != self._size:
        raise mfusepy.FuseOSError(errno.EPERM)
      return 0

    def statfs(self, path):
      return dict(f_bsize=4096, f_frsize=4096, f_blocks=self._size // 4096, f_bfree=0,
                  f_bavail=0, f_files=1, f_ffree=0, f_namemax=255)

  return LoggingDisk


def serve(backing: str, log_path: str, mountpoint: str) -> None:
  """Mounts the logging filesystem on `mountpoint` (serving `backing` as
  /disk.img, logging to `log_path`) and serves until unmounted; commands on
  stdin as the module docstring says."""
  import mfusepy  # pylint: disable=g-import-not-at-top
  ops = _operations_class()(backing, log_path)

  def commands():
    for line in sys.stdin:
      cmd = line.strip()
      if cmd == "cut":
        ops.do_cut()
      elif cmd.startswith("cutafter "):
        ops.do_cut_after(int(cmd.split()[1]))
      elif cmd == "stats":
        ops.say(f"stats {ops.writes} {ops.flushes} {ops.bytes} {int(ops.cut)}")
      elif cmd:
        ops.say(f"error unknown command {cmd!r}")
  threading.Thread(target=commands, daemon=True).start()
  # Single-threaded: requests are handled (and logged) in the order the
  # kernel delivers them. Without writeback_cache FUSE writes through, so
  # a write the loop device completed has been logged.
  mfusepy.FUSE(ops, mountpoint, foreground=True, nothreads=True, fsname="powerloss",
               subtype="powerloss")


if __name__ == "__main__":
  if len(sys.argv) != 4:
    sys.exit("usage: python -m fastpersist_jax.benchmark.powerloss_fs BACKING LOG MOUNTPOINT")
  serve(*sys.argv[1:])
