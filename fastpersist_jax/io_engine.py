"""The I/O engine binding: thin Python over the C++ core in ext/.

Chooses io_uring or the thread-pool fallback, logs (once) whatever degrades
performance but not correctness (no O_DIRECT, no fixed buffers), and offers
the few whole-file helpers the rest of the package needs.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Iterable, Mapping, Sequence

from fastpersist_jax import _ext
from fastpersist_jax.errors import IOUringUnavailableError
from fastpersist_jax.options import ENGINE_ENV, FastPersistOptions

logger = logging.getLogger(__name__)

AlignedBuffer = _ext.AlignedBuffer
File = _ext.File
RingUnavailable = _ext.RingUnavailable

# (offset, buffer) pairs for one file.
FileExtents = Sequence[tuple[int, object]]

_warned_devices: set[int] = set()
_warned_lock = threading.Lock()


def _note_buffered(file: File) -> None:
  """Logs once per filesystem that O_DIRECT could not be used there."""
  if file.direct:
    return
  try:
    dev = os.stat(os.path.dirname(file.path) or ".").st_dev
  except OSError:
    dev = -1
  with _warned_lock:
    if dev in _warned_devices:
      return
    _warned_devices.add(dev)
  logger.warning("%s: %s (fdatasync still makes writes durable).",
                 os.path.dirname(file.path), file.direct_note)


def fsync_directory(path: str | os.PathLike) -> None:
  """Makes a directory's entries (new files, renames) durable."""
  fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


class IOEngine:
  """Batched, GIL-free reads and writes of host buffers to files."""

  def __init__(self, options: FastPersistOptions | None = None):
    self.options = options or FastPersistOptions()
    kind = self.options.resolved_engine()
    args = dict(queue_depth=self.options.queue_depth,
                chunk_bytes=self.options.chunk_bytes,
                threads=self.options.io_rings)
    if kind in ("auto", "io_uring"):
      try:
        self._engine = _ext.Engine("io_uring", **args)
      except RingUnavailable as e:
        if kind == "io_uring":
          raise IOUringUnavailableError(
              f"engine='io_uring' was asked for, but {e}; engine='auto' falls back to the "
              "pwrite/pread thread-pool engine") from e
        logger.warning("io_uring is unavailable (%s); falling back to the "
                       "pwrite/pread thread-pool engine.", e)
        self._engine = _ext.Engine("threads", **args)
    else:
      logger.warning("Using the pwrite/pread thread-pool engine (asked for by %s).",
                     f"{ENGINE_ENV}=threads" if self.options.engine == "auto" else "options")
      self._engine = _ext.Engine("threads", **args)

  @property
  def kind(self) -> str:
    return self._engine.kind

  # Files ---------------------------------------------------------------

  def open_for_write(self, path: str | os.PathLike, preallocate: int = 0) -> File:
    f = File(os.fspath(path), "w", self.options.direct_io, preallocate)
    _note_buffered(f)
    return f

  def open_for_read(self, path: str | os.PathLike) -> File:
    f = File(os.fspath(path), "r", self.options.direct_io, 0)
    _note_buffered(f)
    return f

  # Batches -------------------------------------------------------------

  def write(self, extents: Sequence[tuple[File, int, object]]) -> None:
    self._engine.write(extents)

  def read(self, extents: Sequence[tuple[File, int, object]]) -> None:
    self._engine.read(extents)

  def sync(self, files: Sequence[File]) -> None:
    self._engine.sync(list(files))

  def register(self, buffers: Iterable[AlignedBuffer]) -> bool:
    """Registers buffers as fixed buffers; logs and carries on if refused."""
    if self.kind != "io_uring":
      return False
    ok, why = self._engine.register_buffers(list(buffers))
    if not ok:
      logger.info("Staging buffers are used unregistered: %s.", why)
    return ok

  def unregister(self) -> None:
    self._engine.unregister_buffers()

  # Whole files ---------------------------------------------------------

  def write_files(self, files: Mapping[str | os.PathLike, FileExtents]) -> None:
    """Writes complete files durably: data, size, and directory entries.

    All files' writes share one batch (so many small files cost one deep queue,
    not one round trip each), then one batch of fdatasyncs, then one fsync per
    parent directory.
    """
    opened: list[File] = []
    ok = False
    try:
      extents = []
      for path, parts in files.items():
        end = max((off + memoryview(buf).nbytes for off, buf in parts), default=0)
        f = self.open_for_write(path, preallocate=end)
        opened.append(f)
        extents.extend((f, off, buf) for off, buf in parts)
      self.write(extents)
      self.sync(opened)
      ok = True
    finally:
      for f in opened:
        f.close()
        if not ok:  # never leave half-written files that look complete
          try:
            os.unlink(f.path)
          except OSError:
            pass
    for parent in {os.path.dirname(os.path.abspath(p)) for p in files}:
      fsync_directory(parent)

  def read_file(self, path: str | os.PathLike, offset: int = 0, length: int | None = None) -> memoryview:
    """Reads a byte range of one file into a fresh aligned buffer."""
    with self.open_for_read(path) as f:
      if length is None:
        length = max(0, f.size() - offset)
      buf = AlignedBuffer(length)
      self.read([(f, offset, buf)])
    return memoryview(buf)
