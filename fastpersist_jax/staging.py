"""Host staging: a reusable pool of pre-faulted slabs, and the snapshot copy.

A data file is staged as a sequence of windows, each one slab long and
mapped onto the file at a multiple of the slab size. Shards are copied into
windows at their planned offsets (several small shards share a window; a
large one spans many), and each full window becomes one large aligned write.
Each shard's bytes come from its source, bound for the save by sources.py.
The pool is allocated once and reused by later saves, so only the first save
pays for page faults; a checkpoint larger than the pool is staged in rounds,
the copy waiting for windows the writer has finished with.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Callable

import numpy as np

from fastpersist_jax import _ext
from fastpersist_jax import workers as workers_lib
from fastpersist_jax.errors import SaveError
from fastpersist_jax.io_engine import AlignedBuffer, IOEngine
from fastpersist_jax.sources import ShardSources

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
    self._released = 0   # slabs given back so far (progress, for acquire's timeout)
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

  def acquire(self, abort: threading.Event, on_wait: Callable[[], None] | None = None,
              timeout_s: float | None = None) -> int:
    """A free slab's index, waiting for one while none is free.

    Args:
      abort: checked every 50 ms while waiting.
      on_wait: called before each wait (its consumers must free slabs).
      timeout_s: the longest time without any slab of the pool coming free
        (None: no limit): a slow disk whose writes progress never hits it.
    Raises:
      SaveError: `abort` was set, or no slab came free for `timeout_s`
        (every slab of the pool held by writes that did not progress).
    """
    with self._cond:
      released, since = self._released, time.monotonic()
      while not self._free:
        if on_wait is not None:
          on_wait()
        if abort.is_set():
          raise SaveError("save aborted while waiting for staging memory")
        if self._released != released:   # progress: any slab came back
          released, since = self._released, time.monotonic()
        elif timeout_s is not None and time.monotonic() - since > timeout_s:
          raise SaveError(
              f"no staging slab came free for {timeout_s:g} s: all {len(self._slabs)} slabs of "
              f"{self.slab_bytes} bytes (host_memory_limit) are held by writes that did not "
              "progress")
        self._cond.wait(0.05)
      return self._free.pop()

  def release(self, slab: int) -> None:
    with self._cond:
      self._released += 1
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
  pending: int = 0                     # consumers yet to finish with it
  pieces: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
  # (shard position in plan.shards, offset in slab, length), in shard order


class _Copier:
  """Runs each window's copies on its own thread, in order, then emits the
  window: the copies release the GIL, so the caller's loop prepares the next
  window's shards (~5 us of Python each) while this one's bytes move."""

  def __init__(self, pool: StagingPool, emit: Callable[[Window], None], copy_threads: int,
               runner: workers_lib.Workers):
    self._pool = pool
    self._emit = emit
    self._copy_threads = copy_threads
    self._queue: queue.Queue = queue.Queue(maxsize=2)
    self._error: BaseException | None = None
    self.cpu_s = 0.0
    self._task = runner.run(self._run)

  def _run(self) -> None:
    cpu0 = time.thread_time()
    try:
      self._loop()
    except BaseException as e:  # pylint: disable=broad-except
      self._error = self._error or e
    finally:
      self.cpu_s = time.thread_time() - cpu0

  def _loop(self) -> None:
    while (item := self._queue.get()) is not None:
      window, copies = item
      if self._error is None:
        try:
          _ext.copy_many(copies, self._copy_threads)
          copies.clear()   # drop the source views as soon as their bytes are staged
          self._emit(window)
          continue
        except BaseException as e:  # pylint: disable=broad-except
          self._error = e
      copies.clear()
      self._pool.release(window.slab)

  def submit(self, window: Window, copies: list) -> None:
    """Hands a window over (after a failure the copier returns its slab),
    then raises the copier's error, if any."""
    self._queue.put((window, copies))
    self.raise_if_failed()

  def raise_if_failed(self) -> None:
    if self._error is not None:
      raise self._error

  def cancel(self, e: BaseException) -> None:
    """Windows not yet copied are released instead of emitted."""
    if self._error is None:
      self._error = e

  def finish(self) -> None:
    """Waits for every submitted window; after a failure, returns their slabs."""
    self._queue.put(None)
    self._task.join()
    self.raise_if_failed()


def stage(sources: ShardSources, pool: StagingPool, emit: Callable[[Window], None],
          abort: threading.Event, *, copy_threads: int,
          on_pool_wait: Callable[[], None] | None = None,
          workers: workers_lib.Workers | None = None,
          pool_timeout_s: float | None = None) -> float:
  """Copies every planned shard (sources.plan.shards, its bytes taken from
  `sources`) into windows, emitting each window when full.

  Windows are emitted in file order, and within a window pieces appear in
  shard order, so a consumer can checksum shards incrementally. Each window's
  copies run as one GIL-free batch on `copy_threads` threads, overlapping the
  preparation of the next window. `on_pool_wait` is called whenever no slab
  is free (the consumers must then free some for the copy to go on). The
  copies run on a thread of `workers` (None: the shared workers, at the
  caller's priority). A wait for a free slab lasts at most `pool_timeout_s`.
  Every source is dropped by the time it returns or raises. Returns the CPU
  seconds of the copy thread.
  Raises SaveError: aborted, no slab came free in time, or a shard's array
  deleted (named).
  """
  plan = sources.plan
  slab_bytes = pool.slab_bytes
  copier = _Copier(pool, emit, copy_threads, workers or workers_lib.shared())
  window: Window | None = None
  copies: list[tuple[np.ndarray, np.ndarray]] = []

  def flush():
    nonlocal window, copies
    if window is not None:
      w, window = window, None
      copier.submit(w, copies)
      copies = []

  try:
    for shard_id, shard in enumerate(plan.shards):
      if abort.is_set():
        raise SaveError("save aborted")
      if not shard.nbytes:
        continue
      src = sources.take(shard_id)
      done = 0
      while done < shard.nbytes:
        file_pos = shard.offset + done
        if window is not None and (window.file != shard.file or
                                   file_pos >= window.offset + slab_bytes):
          flush()
        if window is None:
          window = Window(shard.file, file_pos - file_pos % slab_bytes,
                          pool.acquire(abort, on_pool_wait, pool_timeout_s))
        dst = pool.view(window.slab)
        at = file_pos - window.offset
        if at > window.length:
          dst[window.length:at] = 0  # alignment gap between shards
        n = min(shard.nbytes - done, slab_bytes - at)
        copies.append((dst[at:at + n], src[done:done + n]))
        window.pieces.append((shard_id, at, n))
        window.length = at + n
        done += n
      # The pending copies hold views of the source until their window is
      # copied; after that nothing pins it any more.
      sources.drop(shard_id)
    flush()
    copier.finish()
  except BaseException as e:
    # A window not yet handed on still holds its slab: give it back, or the
    # pool shrinks with every failed save until saves wait forever. Windows
    # the copier has not emitted yet are released too, not emitted after
    # the consumers were told the stage has ended.
    if window is not None:
      copies.clear()
      pool.release(window.slab)
    copier.cancel(e)
    try:
      copier.finish()
    except BaseException:  # pylint: disable=broad-except  (the first error is the one raised)
      pass
    sources.drop_all()   # nothing stays pinned by a failed save
    raise
  return copier.cpu_s
