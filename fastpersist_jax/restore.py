"""Restore: manifests -> read plan -> reads -> verify -> arrays.

Same sharding as saved: each process reads its own shards, one read each,
straight into aligned memory that becomes the array's host copy on CPU. Any
other sharding, mesh or device count: each target shard is assembled from
the saved shards that overlap it (restore_plan.py decides which).

The read pipeline runs four stages at once on batches of whole leaves of
about `restore_batch_bytes`: allocating (and so faulting in) the batch's
memory, reading into it through the engine, verifying each part's CRC-32C,
and building the arrays. The caller's thread plans each batch (where each
shard goes in its buffer, which reads fill it) and builds the arrays
(jax.device_put) while the next batches are read; the other stages run on
their own threads, each making one call without the GIL per batch (or per
large part), so that no per-leaf Python there holds up the building.
Small parts are verified on the building thread (see
_CHECK_ON_VERIFY_THREAD_FROM_BYTES). A fresh process pays for every new page of memory
(on a VM 0.1 to 2 s per GiB), so faulting memory in while the disk reads
the previous batch is what lets a restart restore at the disk's speed.

Where the arrays go decides where batches are read to. Onto CPU devices,
each batch gets fresh aligned memory which the arrays then keep (the CPU
runtime aliases it: no copy). Onto accelerators, a batch that fits one slab
is read into the handler's reusable staging pool (pre-faulted, registered
with io_uring), its host-to-device transfers start from there, and the slab
returns to the pool once they are complete: host memory stays the pool plus
what a single larger shard needs, whatever the checkpoint's size.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import functools
import logging
import os
import threading
import time
from typing import Any, Callable

import crc32c
import jax
import numpy as np

from fastpersist_jax import _ext, disk_format, exchange, jax_internals, shardings, treepath
from fastpersist_jax.errors import (CheckpointNotFoundError, ChecksumMismatchError,
                                    CorruptCheckpointError)
from fastpersist_jax.io_engine import AlignedBuffer, IOEngine, release_free_heap
from fastpersist_jax.options import FastPersistOptions
from fastpersist_jax.restore_plan import (Index, LeafJob, TargetLayouts, as_python, key_dtype,
                                          match_target, overlap, plan_leaf,
                                          restore_plain, saved_shape, saved_shards)
from fastpersist_jax.staging import StagingPool

logger = logging.getLogger(__name__)

# Batches read ahead of the one being built: deep enough that the disk never
# waits for memory to be faulted in or for arrays to be built.
_READ_AHEAD_BATCHES = 3
# Threads faulting in the memory of batches ahead: page faults of fresh
# memory are CPU work, which two threads share while the disk reads.
_ALLOC_THREADS = 2
# Read batches destined for CPU devices into the staging pool too (copying
# them onto the devices, as an accelerator's transfer would). Only tests set
# it: it runs the accelerator path on a machine without one.
_STAGE_ON_CPU = False
# Parts of at least this many bytes are checked on the verify thread; smaller
# ones on the building thread, just before their arrays are built. A small
# part's CRC-32C takes about a microsecond and holds the GIL (the crc32c
# package releases it for 32 KiB and more): checked on another thread, a
# batch of them held the GIL in a Python loop while the building thread
# waited for it, up to the interpreter's 5 ms switch interval at a time
# (10,000 leaves of 4 KiB: 30-48 ms of 0.33 s).
_CHECK_ON_VERIFY_THREAD_FROM_BYTES = 64 << 10
# Leaves per batch at most: many small leaves are built (per-leaf Python)
# while the next batches are read and checked, not after one large batch.
_MAX_BATCH_LEAVES = 1024
# A restore about to fault in a batch of at least this much fresh memory
# first gives the C heap's free memory back to the kernel (io_engine.
# release_free_heap: 60-80 ms, so not for small restores).
_RELEASE_HEAP_FROM_BYTES = 32 << 20
# A restore longer than this logs its progress every this many seconds.
_PROGRESS_EVERY_S = 5.0


def check_part(view: np.ndarray, rec: disk_format.ShardRecord, leaf_name: str, where: str) -> None:
  """Raises ChecksumMismatchError naming the leaf, shard, part and place
  when `view` (the bytes of `rec`) does not match its recorded CRC-32C."""
  if crc32c.crc32c(view) != rec.crc32c:
    part = f" bytes {list(rec.part)}" if rec.part is not None else ""
    raise ChecksumMismatchError(
        f"leaf {leaf_name}, shard {list(map(list, rec.index))}{part} ({where}): checksum "
        "mismatch, the data is corrupt")


# Reads of neighbouring shards merge into one when the padding between them
# in the file is the padding between them in memory, up to this many bytes.
_MERGE_GAP_BYTES = 64 * 1024


def merge_reads(reads: list[tuple[Any, int, int, int]]) -> list[tuple[Any, int, int, int]]:
  """`reads` ((file, file offset, buffer offset, bytes); their buffer ranges
  disjoint) in file order, with neighbours merged where the gap between
  them in the file equals the gap between them in the buffer (at most
  _MERGE_GAP_BYTES: the zero padding between shards) and no other read's
  bytes lie in that gap of the buffer: 10,000 leaves of 4 KiB are then a
  few large reads instead of 10,000 small ones. Pure; the merged reads put
  every byte where the given ones do and write nowhere else that a given
  read does. Reads of no bytes are dropped."""
  # (An empty read may sit inside another read's buffer range: kept, it
  # would pass for a boundary the ranges around it do not have.)
  reads = [r for r in reads if r[3] > 0]
  if _file_and_buffer_orders_agree(reads):
    # Neighbours in the file are neighbours in the buffer: no other read
    # can lie in the gap between them (the common case, checked in one pass).
    ordered, starts = reads, None
  else:
    ordered = sorted(reads, key=lambda r: (r[0].path, r[1]))
    starts = sorted(start for _, _, start, _ in reads)
  out: list[tuple[Any, int, int, int]] = []
  for f, offset, start, n in ordered:
    if out:
      pf, poffset, pstart, pn = out[-1]
      gap = offset - (poffset + pn)
      if (pf is f and 0 <= gap <= _MERGE_GAP_BYTES and start - pstart == offset - poffset and
          (starts is None or
           bisect.bisect_left(starts, pstart + pn) == bisect.bisect_left(starts, start))):
        out[-1] = (pf, poffset, pstart, offset + n - poffset)
        continue
    out.append((f, offset, start, n))
  return out


def _file_and_buffer_orders_agree(reads: list[tuple[Any, int, int, int]]) -> bool:
  """Whether `reads` are in file order (each file's reads together, their
  offsets rising) and their buffer offsets rise in the same order."""
  files_done: set[int] = set()
  pf, poffset, pstart = None, -1, -1
  for f, offset, start, _ in reads:
    if start <= pstart:
      return False
    if f is not pf:
      if id(f) in files_done:
        return False
      files_done.add(id(pf))
    elif offset <= poffset:
      return False
    pf, poffset, pstart = f, offset, start
  return True


def check_chunks(view: np.ndarray, rec: disk_format.ShardRecord, runs: list[tuple[int, int]],
                 leaf_name: Any, where: str) -> None:
  """Checks the chunks `runs` ([first, stop) chunk numbers) of `view` (the
  record's bytes, those chunks read) against rec.chunk_crc32c. Raises
  ChecksumMismatchError naming the leaf, shard, byte range and place."""
  step = rec.chunk_bytes
  for first, stop in runs:
    for c in range(first, stop):
      start, end = c * step, min((c + 1) * step, rec.nbytes)
      if crc32c.crc32c(view[start:end]) != rec.chunk_crc32c[c]:
        raise ChecksumMismatchError(
            f"leaf {leaf_name}, shard {list(map(list, rec.index))} bytes [{start}, {end}) "
            f"({where}): checksum mismatch, the data is corrupt")


def _read_metadata(directory: str) -> disk_format.CheckpointMetadata:
  """disk_format.read_metadata; where fastpersist.json is absent because
  another handler (e.g. Orbax's StandardCheckpointHandler) wrote the
  directory, raises ForeignCheckpointError (a CheckpointNotFoundError)
  naming the writer and how to read it instead."""
  try:
    return disk_format.read_metadata(directory)
  except CheckpointNotFoundError:
    # (recovery imports this module: imported here)
    from fastpersist_jax.recovery import foreign_checkpoint_error  # pylint: disable=g-import-not-at-top
    foreign = foreign_checkpoint_error(directory)
    if foreign is None:
      raise
    raise foreign from None


class Restorer:
  """Restores one checkpoint directory (item directory holding
  fastpersist.json). Raises CheckpointNotFoundError when there is none
  (ForeignCheckpointError when another handler wrote the directory)."""

  def __init__(self, engine: IOEngine, options: FastPersistOptions, directory: str,
               pool: StagingPool | None = None, *,
               meta: disk_format.CheckpointMetadata | None = None,
               manifests: dict[int, disk_format.Manifest] | None = None,
               on_planned: Callable[[], None] | None = None):
    """`pool`: staging memory to read batches bound for accelerators into
    (None: fresh memory for every batch). `meta` and `manifests` (already
    read and validated, e.g. by recovery from other hosts) replace reading
    them from `directory`. `on_planned` is called once the target is
    matched, before anything is read or swapped with other hosts (the
    handler's processes agree there, so that a collective is never entered
    by some of them only); an exception from it ends the restore."""
    self._engine = engine
    self._options = options
    self._directory = directory
    self._pool = pool
    self.meta = meta if meta is not None else _read_metadata(directory)
    self._manifests: dict[int, disk_format.Manifest] | None = manifests
    # Part bytes already in memory: swapped between hosts (per-host
    # checkpoints with replica-parallel parts), keyed by (process, leaf,
    # index, part).
    self._received: dict[tuple, np.ndarray] = {}
    self._files: dict[tuple[int, int], Any] = {}
    self._on_planned = on_planned
    # Figures of the last restore() (see FastPersistHandler.last_restore_stats).
    self.stats: dict[str, float] = {}
    self._heap_lock = threading.Lock()
    self._heap_released = False   # (once per Restorer: see _fresh_memory)

  @property
  def manifests(self) -> dict[int, disk_format.Manifest]:
    """Manifests by process. A per-host checkpoint holds only its own (or,
    gathered by hand, some); a shared one must hold every process's."""
    if self._manifests is None:
      self._manifests = {}
      for p in range(self.meta.process_count):
        if (self.meta.placement == "per_host" and
            not os.path.exists(os.path.join(self._directory, disk_format.manifest_name(p)))):
          continue
        self._manifests[p] = disk_format.read_manifest(self._directory, p, self.meta)
      if not self._manifests:
        raise CorruptCheckpointError(f"{self._directory}: no manifest of any process")
    return self._manifests

  # Public ---------------------------------------------------------------------

  def restore(self, target: Any = None, partial_restore: bool = False) -> Any:
    """The saved tree, or the part of it `target` names, built as `target`
    says (see FastPersistRestore; `partial_restore`: target leaves the
    checkpoint lacks keep their value). Raises RestoreMismatchError (the
    target does not fit), CorruptCheckpointError / ChecksumMismatchError
    (damage)."""
    t0 = time.perf_counter()
    leaves = self.meta.leaves
    selected, treedef = match_target(leaves, target, self._directory, partial_restore)
    wanted = {i for i, _ in selected if i is not None and leaves[i].kind in disk_format.ARRAY_KINDS}
    if wanted or self._parts_are_on_peers():
      self.manifests   # read and validated here, before any collective: a damaged one raises now
    if self._on_planned is not None:
      self._on_planned()
    # Hosts swapping parts all take part in the swap, whatever they restore.
    shards_by_leaf = (saved_shards(leaves, self._records(wanted))
                      if wanted or self._parts_are_on_peers() else {})

    values: list[Any] = [None] * len(selected)
    fallback_to_numpy: list[str] = []
    layouts = TargetLayouts()
    missing_hint = self._missing_hint() if wanted else ""

    def jobs():
      for pos, (leaf_id, t) in enumerate(selected):
        if leaf_id is None:
          values[pos] = t    # the target's own (see match_target)
          continue
        meta = leaves[leaf_id]
        if meta.kind in disk_format.ARRAY_KINDS:
          yield pos, plan_leaf(leaf_id, meta, t, shards_by_leaf.get(leaf_id, []),
                               fallback_to_numpy, missing_hint, layouts)
        else:
          values[pos] = restore_plain(meta, t, treepath.LazyName(meta.path))

    try:
      stats = self._read_and_build(jobs(), values)
    finally:
      for f in self._files.values():
        f.close()
      self._files.clear()
    if fallback_to_numpy:
      logger.warning("Restoring %d array(s) as numpy because their saved sharding does not fit "
                     "the devices present (%s). Pass a target with shardings to place them.",
                     len(fallback_to_numpy), fallback_to_numpy[0])
    seconds = time.perf_counter() - t0
    self.stats = {"bytes": float(stats["bytes"]), "seconds": seconds,
                  "gbps": stats["bytes"] / max(seconds, 1e-9) / 1e9,
                  "resharded": float(stats["resharded"])}
    logger.info("Restored %s: %d leaves, %d bytes in %.3f s (%.3f GB/s)%s.", self._directory,
                len(selected), stats["bytes"], seconds,
                stats["bytes"] / max(seconds, 1e-9) / 1e9,
                ", resharded" if stats["resharded"] else "")
    if treedef is not None:
      return jax.tree_util.tree_unflatten(treedef, values)
    return treepath.unflatten_as_nested([(leaves[i].path, v) for (i, _), v in zip(selected, values)])

  def abstract_tree(self) -> Any:
    """The saved tree as jax.ShapeDtypeStructs (with shardings where they fit;
    typed keys with their key dtype), plus the saved Python scalars."""
    items = []
    for meta in self.meta.leaves:
      if meta.kind == "array":
        sharding, _ = shardings.decode(meta.sharding)
        dtype = key_dtype(meta.prng_impl) if meta.prng_impl else disk_format.dtype_from_name(meta.dtype)
        value = jax.ShapeDtypeStruct(saved_shape(meta), dtype, sharding=sharding)
      elif meta.kind in ("numpy", "np_scalar"):
        value = jax.ShapeDtypeStruct(meta.shape, disk_format.dtype_from_name(meta.dtype))
      else:
        value = disk_format.plain_value(meta)
      items.append((meta.path, value))
    return treepath.unflatten_as_nested(items)

  # Saved shards -------------------------------------------------------------

  def _records(self, wanted: set[int]) -> dict[tuple[int, Index], list]:
    """{(leaf, index): [(process, record), ...]} of the wanted leaves, from
    every manifest here (and, per host, from the other hosts' swapped parts)."""
    records: dict[tuple[int, Index], list] = {}
    swap = self._parts_are_on_peers()
    for m in self.manifests.values():
      for rec in m.shards:
        # Swapping, this host sends its parts of every leaf: another host's
        # target may want leaves this one's does not.
        if swap or rec.leaf in wanted:
          records.setdefault((rec.leaf, rec.index), []).append((m.process_index, rec))
    if swap:
      for process, rec, data in self._swap_parts(records):
        if rec.leaf in wanted:
          records.setdefault((rec.leaf, rec.index), []).append((process, rec))
          self._received[(process, rec.leaf, rec.index, rec.part)] = data
      records = {k: v for k, v in records.items() if k[0] in wanted}
    return records

  def collective_processes(self) -> list[int] | None:
    """The processes this restore makes collectives with (all of them when
    hosts swap parts), or None when it makes none."""
    return list(range(jax.process_count())) if self._parts_are_on_peers() else None

  def _missing_hint(self) -> str:
    if self.meta.placement == "per_host":
      return ("this per-host checkpoint holds only its own process's parts: processes "
              f"{sorted(self.manifests)} of {self.meta.process_count} are here; restore on the "
              "same topology (the hosts swap parts), or gather the other hosts' files into this "
              "directory")
    return "a process's data is missing"

  def _parts_are_on_peers(self) -> bool:
    """A per-host checkpoint with replica-parallel parts, restored by as many
    processes as saved it: the hosts swap parts. Decided from metadata alone,
    so that every process takes part in the collective."""
    return (self.meta.placement == "per_host" and self.meta.save_id is not None and
            self.meta.process_count == jax.process_count() > 1)

  def _swap_parts(self, records) -> list:
    """Reads and verifies this process's parts, then swaps them with every
    other process (a collective: all processes restore together). A local
    failure is reported through the swap, so every process raises."""
    me = jax.process_index()
    mine = [rec for recs in records.values() for p, rec in recs
            if p == me and rec.part is not None]
    buf = np.frombuffer(AlignedBuffer(sum(disk_format.align_up(r.nbytes) for r in mine)), np.uint8)
    views, error = [], None
    try:
      extents, at = [], 0
      for rec in mine:
        views.append(buf[at:at + rec.nbytes])
        extents.append((self._file(me, rec.file), rec.offset, views[-1]))
        at += disk_format.align_up(rec.nbytes)
      self._engine.read(extents)
      if self._options.verify_checksums:
        for rec, view in zip(mine, views):
          check_part(view, rec, treepath.to_str(self.meta.leaves[rec.leaf].path),
                     self._where(me, rec))
    except (OSError, CorruptCheckpointError) as e:
      error = f"{type(e).__name__}: {e}"
    theirs = exchange.swap_parts([] if error else list(zip(mine, views)), self.meta.save_id,
                                 error)
    for rec, view in zip(mine, views):   # already read and verified: not again
      self._received[(me, rec.leaf, rec.index, rec.part)] = view
    return theirs

  def _where(self, process: int, rec: disk_format.ShardRecord) -> str:
    if process in self.manifests and rec.file >= 0:
      return f"process {process}, {self.manifests[process].files[rec.file][0]} @ {rec.offset}"
    return f"process {process}, received from that host"

  def _file(self, process: int, file_id: int):
    key = (process, file_id)
    if key not in self._files:
      name = self.manifests[process].files[file_id][0]
      self._files[key] = self._engine.open_for_read(os.path.join(self._directory, name))
    return self._files[key]

  # The read pipeline --------------------------------------------------------

  def _read_and_build(self, jobs, values: list[Any]) -> dict:
    """Plans, reads, verifies and builds batch by batch (see the module
    docstring); returns {"bytes": read, "resharded": bool}."""
    stats = {"bytes": 0, "resharded": False}
    t0 = last_log = time.perf_counter()
    # Fresh memory is faulted in by two threads; staging slabs are taken in
    # batch order by one (so the oldest batch never waits behind a newer one).
    executors = [concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix=f"fastpersist-{name}")
                 for name, n in (("alloc", _ALLOC_THREADS), ("slabs", 1), ("read", 1),
                                 ("verify", 1))]
    alloc, slabs, reader, verifier = executors
    abort = threading.Event()
    in_flight: collections.deque = collections.deque()   # (batch, its _BatchReads, slab, verified)
    batch_limit = self._options.restore_batch_bytes
    if self._pool is not None:
      batch_limit = min(batch_limit, self._pool.slab_bytes)

    def submit(batch):
      placed = self._place(batch)
      slab = None
      if placed.nbytes <= batch_limit and self._stage(batch):
        slab = slabs.submit(self._acquire_slab, abort)
        buffer = slab
      else:
        buffer = alloc.submit(self._fresh_memory, placed.nbytes)
      loaded = reader.submit(self._load, placed, buffer)
      in_flight.append((batch, placed, slab, verifier.submit(self._verify_large, placed, loaded)))
      stats["bytes"] += sum(s.bytes_to_read for _, job in batch for s in job.needed)

    def build_oldest():
      nonlocal last_log
      batch, placed, slab, verified = in_flight.popleft()
      try:
        whole = verified.result()
        for _, job in batch:
          for s in job.needed:
            s.view = whole[s.at:s.at + s.nbytes]
        self._verify_small(placed)
        built = _build_batch([job for _, job in batch], copy_host_pieces=slab is not None)
        if slab is not None:
          jax.block_until_ready(built)   # the transfers read the slab: done before it is reused
      finally:
        if slab is not None:
          self._release_slab(slab)
      for (pos, job), value in zip(batch, built):
        values[pos] = value
        stats["resharded"] |= job.resharded
        for s in job.needed:
          s.view = None
      now = time.perf_counter()
      if now - last_log > _PROGRESS_EVERY_S:
        last_log = now
        logger.info("Restoring %s: %d bytes read, %.3f GB/s so far", self._directory,
                    stats["bytes"], stats["bytes"] / (now - t0) / 1e9)

    try:
      batch: list[tuple[int, LeafJob]] = []
      batch_bytes = 0
      for pos, job in jobs:
        job_bytes = job.read_bytes
        if batch and (batch_bytes + job_bytes > batch_limit or len(batch) >= _MAX_BATCH_LEAVES):
          submit(batch)
          batch, batch_bytes = [], 0
          while len(in_flight) > _READ_AHEAD_BATCHES:
            build_oldest()
        batch.append((pos, job))
        batch_bytes += job_bytes
      if batch:
        submit(batch)
      while in_flight:
        build_oldest()
    finally:
      abort.set()
      for _, _, _, verified in in_flight:
        verified.cancel()
      for e in executors:
        e.shutdown(wait=True, cancel_futures=True)   # nothing may still write into freed memory
      for _, _, slab, _ in in_flight:   # batches not built (a failure): their slabs go back
        if slab is not None:
          self._release_slab(slab)
    return stats

  def _stage(self, batch) -> bool:
    """Whether the batch goes through the staging pool: every leaf of it is
    bound for accelerator devices (whose transfers copy), not for the CPU
    (whose arrays would alias the slab) or numpy."""
    if self._pool is None:
      return False
    for _, job in batch:
      if job.sharding is None:
        return False
      platforms = {d.platform for d, _ in job.device_indices}
      if "cpu" in platforms and not _STAGE_ON_CPU:
        return False
    return True

  def _fresh_memory(self, nbytes: int) -> AlignedBuffer:
    """`nbytes` of fresh aligned memory (the arrays of a CPU restore keep
    it); the first large batch of a restore releases the heap's free memory
    first (see _RELEASE_HEAP_FROM_BYTES)."""
    if nbytes >= _RELEASE_HEAP_FROM_BYTES:
      with self._heap_lock:
        if not self._heap_released:
          self._heap_released = True
          release_free_heap()
    return AlignedBuffer(nbytes)

  def _acquire_slab(self, abort: threading.Event) -> int:
    self._pool.ensure((_READ_AHEAD_BATCHES + 1) * self._pool.slab_bytes)
    return self._pool.acquire(abort)

  def _release_slab(self, slab_future) -> None:
    try:
      slab = slab_future.result()
    except BaseException:  # pylint: disable=broad-except  (never acquired: nothing to give back)
      return
    self._pool.release(slab)

  def _place(self, batch) -> _BatchReads:
    """Lays the batch's saved shards out in one buffer (each at an aligned
    offset, set as its `at`) and lists what fills it and what checks it.
    Runs on the building thread, so that the reading and verifying threads
    do no per-leaf Python work (see _BatchReads)."""
    check = self._options.verify_checksums
    received = self._received
    reads: list[tuple[Any, int, int, int]] = []   # (file, file offset, buffer offset, bytes)
    file_key, file = None, None   # the last part's (process, file number) and file
    placed = _BatchReads()
    at = 0
    for _, job in batch:
      for s in job.needed:
        s.at = at
        if s.chunk_runs is not None:   # only the chunks a resharding restore needs
          (process, rec), = s.parts
          step = rec.chunk_bytes
          for first, stop in s.chunk_runs:
            end = min(stop * step, s.nbytes)
            reads.append((self._file(process, rec.file), rec.offset + first * step,
                          at + first * step, end - first * step))
          if check:
            placed.large_checks.append((job, s, process, rec))
          at += disk_format.align_up(s.nbytes)
          continue
        for process, rec in s.parts:
          if not rec.nbytes:
            continue
          start = at + (rec.part[0] if rec.part else 0)
          data = received.get((process, rec.leaf, rec.index, rec.part)) if received else None
          if data is not None:
            placed.copies.append((start, rec.nbytes, data))
          else:
            if (process, rec.file) != file_key:
              file_key = (process, rec.file)
              file = self._file(process, rec.file)
            reads.append((file, rec.offset, start, rec.nbytes))
          if check:
            checks = (placed.large_checks if rec.nbytes >= _CHECK_ON_VERIFY_THREAD_FROM_BYTES
                      else placed.small_checks)
            checks.append((job, s, process, rec))
        at += disk_format.align_up(s.nbytes)
    placed.nbytes = at
    placed.reads = merge_reads(reads)
    return placed

  def _load(self, placed: _BatchReads, buffer_future) -> np.ndarray:
    """Reads (or copies, for parts already in memory) every byte the batch
    needs into its aligned buffer, as `placed` lays them out; returns the
    buffer (fresh memory on CPU, which the restored arrays alias)."""
    memory = buffer_future.result()   # a staging slab's number, or fresh memory
    whole = self._pool.view(memory) if isinstance(memory, int) else np.frombuffer(memory, np.uint8)
    self._engine.read([(f, offset, whole[start:start + n]) for f, offset, start, n in placed.reads])
    if placed.copies:
      _ext.copy_many([(whole[start:start + n], data) for start, n, data in placed.copies], 1)
    return whole

  def _verify_large(self, placed: _BatchReads, loaded) -> np.ndarray:
    """Checks the batch's large parts and chunks once loaded (the CRC runs
    without the GIL); returns the loaded buffer."""
    whole = loaded.result()
    for job, s, process, rec in placed.large_checks:
      view = whole[s.at:s.at + s.nbytes]
      if s.chunk_runs is not None:
        check_chunks(view, rec, s.chunk_runs, treepath.LazyName(job.meta.path),
                     self._where(process, rec))
      else:
        start = rec.part[0] if rec.part else 0
        check_part(view[start:start + rec.nbytes], rec, treepath.LazyName(job.meta.path),
                   self._where(process, rec))
    return whole

  def _verify_small(self, placed: _BatchReads) -> None:
    """Checks the batch's small parts, on the building thread (their views
    set): see _CHECK_ON_VERIFY_THREAD_FROM_BYTES."""
    for job, s, process, rec in placed.small_checks:
      start = rec.part[0] if rec.part else 0
      view = s.view[start:start + rec.nbytes]
      if crc32c.crc32c(view) != rec.crc32c:
        check_part(view, rec, treepath.to_str(job.meta.path), self._where(process, rec))


class _BatchReads:
  """What one batch reads where, decided on the building thread.

  nbytes: the batch buffer's size (each saved shard at an aligned offset).
  reads: merged (file, file offset, buffer offset, bytes).
  copies: (buffer offset, bytes, their data already in memory: parts the
    hosts swapped).
  large_checks, small_checks: (job, saved shard, process, record) whose
    CRC-32C to check; large ones (and resharding chunks) on the verify
    thread, small ones on the building thread.
  """

  __slots__ = ("nbytes", "reads", "copies", "large_checks", "small_checks")

  def __init__(self):
    self.nbytes = 0
    self.reads: list[tuple[Any, int, int, int]] = []
    self.copies: list[tuple[int, int, np.ndarray]] = []
    self.large_checks: list[tuple] = []
    self.small_checks: list[tuple] = []


def _region(job: LeafJob, index: Index, dtype: np.dtype) -> np.ndarray:
  """The target region `index` of the leaf, from the saved shards read."""
  for s in job.needed:
    if s.index == index:   # exact match: no copy
      return s.view.view(dtype).reshape(_extent(index))
  out = np.empty(_extent(index), dtype)
  for s in job.needed:
    o = overlap(s.index, index)
    if o is None:
      continue
    src = s.view.view(dtype).reshape(_extent(s.index))
    src_sl = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(o, s.index))
    dst_sl = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(o, index))
    out[dst_sl] = src[src_sl]
  return out


@functools.lru_cache(maxsize=4096)
def _extent(index: Index) -> tuple[int, ...]:
  """The shape of region `index` (many leaves share one)."""
  return tuple(b - a for a, b in index)


def _host_value(job: LeafJob) -> Any:
  """A leaf built on the host: numpy, a numpy or Python scalar, or typed keys."""
  meta = job.meta
  arr = _region(job, tuple((0, n) for n in meta.shape), disk_format.dtype_from_name(meta.dtype))
  if job.dtype != arr.dtype:
    arr = arr.astype(job.dtype)
  if job.python_type is not None:
    return as_python(arr, job.python_type, treepath.to_str(meta.path))
  if job.prng_impl:
    return jax.random.wrap_key_data(arr, impl=job.prng_impl)
  if meta.kind == "np_scalar" or job.numpy_scalar:
    return arr.reshape(())[()]
  return arr


def _build_batch(jobs: list[LeafJob], copy_host_pieces: bool = False) -> list[Any]:
  """The leaves of a batch, each into the target's memory kind (e.g.
  pinned_host). A leaf is built in one call to jax's C++ array builder where
  jax_internals has it (jax's Python per device_put dominates small leaves:
  10,000 leaves of 4 KiB took 0.7-0.8 s through jax.device_put, 45-65 ms
  of calls so); else with one jax.device_put for every device shard of the batch and
  one global array per leaf. With `copy_host_pieces` (the batch is in a
  staging slab to be reused), a piece bound for a CPU device is copied
  first: the CPU runtime would alias the slab."""
  out: list[Any] = [None] * len(jobs)
  fast = jax_internals.fast_build_available()
  pieces, targets, owners = [], [], []
  # Each layout's devices: leaves of one layout share its device_indices
  # (restore_plan.TargetLayouts), alive as long as the batch.
  devices_of: dict[int, list] = {}
  for k, job in enumerate(jobs):
    if job.sharding is None:
      out[k] = _host_value(job)
      continue
    leaf_pieces = _device_pieces(job, copy_host_pieces)
    if fast and not job.prng_impl:
      devices = devices_of.get(id(job.device_indices))
      if devices is None:
        devices = devices_of[id(job.device_indices)] = [d for d, _ in job.device_indices]
      out[k] = jax_internals.array_from_host_shards(job.meta.shape, job.dtype, job.sharding,
                                                    devices, leaf_pieces)
      continue
    memory_kind = job.sharding.memory_kind
    pieces.extend(leaf_pieces)
    targets.extend(jax.sharding.SingleDeviceSharding(d, memory_kind=memory_kind)
                   for d, _ in job.device_indices)
    owners.extend([k] * len(leaf_pieces))
  if not pieces:
    return out
  arrays = jax.device_put(pieces, targets)
  per_job: dict[int, list] = {}
  for k, a in zip(owners, arrays):
    per_job.setdefault(k, []).append(a)
  for k, shards_of_leaf in per_job.items():
    job = jobs[k]
    shape = job.meta.shape
    if job.prng_impl:
      shards_of_leaf = [jax.random.wrap_key_data(a, impl=job.prng_impl) for a in shards_of_leaf]
      shape = saved_shape(job.meta)
    if isinstance(job.sharding, jax.sharding.SingleDeviceSharding):
      out[k] = shards_of_leaf[0]   # already the array, on its device and memory kind
    else:
      out[k] = jax.make_array_from_single_device_arrays(shape, job.sharding, shards_of_leaf)
  return out


def _device_pieces(job: LeafJob, copy_host_pieces: bool) -> list[np.ndarray]:
  """The host data of each of the leaf's target device shards (in
  job.device_indices order), cast to the target dtype; device shards that
  hold the same region share one piece."""
  saved = disk_format.dtype_from_name(job.meta.dtype)
  if not copy_host_pieces and len(job.device_indices) == 1 and len(job.needed) == 1:
    ((_, idx),), (s,) = job.device_indices, job.needed
    if s.index == idx:   # the common case, one device and the one saved shard: as below
      piece = s.view.view(saved).reshape(_extent(idx))
      return [piece if job.dtype == saved else piece.astype(job.dtype)]
  per_index: dict[Index, np.ndarray] = {}
  out = []
  for device, idx in job.device_indices:
    if idx not in per_index:
      region = _region(job, idx, saved)
      per_index[idx] = region if job.dtype == saved else region.astype(job.dtype)
    piece = per_index[idx]
    if copy_host_pieces and device.platform == "cpu" and piece.base is not None:
      piece = np.array(piece)
    out.append(piece)
  return out
