"""One save: snapshot into staging, then write and checksum, sync and commit.

Threads, in data-flow order:
  caller      stage(): copy owned shards into staging windows   (blocking part,
              or a background thread when the snapshot is by reference)
  writer      engine writes of windows, fdatasync, manifest     (background,
              the Orbax commit future; starts once the directory exists)
  checksum    crc32c of every shard (and its chunks), window by window (background)
Each staged window goes to the writer and the checksummer at once, and its
slab returns to the pool when both are done with it. The checksummer waits
until the blocking snapshot is over (or the pool runs dry): it reads memory
as fast as the snapshot copy does, so running both at once would lengthen
the training stall, while the disk writes barely touch the CPU.
A failure anywhere sets `abort`, which every stage watches, and the first
error is what the caller (or the commit future) raises.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import threading
import time
import uuid
from typing import Callable

from fastpersist_jax import checksums, coordination, disk_format, gc_pause, workers
from fastpersist_jax.errors import CorruptCheckpointError, SaveError
from fastpersist_jax.io_engine import IOEngine
from fastpersist_jax.options import FastPersistOptions
from fastpersist_jax.sources import ShardSources
from fastpersist_jax.staging import StagingPool, Window, stage

logger = logging.getLogger(__name__)

_END = object()
# Saves in the order they began (SaveOperation.seq).
_SEQUENCE = itertools.count()
# Windows handed to the engine in one call: each call drains its queue before
# returning, so larger batches mean fewer drains; smaller ones return slabs to
# the copier sooner.
_MAX_WINDOWS_PER_WRITE = 8
# A snapshot copied in the background uses one copy thread, leaving the
# cores to training (a blocking one uses FastPersistOptions.copy_threads).
_BACKGROUND_COPY_THREADS = 1


class SaveOperation:
  """Saves one plan. `snapshot()` then `commit(directory)`, each once."""

  def __init__(self, engine: IOEngine, pool: StagingPool, sources: ShardSources,
               options: FastPersistOptions, *, leaves: list[disk_format.LeafMeta],
               write_metadata: bool, outcome_key: str | None,
               directory_signals: Callable[[], bool] | None = None,
               on_directory_ready: Callable[[], None] | None = None,
               custom_metadata: bytes | None = None):
    """Args:
      engine, pool: the handler's I/O engine and staging pool.
      sources: the save's plan (sources.plan) bound to its values.
      options: the handler's; this uses copy_threads, commit_timeout_s,
        background_nice and background_cpus.
      leaves: every leaf's metadata for this save (plan.leaf_metadata).
      write_metadata: whether this process writes the checkpoint metadata.
      outcome_key: with several processes, the key under which they agree
        on the save's outcome (coordination.agree); None with one.
      directory_signals: tells, without blocking, whether Orbax has signalled
        that the save's directories exist (orbax_internals.directory_signals);
        None: only the directory's existence is awaited.
      on_directory_ready: called on the commit's thread once the directory
        exists, before anything is written.
      custom_metadata: disk_format.encode_custom_metadata's bytes, written
        beside the metadata (with write_metadata), or None.
    """
    self.seq = next(_SEQUENCE)   # saves begun earlier have lower numbers
    self._engine = engine
    self._pool = pool
    self._sources = sources
    self._plan = sources.plan
    self._leaves = leaves
    self._write_metadata = write_metadata
    self._custom_metadata = custom_metadata
    self._copy_threads = options.resolved_copy_threads()
    self._outcome_key = outcome_key
    self._save_id_key: str | None = None   # the shared save id's key, where one was shared
    self._commit_timeout_s = options.commit_timeout_s
    self._background_nice = options.background_nice
    self._background_cpus = options.background_cpus
    self._background = workers.shared(self._background_nice, self._background_cpus)
    self._crc_chunk_bytes = options.crc_chunk_bytes
    self._checksums = checksums.ShardChecksums([s.nbytes for s in self._plan.shards],
                                               self._crc_chunk_bytes)
    self._to_checksum: queue.Queue = queue.Queue()
    self._to_write: queue.Queue = queue.Queue()
    self._abort = threading.Event()
    self._checksum_gate = threading.Event()
    self._release_lock = threading.Lock()
    self._error: BaseException | None = None
    self._error_lock = threading.Lock()
    self._checksummer: workers.Task | None = None
    # Whether the copy into staging was started; _stage_done: it has ended
    # (or never will), so no window follows.
    self._stage_lock = threading.Lock()
    self._stage_scheduled = False
    self._stage_done = threading.Event()
    self._directory_signals = directory_signals
    self._on_directory_ready = on_directory_ready
    # Set once the save's directory exists: from then on it writes there.
    self.directory_ready = threading.Event()
    # CPU seconds of the save's own threads (the copier's helpers aside).
    self.stats: dict[str, float] = {"bytes": float(self._plan.total_bytes), "cpu_s": 0.0}
    self._stats_lock = threading.Lock()

  # Failure handling ---------------------------------------------------------

  def _count_cpu(self, seconds: float) -> None:
    with self._stats_lock:
      self.stats["cpu_s"] += seconds

  def _fail(self, e: BaseException) -> None:
    with self._error_lock:
      if self._error is None:
        self._error = e
    self._abort.set()
    self._checksum_gate.set()

  def _raise_if_failed(self) -> None:
    if self._error is not None:
      if isinstance(self._error, SaveError):
        raise self._error
      raise SaveError(f"checkpoint save failed: {self._error}") from self._error

  # Blocking part ------------------------------------------------------------

  def snapshot(self, background: bool = False) -> None:
    """Copies every owned shard into staging memory.

    In the foreground, returns when the caller may modify or donate the
    arrays. With `background`, returns at once; the copy runs on its own
    thread (one copy thread, leaving the cores to training) and any error
    surfaces from commit().
    """
    self._pool.ensure(self._plan.staged_bytes)
    with self._stage_lock:
      self._raise_if_failed()   # abandoned before its copy began
      self._stage_scheduled = True
    try:
      self._checksummer = self._background.run(self._checksum_loop)
      if background:
        self._checksum_gate.set()   # nothing blocks on the copy: checksum as it goes
        self._background.run(self._stage, _BACKGROUND_COPY_THREADS, True)
    except BaseException as e:  # (no thread for it): nothing was staged
      self._fail(e)
      self._end_stage()
      raise
    if not background:
      self._stage(self._copy_threads, False)
      self._raise_if_failed()

  def _stage(self, copy_threads: int, background: bool) -> None:
    t0, cpu0 = time.perf_counter(), time.thread_time()
    # The copier works for whoever waits: the caller (all cores help), or
    # the background.
    copier_workers = self._background if background else workers.shared()
    try:
      self._count_cpu(stage(self._sources, self._pool, self._emit, self._abort,
                            copy_threads=copy_threads, on_pool_wait=self._checksum_gate.set,
                            workers=copier_workers,
                            # Longer than the writer's wait for the directory,
                            # whose error names the cause.
                            pool_timeout_s=2 * self._commit_timeout_s))
    except BaseException as e:  # pylint: disable=broad-except
      self._fail(e)
      if not background and not isinstance(e, Exception):
        raise   # Ctrl-C (KeyboardInterrupt) on the caller's thread stays itself
    finally:
      self.stats["snapshot_s"] = time.perf_counter() - t0
      self._count_cpu(time.thread_time() - cpu0)
      self._end_stage()
    if not background:
      # The first error, which may be the writer's (ENOSPC), not the
      # "aborted" it caused here.
      self._raise_if_failed()

  def _end_stage(self) -> None:
    """Ends both queues: no window follows. The writer's end first: once the
    checksummer has seen its own, every window is in both queues (_drain
    relies on it)."""
    self._checksum_gate.set()
    self._to_write.put(_END)
    self._to_checksum.put(_END)
    self._stage_done.set()

  def abort(self, e: BaseException) -> None:
    """Abandons the save: every stage stops at its next check, and commit()
    (which must still be called: it returns every staging slab to the pool)
    raises `e`. Safe from any thread, at any time, more than once (the first
    error is the one raised)."""
    with self._stage_lock:
      self._fail(e)
      if not self._stage_scheduled and not self._stage_done.is_set():
        self._end_stage()   # no copy will run: nothing more will be staged

  # Background part ----------------------------------------------------------

  def _emit(self, w: Window) -> None:
    """A staged window: to the writer and the checksummer."""
    w.pending = 2
    self._to_write.put(w)
    self._to_checksum.put(w)

  def _done_with(self, w: Window) -> None:
    with self._release_lock:
      w.pending -= 1
      last = w.pending == 0
    if last:
      self._pool.release(w.slab)

  @property
  def failed(self) -> bool:
    """Whether the save has failed or been aborted."""
    return self._abort.is_set()

  def _checksum_loop(self) -> None:
    cpu0 = time.thread_time()
    try:
      while (w := self._to_checksum.get()) is not _END:
        try:
          self._checksum_gate.wait()
          if not self._abort.is_set():
            view = self._pool.view(w.slab)
            for shard_id, at, n in w.pieces:
              self._checksums.update(shard_id, view[at:at + n])
        finally:
          self._done_with(w)
    except BaseException as e:  # pylint: disable=broad-except
      self._fail(e)
    finally:
      self._count_cpu(time.thread_time() - cpu0)

  def commit(self, directory: str) -> None:
    """Writes staged data, syncs it, then writes this process's manifest
    (and, on the primary, the checkpoint metadata). With several processes,
    returns only when all of them have done so. Raises SaveError."""
    workers.enter_background(self._background_nice, self._background_cpus)
    error = None
    try:
      self._commit_local(directory)
    except BaseException as e:  # pylint: disable=broad-except
      error = e
    if self._outcome_key is not None:
      try:
        coordination.agree(self._outcome_key, error, self._commit_timeout_s,
                           checkpoint=coordination.checkpoint_name(directory))
      finally:
        if self._save_id_key is not None and self._plan.process_index == 0:
          # Read before the agreement by every process that got that far; one
          # later than the agreement's timeout fails its save either way.
          coordination.delete_key(self._save_id_key)
    elif error is not None:
      raise error

  def _commit_local(self, directory: str) -> None:
    t0, cpu0 = time.perf_counter(), time.thread_time()
    files = []
    try:
      await_directory(directory, self._commit_timeout_s, self._abort, self._directory_signals)
      self.directory_ready.set()
      if self._on_directory_ready is not None:
        self._on_directory_ready()
      for k, size in enumerate(self._plan.file_sizes):
        path = os.path.join(directory, disk_format.data_file_name(self._plan.process_index, k))
        files.append(self._engine.open_for_write(path, preallocate=size))
      self._write_windows(files)
      self._raise_if_failed()
      self._engine.sync(files)
      if self._checksummer is not None:
        self._checksummer.join()   # every crc is in before the manifest records it
      self._raise_if_failed()
    except BaseException as e:  # pylint: disable=broad-except
      self.abort(e)
      self._drain()
      for f in files:
        f.close()
        _remove_quietly(f.path)  # no orphaned partial data beside a failed save
      self._raise_if_failed()
      raise
    for f in files:
      f.close()
    self.stats["write_s"] = time.perf_counter() - t0
    self._write_manifests(directory)
    self.stats["commit_s"] = time.perf_counter() - t0
    self._count_cpu(time.thread_time() - cpu0)

  def _write_windows(self, files) -> None:
    done = False
    while not done:
      batch = [self._to_write.get()]
      while len(batch) < _MAX_WINDOWS_PER_WRITE:
        try:
          batch.append(self._to_write.get_nowait())
        except queue.Empty:
          break
      if batch[-1] is _END:
        batch.pop()
        done = True
      try:
        if batch and not self._abort.is_set():
          self._engine.write([(files[w.file], w.offset, memoryview(self._pool.buffer(w.slab))[:w.length])
                              for w in batch])
      finally:
        for w in batch:
          self._done_with(w)

  def _drain(self) -> None:
    """Returns every slab still in flight to the pool after a failure. The
    stager and the checksummer watch `abort`, so both end soon after it."""
    self._stage_done.wait()   # the stager emits nothing after this
    if self._checksummer is not None:
      self._checksummer.join()   # returns after the stager's last window
    for q in (self._to_checksum, self._to_write):   # (the former if the checksummer died)
      while True:
        try:
          w = q.get_nowait()
        except queue.Empty:
          break
        if w is not _END:
          self._done_with(w)

  def _write_manifests(self, directory: str) -> None:
    """Writes this process's manifest and, where it writes one, the metadata.
    Every process encodes the same metadata (SPMD: the same tree), so each
    manifest records the metadata's checksum without another exchange."""
    plan = self._plan
    save_id = None
    if (self._write_metadata and plan.placement == "per_host" and plan.replica_parallel and
        self._outcome_key):
      # Hosts swap parts on restore: tag the save so parts of different
      # saves are never combined.
      self._save_id_key = f"{self._outcome_key}/save_id"
      save_id = coordination.shared_value(self._save_id_key, lambda: uuid.uuid4().hex,
                                          self._commit_timeout_s)
    with gc_pause.paused():   # encoding and checking: a burst of allocations, no waits
      meta_bytes = disk_format.encode_metadata(disk_format.CheckpointMetadata(
          plan.process_count, self._leaves, placement=plan.placement, save_id=save_id))
      manifest = disk_format.Manifest(
          process_index=plan.process_index,
          files=[(disk_format.data_file_name(plan.process_index, k), size)
                 for k, size in enumerate(plan.file_sizes)],
          shards=[disk_format.ShardRecord(s.leaf, s.index, s.file, s.offset, s.nbytes,
                                          self._checksums.crc(i), s.part,
                                          self._checksums.chunk_crcs(i), self._crc_chunk_bytes)
                  for i, s in enumerate(plan.shards)],
          metadata_crc32c=disk_format.seal_value(meta_bytes),
          crc_chunk_bytes=self._crc_chunk_bytes if any(
              self._checksums.chunk_crcs(i) is not None for i in range(len(plan.shards))) else None)
      manifest_path = os.path.join(directory, disk_format.manifest_name(plan.process_index))
      manifest_bytes = disk_format.encode_manifest(manifest)
      out = {manifest_path: [(0, manifest_bytes)]}
      if self._write_metadata:
        out[os.path.join(directory, disk_format.METADATA_FILE)] = [(0, meta_bytes)]
        if self._custom_metadata is not None:
          out[os.path.join(directory, disk_format.CUSTOM_METADATA_FILE)] = [
              (0, self._custom_metadata)]
      _check_restorable(directory, manifest_path, manifest_bytes, meta_bytes)
    self._engine.write_files(out)


def _check_restorable(directory: str, manifest_path: str, manifest_bytes: bytes,
                      meta_bytes: bytes) -> None:
  """Runs restore's own validation on what is about to be committed (the
  metadata and manifest as encoded, against the data files as synced), so a
  save never commits a step its restore would reject. Raises SaveError."""
  try:
    meta = disk_format.decode_metadata(json.loads(meta_bytes),
                                       os.path.join(directory, disk_format.METADATA_FILE),
                                       meta_bytes)
    manifest = json.loads(manifest_bytes)
    disk_format.decode_manifest(manifest, manifest_path, directory, manifest["process_index"], meta,
                                manifest_bytes)
  except CorruptCheckpointError as e:
    raise SaveError(f"not committing a checkpoint its restore would reject: {e}") from e


def await_directory(directory: str, timeout_s: float, abort: threading.Event,
                    signals: Callable[[], bool] | None = None) -> None:
  """Waits until Orbax has created `directory` for this save.

  Orbax creates a step's directories in the background and signals when they
  exist (`signals`, read without blocking: orbax_internals); then (and with
  per-process managers, whose signal is not always wired, at once) the
  directory itself must be there. Polls every 1-50 ms.

  Raises:
    SaveError: `abort` was set (the save was abandoned or cancelled: the
      error that set it is the one the save raises), or the directory did not
      appear within `timeout_s` (e.g. Orbax could not create it), naming it.
  """
  deadline = time.monotonic() + timeout_s
  delay = 0.001
  while not ((signals is None or signals()) and os.path.isdir(directory)):
    if abort.is_set():
      raise SaveError(f"save into {directory} abandoned while waiting for its directory")
    if time.monotonic() > deadline:
      what = "Orbax's signal that it exists" if signals is not None and not signals() else "it"
      raise SaveError(f"checkpoint directory {directory}: waited {timeout_s:.0f} s "
                      f"(commit_timeout_s) for {what}; nothing was written")
    time.sleep(delay)
    delay = min(delay * 2, 0.05)


def _remove_quietly(path: str) -> None:
  try:
    os.unlink(path)
  except OSError:
    pass
