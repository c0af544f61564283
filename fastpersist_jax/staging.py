"""Host staging: a reusable pool of pre-faulted slabs, and the snapshot copy.

A data file is staged as a sequence of windows, each one slab long and
mapped onto the file at a multiple of the slab size. Shards are copied into
windows at their planned offsets (several small shards share a window; a
large one spans many), and each full window becomes one large aligned write.
The pool is allocated once and reused by later saves, so only the first save
pays for page faults; a checkpoint larger than the pool is staged in rounds,
the copy waiting for windows the writer has finished with.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Callable

import numpy as np

import jax

from fastpersist_jax import _ext, treepath
from fastpersist_jax.errors import SaveError
from fastpersist_jax.io_engine import AlignedBuffer, IOEngine
from fastpersist_jax.plan import SavePlan, ShardSource

logger = logging.getLogger(__name__)


class StagingPool:
  """Slabs of aligned, pre-faulted host memory, grown on demand up to a limit."""

  def __init__(self, engine: IOEngine, slab_bytes: int, limit_bytes: int, register: bool):
    self._engine = engine
    self.slab_bytes = slab_bytes
    self.max_slabs = max(1, limit_bytes // slab_bytes)
    self._register = register
    self._slabs: list[AlignedBuffer] = []
    self._views: list[np.ndarray] = []
    self._free: list[int] = []
    self._cond = threading.Condition()
    self.registered = False

  @property
  def nbytes(self) -> int:
    return len(self._slabs) * self.slab_bytes

  def ensure(self, nbytes: int) -> None:
    """Grows the pool to hold `nbytes` (up to its limit)."""
    want = min(self.max_slabs, max(1, -(-nbytes // self.slab_bytes)))
    with self._cond:
      if want <= len(self._slabs):
        return
      if want == self.max_slabs and nbytes > self.max_slabs * self.slab_bytes:
        logger.info("Checkpoint (%.1f MiB) exceeds host_memory_limit (%.1f MiB): the save "
                    "blocks until the overflow can be staged behind completed writes.",
                    nbytes / 2**20, self.max_slabs * self.slab_bytes / 2**20)
      lock = self._register
      for _ in range(want - len(self._slabs)):
        buf = AlignedBuffer(self.slab_bytes, lock)
        self._slabs.append(buf)
        self._views.append(np.frombuffer(buf, np.uint8))
        self._free.append(len(self._slabs) - 1)
      if self._register:
        self.registered = self._engine.register(self._slabs)
      self._cond.notify_all()

  def acquire(self, abort: threading.Event) -> int:
    with self._cond:
      while not self._free:
        if abort.is_set():
          raise SaveError("save aborted while waiting for staging memory")
        self._cond.wait(0.05)
      return self._free.pop()

  def release(self, slab: int) -> None:
    with self._cond:
      self._free.append(slab)
      self._cond.notify()

  def view(self, slab: int) -> np.ndarray:
    return self._views[slab]

  def buffer(self, slab: int) -> AlignedBuffer:
    return self._slabs[slab]

  def close(self) -> None:
    with self._cond:
      if self.registered:
        self._engine.unregister()
        self.registered = False
      self._slabs.clear()
      self._views.clear()
      self._free.clear()


@dataclasses.dataclass
class Window:
  """One slab's worth of a data file, staged and ready to write."""
  file: int
  offset: int                          # file offset of the window's first byte
  slab: int
  length: int = 0                      # bytes of file data in it
  pieces: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
  # (shard position in plan.shards, offset in slab, length), in shard order


def host_bytes(data) -> np.ndarray:
  """The shard's bytes as a flat uint8 array (a view where possible)."""
  if isinstance(data, jax.Array) and data.is_deleted():
    raise SaveError("the array was deleted (donated?) before its bytes were staged; with "
                    "snapshot='reference' on an accelerator, arrays must stay alive until the "
                    "save finishes (use snapshot='copy' for arrays the training step donates)")
  arr = np.asarray(data)
  if not arr.flags.c_contiguous:
    arr = np.ascontiguousarray(arr)
  return arr.reshape(-1).view(np.uint8)


class _Transfers:
  """Device-to-host copies of accelerator shards, started ahead of the copy
  into staging: into pinned host memory (memory kind "pinned_host", so the
  DMA needs no bounce), falling back to jax's own host copy. At most
  `lookahead_bytes` are in flight, so the extra host memory a save uses stays
  bounded instead of growing to the checkpoint's size."""

  def __init__(self, shards: list[ShardSource], lookahead_bytes: int):
    self._shards = shards
    self._lookahead = lookahead_bytes
    self._next = 0          # first shard whose transfer is not started
    self._in_flight = 0     # bytes started and not yet consumed

  def advance(self, consumed: int) -> None:
    """Shard `consumed` is about to be read: start transfers up to the window."""
    while self._next < len(self._shards) and (
        self._next <= consumed or self._in_flight < self._lookahead):
      s = self._shards[self._next]
      if s.on_accelerator:
        s.data = _start_device_to_host(s.data)
        self._in_flight += s.nbytes
      self._next += 1

  def done_with(self, shard: ShardSource) -> None:
    if shard.on_accelerator:
      self._in_flight -= shard.nbytes


def _start_device_to_host(x):
  try:
    return jax.device_put(x, x.sharding.with_memory_kind("pinned_host"))
  except Exception:  # pylint: disable=broad-except  (backend without pinned_host)
    try:
      x.copy_to_host_async()
    except Exception:  # pylint: disable=broad-except  (np.asarray will copy anyway)
      pass
    return x


def stage(plan: SavePlan, pool: StagingPool, emit: Callable[[Window], None],
          abort: threading.Event, copy_threads: int = 1) -> None:
  """Copies every planned shard into windows, emitting each window when full.

  Windows are emitted in file order, and within a window pieces appear in
  shard order, so a consumer can checksum shards incrementally. Each window's
  copies run as one GIL-free batch on `copy_threads` threads.
  """
  transfers = _Transfers(plan.shards, lookahead_bytes=max(pool.nbytes, pool.slab_bytes))
  slab_bytes = pool.slab_bytes
  window: Window | None = None
  copies: list[tuple[np.ndarray, np.ndarray]] = []

  def flush():
    nonlocal window
    if window is not None:
      _ext.copy_many(copies, copy_threads)
      copies.clear()
      emit(window)
      window = None

  try:
    for pos, shard in enumerate(plan.shards):
      if abort.is_set():
        raise SaveError("save aborted")
      if not shard.nbytes:
        continue
      transfers.advance(pos)
      try:
        src = host_bytes(shard.data)
        if shard.part is not None:
          src = src[shard.part[0]:shard.part[1]]
      except SaveError as e:
        raise SaveError(f"leaf {treepath.to_str(plan.leaves[shard.leaf].path)!r}: {e}") from None
      done = 0
      while done < shard.nbytes:
        file_pos = shard.offset + done
        if window is not None and (window.file != shard.file or
                                   file_pos >= window.offset + slab_bytes):
          flush()
        if window is None:
          window = Window(shard.file, file_pos - file_pos % slab_bytes, pool.acquire(abort))
        dst = pool.view(window.slab)
        at = file_pos - window.offset
        if at > window.length:
          dst[window.length:at] = 0  # alignment gap between shards
        n = min(shard.nbytes - done, slab_bytes - at)
        copies.append((dst[at:at + n], src[done:done + n]))
        window.pieces.append((pos, at, n))
        window.length = at + n
        done += n
      # The pending copies hold views of the source until their window is
      # flushed; after that nothing pins it any more.
      shard.data = None
      transfers.done_with(shard)
    flush()
  except BaseException:
    # A window not yet handed on still holds its slab: give it back, or the
    # pool shrinks with every failed save until saves wait forever.
    if window is not None:
      copies.clear()
      pool.release(window.slab)
    raise
