"""The I/O engine binding: thin Python over the C++ core in ext/.

Chooses io_uring or the thread-pool fallback, logs (once) whatever degrades
performance but not correctness (no O_DIRECT, no fixed buffers), and offers
the few whole-file helpers the rest of the package needs.

What it exposes from ext/:

  AlignedBuffer(nbytes, lock=False)
      `nbytes` bytes of page-aligned (4096), pre-faulted anonymous memory
      (mmap(2) with MAP_POPULATE; 4 KiB pages, see ext/aligned_buffer.cc),
      exposed through the buffer protocol as a 1-D uint8 array of `nbytes`
      elements. `lock`:
      mlock(2) it too where RLIMIT_MEMLOCK allows (`.locked` says whether it
      did). Attributes: nbytes (bytes), address (int), locked (bool). Raises
      OSError (errno of mmap(2)) when the memory cannot be mapped, TypeError
      for a negative size.
  File(path, mode="r"|"w", direct=True, preallocate=0)
      A file opened for the engine; made by IOEngine.open_for_write /
      open_for_read. Attributes: path, mode, direct (bool: opened O_DIRECT),
      direct_note (why not), offset_align and mem_align (bytes: the O_DIRECT
      alignment of file offsets/lengths and of memory addresses, from
      statx(2) STATX_DIOALIGN, else the device's logical block size, else
      4096; 1 for a buffered file), logical_end (bytes written so far),
      closed; size() -> int bytes (fstat(2)); close() (idempotent); usable as
      a context manager that closes it.
  RingUnavailable
      RuntimeError subclass: io_uring_queue_init(3) was refused. IOEngine
      turns it into IOUringUnavailableError or a fallback.

Buffers given to write/read may have any address, length and file offset:
O_DIRECT's rules (open(2), NOTES: file offset, length and buffer address
multiples of the file's alignment, which statx(2) reports as
stx_dio_offset_align / stx_dio_mem_align) are met inside the engine (ext/
alignment.h). Extents whose memory (an AlignedBuffer), offset and length are
multiples of the file's alignment (4096 suffices on common disks) go
straight between the caller's memory and the disk. Otherwise reads go
through page-aligned bounce memory for their partial first and last blocks
(for all of the extent when its memory is misaligned); writes bounce a
zero-padded partial last block (all of the extent when its memory is
misaligned), and go through a second, buffered descriptor when their offset
is unaligned or the padding would land on bytes written before.

Errors of the system calls underneath (open(2), fallocate(2), ftruncate(2),
the reads and writes io_uring_prep_read(3) / io_uring_prep_write(3) submit,
fdatasync(2)) are raised as OSError(errno, message, path), so callers can
match errno (ENOSPC, EACCES, EIO, ...) as for any OSError; `filename` is the
file's path, or "<io_uring>" when the ring itself failed.

Besides the binding: release_free_heap(), glibc's malloc_trim(3), for a
restore about to fault in much fresh memory.
"""

from __future__ import annotations

import ctypes
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

def _malloc_trim():
  """glibc's malloc_trim(3), or None (another C library)."""
  try:
    return ctypes.CDLL(None).malloc_trim
  except (AttributeError, OSError):
    return None


_MALLOC_TRIM = _malloc_trim()


def release_free_heap() -> bool:
  """Gives the C heap's free memory back to the kernel (glibc's
  malloc_trim(0)); returns whether it could. Arrays freed by jax's CPU
  runtime stay in the heap, so the memory a restore then maps comes from
  pages the machine has not touched lately, slower to fault in: in the
  process that had just saved (and freed) a 1 GiB tree on a 2-vCPU VM, a
  restore's two memory threads spent 1.2-2.1 s between them faulting in
  1 GiB without this call and 0.4-0.5 s after it (which took 60-80 ms),
  and resident memory ended 0.8-1.2 GB lower."""
  if _MALLOC_TRIM is None:
    return False
  _MALLOC_TRIM(0)
  return True


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
  """Makes a directory's entries (new files, renames) durable.

  Opens `path` (a directory) read-only and fsync(2)s it: a new or renamed
  file's entry survives a crash only once its directory is synced (fsync(2),
  NOTES). Raises OSError (e.g. FileNotFoundError, NotADirectoryError) when
  `path` cannot be opened or synced.
  """
  fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


class IOEngine:
  """Batched, GIL-free reads and writes of host buffers to files.

  Every batch call (write, read, sync) releases the GIL, blocks until all of
  its requests have completed or one has failed, and runs one batch at a
  time per engine (callers on other threads wait). On the first failure the
  engine stops submitting, waits for the requests already in flight (the
  kernel may still be using the caller's buffers) and raises that failure's
  OSError; the rest of the batch may or may not have been carried out.

  Requests are at most `options.chunk_bytes` bytes each (the engine clamps it
  to a multiple of 4096 between 4096 and 1 GiB); `options.queue_depth`
  requests are in flight per io_uring ring (`options.io_rings` rings, one
  thread each), or, on the threads engine, min(queue_depth, 64) threads run
  blocking pwrite(2)/pread(2).
  """

  def __init__(self, options: FastPersistOptions | None = None):
    """Makes the engine `options.resolved_engine()` names.

    Args:
      options: queue_depth, chunk_bytes, io_rings, direct_io and engine are
        used; None: FastPersistOptions() defaults.

    "auto" tries io_uring (io_uring_queue_init(3) per ring) and falls back to
    the thread-pool engine, logging a warning, when the kernel, a seccomp
    profile or the kernel.io_uring_disabled sysctl refuses it.

    Raises:
      IOUringUnavailableError: engine="io_uring" (by option or by
        FASTPERSIST_ENGINE) was asked for and io_uring is refused.
      ValueError: FASTPERSIST_ENGINE holds something other than auto,
        io_uring or threads.
    """
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
    """The engine in use: "io_uring" or "threads" (the pwrite/pread pool)."""
    return self._engine.kind

  # Files ---------------------------------------------------------------

  def open_for_write(self, path: str | os.PathLike, preallocate: int = 0) -> File:
    """Creates (or truncates) `path` for writing through this engine.

    O_DIRECT is used when `options.direct_io` is on and the filesystem takes
    it; where open(2) refuses it (EINVAL/EOPNOTSUPP: tmpfs on old kernels,
    overlayfs, FUSE) or statx(2) reports no direct I/O for the file, the file
    is opened buffered and a warning is logged once per filesystem (writes
    are still made durable by sync()).

    Args:
      path: the file to create; its directory must exist.
      preallocate: bytes to reserve with fallocate(2) (rounded up to the
        file's offset alignment) so that a full disk fails here, not half-way
        through the data; 0: none. Filesystems without fallocate are
        accepted as they are.

    Returns:
      The open File (mode "w"); close it (or use it as a context manager).

    Raises:
      OSError: open(2) failed (FileNotFoundError, PermissionError, ...), or
        the preallocation failed (e.g. ENOSPC; the file is then removed).
    """
    f = File(os.fspath(path), "w", self.options.direct_io, preallocate)
    _note_buffered(f)
    return f

  def open_for_read(self, path: str | os.PathLike) -> File:
    """Opens `path` for reading through this engine.

    O_DIRECT where `options.direct_io` is on and the filesystem takes it,
    otherwise buffered (logged once per filesystem), as in open_for_write.

    Returns:
      The open File (mode "r"); close it (or use it as a context manager).

    Raises:
      OSError: open(2) failed (FileNotFoundError, PermissionError, ...).
    """
    f = File(os.fspath(path), "r", self.options.direct_io, 0)
    _note_buffered(f)
    return f

  # Batches -------------------------------------------------------------

  def write(self, extents: Sequence[tuple[File, int, object]]) -> None:
    """Writes every extent, and no byte outside them, in one batch.

    Args:
      extents: (file, offset, buffer) triples: `file` opened by
        open_for_write; `offset` (int >= 0) the byte offset in the file; the
        whole of `buffer` (any C-contiguous object with the buffer protocol:
        AlignedBuffer, numpy array, bytes, memoryview; its length in bytes is
        memoryview(buffer).nbytes) is written there. Extents may be in any
        order and any alignment (see the module docstring); buffers must stay
        unchanged until the call returns.

    The data is not durable until sync(); a final partial O_DIRECT block is
    written padded with zeros past the data and cut back by sync().

    Raises:
      ValueError: an extent is not a (File, offset, buffer) triple, or an
        offset is negative.
      TypeError: a buffer does not support the buffer protocol.
      BufferError: a buffer is not C-contiguous (numpy raises ValueError).
      OSError: a file is closed or not open for writing (EBADF), or a write
        failed (ENOSPC, EIO, ...; errno, message with the offset, path).
    """
    self._engine.write(extents)

  def read(self, extents: Sequence[tuple[File, int, object]]) -> None:
    """Fills every extent's buffer from its file, in one batch.

    Args:
      extents: (file, offset, buffer) triples: `file` opened by
        open_for_read; `offset` (int >= 0) the byte offset in the file; the
        whole of `buffer` (a writable, C-contiguous buffer-protocol object, e.g.
        AlignedBuffer or a numpy array; memoryview(buffer).nbytes bytes) is
        filled from there. Any order and alignment (see the module docstring).

    Raises:
      ValueError: an extent is not a (File, offset, buffer) triple, or an
        offset is negative.
      TypeError: a buffer does not support the buffer protocol.
      BufferError: a buffer is read-only or not C-contiguous (numpy raises
        ValueError for the latter).
      OSError: a file is closed or not open for reading (EBADF); an extent
        reaches past the end of its file (ENODATA, "unexpected end of file");
        or a read failed (EIO, ...). The buffers' contents are then undefined.
    """
    self._engine.read(extents)

  def sync(self, files: Sequence[File]) -> None:
    """Makes written files durable: cuts each file back to its logical end
    (dropping the zero padding of a final O_DIRECT block; ftruncate(2)), then
    fdatasync(2)s all of them in one batch (io_uring_prep_fsync(3) with
    IORING_FSYNC_DATASYNC on io_uring). Their directory entries are not
    synced: see fsync_directory.

    Args:
      files: Files opened by open_for_write, still open.

    Raises:
      OSError: a file is closed or not open for writing (EBADF), or the
        truncate or fdatasync failed (EIO, ENOSPC, ...).
    """
    self._engine.sync(list(files))

  def register(self, buffers: Iterable[AlignedBuffer]) -> bool:
    """Registers buffers as io_uring fixed buffers; logs and carries on if refused.

    Registered buffers are pinned once (io_uring_register_buffers(3)) instead
    of per request; requests that lie wholly inside one of them are then
    submitted as io_uring_prep_write_fixed(3) / io_uring_prep_read_fixed(3).
    The kernel charges them to RLIMIT_MEMLOCK and takes at most 1 GiB per
    buffer (io_uring_register(2), IORING_REGISTER_BUFFERS). The engine keeps
    a reference to each registered buffer until unregister() or the next
    register(), so that its pages cannot be unmapped while registered.

    Args:
      buffers: AlignedBuffers; they replace any registered before.

    Returns:
      True when registered; False on the threads engine, or when the kernel
      refuses (logged at INFO with the reason; any earlier registration is
      then dropped too). I/O works either way.

    Raises:
      RuntimeError: an item is not an AlignedBuffer (pybind11's cast error;
        on the io_uring engine only).
    """
    if self.kind != "io_uring":
      return False
    ok, why = self._engine.register_buffers(list(buffers))
    if not ok:
      logger.info("Staging buffers are used unregistered: %s.", why)
    return ok

  def unregister(self) -> None:
    """Drops the fixed-buffer registration (if any) and the engine's
    references to those buffers. Idempotent; raises nothing."""
    self._engine.unregister_buffers()

  # Whole files ---------------------------------------------------------

  def write_files(self, files: Mapping[str | os.PathLike, FileExtents]) -> None:
    """Writes complete files durably: data, size, and directory entries.

    All files' writes share one batch (so many small files cost one deep queue,
    not one round trip each), then one batch of fdatasyncs, then one fsync per
    parent directory.

    Args:
      files: path -> (offset, buffer) pairs of that file (buffers as in
        write()). Each file is created or truncated, preallocated to its
        largest offset + buffer length (bytes), and ends exactly at the last
        byte written; gaps between extents read as zeros.

    Raises:
      OSError: a file cannot be created or preallocated, a write or sync
        failed (every file of the call opened so far is then removed, so no
        half-written file is left looking complete), or a directory fsync
        failed (the files are then complete but perhaps not durably listed).
      ValueError / TypeError / BufferError: as write() for a malformed
        extent or buffer (files removed as above).
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
    """Reads a byte range of one file into a fresh aligned buffer.

    Args:
      path: the file.
      offset: first byte to read (int >= 0).
      length: bytes to read; None: to the end of the file (0 bytes when
        `offset` is at or past it).

    Returns:
      A 1-D uint8 memoryview of `length` bytes over a new AlignedBuffer.

    Raises:
      OSError: the file cannot be opened (FileNotFoundError, ...), the range
        reaches past the end of the file (ENODATA), or the read failed.
      ValueError: `offset` is negative. TypeError: `length` is negative.
    """
    with self.open_for_read(path) as f:
      if length is None:
        length = max(0, f.size() - offset)
      buf = AlignedBuffer(length)
      self.read([(f, offset, buf)])
    return memoryview(buf)
