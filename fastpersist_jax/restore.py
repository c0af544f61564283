"""Restore: read exactly the saved shards each target shard needs, verify
their checksums, and build arrays on the target's devices.

Same sharding as saved: each process reads its own shards, one read each,
straight into aligned memory that becomes the array's host copy. Any other
sharding, mesh or device count: each target shard is assembled from the
saved shards that overlap it. Reads are batched (restore_batch_bytes) so the
engine keeps a deep queue across many leaves.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import os
from typing import Any

import crc32c
import jax
import numpy as np

from fastpersist_jax import _ext, exchange, layout, shardings, treepath
from fastpersist_jax.errors import (ChecksumMismatchError, CorruptCheckpointError,
                                    RestoreMismatchError)
from fastpersist_jax.io_engine import AlignedBuffer, IOEngine
from fastpersist_jax.options import FastPersistOptions
from fastpersist_jax.plan import normalize_index

logger = logging.getLogger(__name__)

Index = tuple[tuple[int, int], ...]


@dataclasses.dataclass
class _SavedShard:
  """One saved shard: its bytes may be split in parts written by several
  processes (replica-parallel), each part with its own record and crc."""
  index: Index
  nbytes: int
  parts: list[tuple[int, layout.ShardRecord]]   # (process, record), in byte order
  missing: str | None = None                    # why some bytes are not here
  view: np.ndarray | None = None                # all its bytes, once read

  def describe(self, manifests, process: int, rec: layout.ShardRecord) -> str:
    part = f" bytes {list(rec.part)}" if rec.part is not None else ""
    where = (f"{manifests[process].files[rec.file][0]} @ {rec.offset}" if process in manifests
             else "received from that host")
    return f"shard {list(map(list, self.index))}{part} (process {process}, {where})"


def _assemble_parts(leaf_name: str, index: Index, nbytes: int,
                    records: list[tuple[int, layout.ShardRecord]]) -> _SavedShard:
  """Orders a shard's parts; they must tile its bytes exactly once. The same
  range saved twice (per-host checkpoints gathered in one directory) is fine."""
  chosen = []
  at = 0
  for process, rec in sorted(records, key=lambda pr: (pr[1].part or (0, nbytes), pr[0])):
    start, stop = rec.part or (0, nbytes)
    if start == at and stop > start:
      chosen.append((process, rec))
      at = stop
    elif chosen and (start, stop) == (chosen[-1][1].part or (0, nbytes)):
      continue  # a duplicate of the part just taken
    elif stop > start or start > at:
      raise CorruptCheckpointError(
          f"leaf {leaf_name!r}, shard {list(map(list, index))}: saved parts overlap or leave "
          f"a gap at byte {at} (part {[start, stop]})")
  missing = None
  if at != nbytes and nbytes:
    # An error only if a target needs this shard (see Restorer._plan_leaf).
    missing = (f"leaf {leaf_name!r}, shard {list(map(list, index))}: only bytes [0, {at}) of "
               f"{nbytes} are here")
  return _SavedShard(index, nbytes, chosen, missing)


@dataclasses.dataclass
class _LeafJob:
  leaf_id: int
  meta: layout.LeafMeta
  sharding: jax.sharding.Sharding | None    # None: build a numpy array
  device_indices: list[tuple[Any, Index]]   # (device, index) of target shards
  needed: list[_SavedShard]


def _overlap(a: Index, b: Index) -> Index | None:
  out = []
  for (a0, a1), (b0, b1) in zip(a, b):
    lo, hi = max(a0, b0), min(a1, b1)
    if lo >= hi:
      return None
    out.append((lo, hi))
  return tuple(out)


def _volume(index: Index) -> int:
  return math.prod(b - a for a, b in index)


def _check_target(meta: layout.LeafMeta, target: Any, name: str) -> None:
  shape = tuple(getattr(target, "shape", ()))
  dtype = np.dtype(getattr(target, "dtype"))
  if shape != meta.shape:
    raise RestoreMismatchError(f"leaf {name!r}: target shape {shape} differs from saved {meta.shape}")
  if dtype != layout.dtype_from_name(meta.dtype):
    raise RestoreMismatchError(f"leaf {name!r}: target dtype {dtype} differs from saved {meta.dtype}")


class Restorer:
  """Restores one checkpoint directory."""

  def __init__(self, engine: IOEngine, options: FastPersistOptions, directory: str, *,
               meta: layout.CheckpointMetadata | None = None,
               manifests: dict[int, layout.Manifest] | None = None):
    """`meta` and `manifests` (already read and validated, e.g. by recovery
    from other hosts) replace reading them from `directory`."""
    self._engine = engine
    self._options = options
    self._directory = directory
    self.meta = meta if meta is not None else layout.read_metadata(directory)
    self._manifests: dict[int, layout.Manifest] | None = manifests
    # Part bytes already in memory: swapped between hosts (per-host
    # checkpoints with replica-parallel parts), keyed by (process, leaf,
    # index, part).
    self._received: dict[tuple, np.ndarray] = {}

  @property
  def manifests(self) -> dict[int, layout.Manifest]:
    """Manifests by process. A per-host checkpoint holds only its own (or,
    gathered by hand, some); a shared one must hold every process's."""
    if self._manifests is None:
      self._manifests = {}
      for p in range(self.meta.process_count):
        if (self.meta.layout == "per_host" and
            not os.path.exists(os.path.join(self._directory, layout.manifest_name(p)))):
          continue
        self._manifests[p] = layout.read_manifest(self._directory, p, self.meta)
      if not self._manifests:
        raise CorruptCheckpointError(f"{self._directory}: no manifest of any process")
    return self._manifests

  # Public ---------------------------------------------------------------------

  def restore(self, target: Any = None) -> Any:
    leaves = self.meta.leaves
    if target is None:
      selected = [(i, None) for i in range(len(leaves))]
      treedef = None
    else:
      flat, treedef = treepath.flatten(target)
      by_key = {treepath.key_of(l.path): i for i, l in enumerate(leaves)}
      selected = []
      for path, t in flat:
        key = treepath.key_of(path)
        if key not in by_key:
          raise RestoreMismatchError(
              f"leaf {treepath.to_str(path)!r} of the restore target is not in the checkpoint")
        selected.append((by_key[key], t))

    shards_by_leaf: dict[int, list[_SavedShard]] = {}
    wanted = {i for i, _ in selected if leaves[i].kind in ("array", "numpy", "np_scalar")}
    if wanted:
      records: dict[tuple[int, Index], list] = {}
      for m in self.manifests.values():
        for rec in m.shards:
          if rec.leaf in wanted:
            records.setdefault((rec.leaf, rec.index), []).append((m.process_index, rec))
      if self._parts_are_on_peers():
        for process, rec, data in self._swap_parts(records):
          if rec.leaf in wanted:
            records.setdefault((rec.leaf, rec.index), []).append((process, rec))
            self._received[(process, rec.leaf, rec.index, rec.part)] = data
      for (leaf_id, index), recs in records.items():
        meta = leaves[leaf_id]
        nbytes = _volume(index) * layout.dtype_from_name(meta.dtype).itemsize
        shards_by_leaf.setdefault(leaf_id, []).append(
            _assemble_parts(treepath.to_str(meta.path), index, nbytes, recs))
      for leaf_id, shards in shards_by_leaf.items():
        layout.check_grid([s.index for s in shards],
                          f"leaf {treepath.to_str(leaves[leaf_id].path)!r}: saved shards")

    values: list[Any] = [None] * len(selected)
    jobs: list[tuple[int, _LeafJob]] = []
    fallback_to_numpy: list[str] = []
    for pos, (leaf_id, t) in enumerate(selected):
      meta = leaves[leaf_id]
      name = treepath.to_str(meta.path)
      if meta.kind in ("array", "numpy", "np_scalar"):
        job = self._plan_leaf(leaf_id, meta, t, name, shards_by_leaf.get(leaf_id, []),
                              fallback_to_numpy)
        jobs.append((pos, job))
      else:
        if t is not None and isinstance(t, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)):
          raise RestoreMismatchError(f"leaf {name!r}: saved as {meta.kind}, target is an array")
        values[pos] = _plain_value(meta)
    if fallback_to_numpy:
      logger.warning("Restoring %d array(s) as numpy because their saved sharding does not fit "
                     "the devices present (%s). Pass a target with shardings to place them.",
                     len(fallback_to_numpy), fallback_to_numpy[0])

    self._read_and_build(jobs, values)
    if treedef is not None:
      return jax.tree_util.tree_unflatten(treedef, values)
    return treepath.unflatten_as_nested([(leaves[i].path, v) for (i, _), v in zip(selected, values)])

  def _parts_are_on_peers(self) -> bool:
    """A per-host checkpoint with replica-parallel parts, restored by as many
    processes as saved it: the hosts swap parts. Decided from metadata alone,
    so that every process takes part in the collective."""
    return (self.meta.layout == "per_host" and self.meta.save_id is not None and
            self.meta.process_count == jax.process_count() > 1)

  def _swap_parts(self, records) -> list:
    """Reads and verifies this process's parts, then swaps them with every
    other process (a collective: all processes restore together). A local
    failure is reported through the swap, so every process raises."""
    me = jax.process_index()
    mine = [rec for recs in records.values() for p, rec in recs
            if p == me and rec.part is not None]
    buf = np.frombuffer(AlignedBuffer(sum(layout.align_up(r.nbytes) for r in mine)), np.uint8)
    views, error = [], None
    files: dict = {}
    try:
      extents, at = [], 0
      for rec in mine:
        views.append(buf[at:at + rec.nbytes])
        extents.append((self._file(files, me, rec.file), rec.offset, views[-1]))
        at += layout.align_up(rec.nbytes)
      self._engine.read(extents)
      for rec, view in zip(mine, views):
        if self._options.verify_checksums and crc32c.crc32c(view) != rec.crc32c:
          raise ChecksumMismatchError(
              f"leaf {treepath.to_str(self.meta.leaves[rec.leaf].path)!r}, shard "
              f"{list(map(list, rec.index))} bytes {list(rec.part)}: checksum mismatch")
    except (OSError, CorruptCheckpointError) as e:
      error = f"{type(e).__name__}: {e}"
    finally:
      for f in files.values():
        f.close()
    theirs = exchange.swap_parts([] if error else list(zip(mine, views)), self.meta.save_id,
                                 error)
    for rec, view in zip(mine, views):   # already read and verified: not again
      self._received[(me, rec.leaf, rec.index, rec.part)] = view
    return theirs

  def abstract_tree(self) -> Any:
    """The saved tree as jax.ShapeDtypeStructs (with shardings where they fit)."""
    items = []
    for meta in self.meta.leaves:
      if meta.kind == "array":
        sharding, _ = shardings.decode(meta.sharding)
        value = jax.ShapeDtypeStruct(meta.shape, layout.dtype_from_name(meta.dtype), sharding=sharding)
      elif meta.kind in ("numpy", "np_scalar"):
        value = jax.ShapeDtypeStruct(meta.shape, layout.dtype_from_name(meta.dtype))
      else:
        value = _plain_value(meta)
      items.append((meta.path, value))
    return treepath.unflatten_as_nested(items)

  # Planning -----------------------------------------------------------------

  def _plan_leaf(self, leaf_id, meta, t, name, saved, fallback_to_numpy) -> _LeafJob:
    sharding = None
    if t is not None:
      if not hasattr(t, "shape") or not hasattr(t, "dtype"):
        raise RestoreMismatchError(
            f"leaf {name!r}: saved as an array; target {type(t).__name__} is not an array")
      _check_target(meta, t, name)
      if isinstance(t, jax.Array):
        sharding = t.sharding
      elif isinstance(t, jax.ShapeDtypeStruct):
        sharding = t.sharding
        if sharding is None and meta.kind == "array":
          sharding, why = shardings.decode(meta.sharding)
          if sharding is None:
            fallback_to_numpy.append(f"{name}: {why}")
    elif meta.kind == "array":
      sharding, why = shardings.decode(meta.sharding)
      if sharding is None:
        fallback_to_numpy.append(f"{name}: {why}")
    if sharding is not None:
      device_indices = [(d, normalize_index(idx, meta.shape)) for d, idx in
                        sharding.addressable_devices_indices_map(meta.shape).items()]
    else:
      device_indices = [(None, tuple((0, n) for n in meta.shape))]
    needed = [s for s in saved
              if any(_overlap(s.index, idx) is not None for _, idx in device_indices)]
    for s in needed:
      if s.missing:
        hint = (f"this per-host checkpoint holds processes {sorted(self.manifests)} of "
                f"{self.meta.process_count}; restore on the same topology (the hosts swap "
                "parts), or gather the other hosts' files into this directory"
                if self.meta.layout == "per_host" else "a process's part is missing")
        raise CorruptCheckpointError(f"{s.missing} ({hint})")
    # Every target region must be covered by saved data.
    for _, idx in device_indices:
      covered = sum(_volume(o) for s in needed if (o := _overlap(s.index, idx)) is not None)
      if covered != _volume(idx):
        hint = ("this per-host checkpoint holds only what its own process's devices held: "
                f"processes {sorted(self.manifests)} of {self.meta.process_count} are here; "
                "restore on the same topology, or gather the other hosts' files into this "
                "directory" if self.meta.layout == "per_host" else "a process's data is missing?")
        raise CorruptCheckpointError(
            f"leaf {name!r}: the checkpoint holds {covered} of the {_volume(idx)} elements of "
            f"region {list(map(list, idx))} ({hint})")
    return _LeafJob(leaf_id, meta, sharding, device_indices, needed)

  # Reading ------------------------------------------------------------------

  def _read_and_build(self, jobs: list[tuple[int, _LeafJob]], values: list[Any]) -> None:
    """Reads batch k+1 on a helper thread while batch k is verified and built
    here: both the engine and crc32c run without the GIL."""
    batches: list[list[tuple[int, _LeafJob]]] = []
    batch_bytes = 0
    for pos, job in jobs:
      nbytes = sum(layout.align_up(s.nbytes) for s in job.needed)
      if not batches or (batches[-1] and batch_bytes + nbytes > self._options.restore_batch_bytes):
        batches.append([])
        batch_bytes = 0
      batches[-1].append((pos, job))
      batch_bytes += nbytes
    files: dict[tuple[int, int], Any] = {}
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fastpersist-read") as reader:
      try:
        pending = reader.submit(self._load, batches[0], files) if batches else None
        for k, batch in enumerate(batches):
          pending.result()
          if k + 1 < len(batches):
            pending = reader.submit(self._load, batches[k + 1], files)
          self._finish(batch, values)
      finally:
        if pending is not None:
          pending.cancel()
          concurrent.futures.wait([pending])
        for f in files.values():
          f.close()

  def _file(self, files, process: int, file_id: int):
    key = (process, file_id)
    if key not in files:
      name = self.manifests[process].files[file_id][0]
      files[key] = self._engine.open_for_read(os.path.join(self._directory, name))
    return files[key]

  def _load(self, batch, files) -> None:
    """Reads every part of every saved shard the batch needs into fresh
    aligned memory (fresh: on CPU the restored arrays alias it)."""
    shards = [s for _, job in batch for s in job.needed]
    total = sum(layout.align_up(s.nbytes) for s in shards)
    whole = np.frombuffer(AlignedBuffer(total), np.uint8)
    extents = []
    at = 0
    in_memory = []
    for s in shards:
      s.view = whole[at:at + s.nbytes]
      for process, rec in s.parts:
        if rec.nbytes:
          start = rec.part[0] if rec.part else 0
          dst = s.view[start:start + rec.nbytes]
          data = self._received.get((process, rec.leaf, rec.index, rec.part))
          if data is not None:
            in_memory.append((dst, data))
          else:
            extents.append((self._file(files, process, rec.file), rec.offset, dst))
      at += layout.align_up(s.nbytes)
    self._engine.read(extents)
    if in_memory:
      _ext.copy_many(in_memory, 1)

  def _finish(self, batch, values) -> None:
    for pos, job in batch:
      name = treepath.to_str(job.meta.path)
      if self._options.verify_checksums:
        for s in job.needed:
          for process, rec in s.parts:
            start = rec.part[0] if rec.part else 0
            if crc32c.crc32c(s.view[start:start + rec.nbytes]) != rec.crc32c:
              raise ChecksumMismatchError(
                  f"leaf {name!r}, {s.describe(self.manifests, process, rec)}: "
                  "checksum mismatch, the data is corrupt")
      values[pos] = _build(job)
      for s in job.needed:
        s.view = None


def _plain_value(meta: layout.LeafMeta) -> Any:
  return {"none": None, "empty_dict": {}, "empty_list": [], "empty_tuple": (),
          "scalar": meta.value}[meta.kind]


def _region(job: _LeafJob, index: Index, dtype: np.dtype) -> np.ndarray:
  """The target region `index` of the leaf, from the saved shards read."""
  shape = tuple(b - a for a, b in index)
  for s in job.needed:
    if s.index == index:
      return s.view.view(dtype).reshape(shape)   # exact match: no copy
  out = np.empty(shape, dtype)
  for s in job.needed:
    o = _overlap(s.index, index)
    if o is None:
      continue
    src = s.view.view(dtype).reshape(tuple(b - a for a, b in s.index))
    src_sl = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(o, s.index))
    dst_sl = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(o, index))
    out[dst_sl] = src[src_sl]
  return out


def _build(job: _LeafJob) -> Any:
  meta = job.meta
  dtype = layout.dtype_from_name(meta.dtype)
  if job.sharding is None:
    arr = _region(job, tuple((0, n) for n in meta.shape), dtype)
    if meta.kind == "np_scalar":
      return arr.reshape(())[()]
    return arr
  per_index: dict[Index, np.ndarray] = {}
  for _, idx in job.device_indices:
    if idx not in per_index:
      per_index[idx] = _region(job, idx, dtype)
  # One device_put for all of the leaf's shards: ~3x less overhead than one each.
  arrays = jax.device_put([per_index[idx] for _, idx in job.device_indices],
                          [device for device, _ in job.device_indices])
  return jax.make_array_from_single_device_arrays(meta.shape, job.sharding, arrays)
