"""Restore: read exactly the saved shards each target shard needs, verify
their checksums, and build arrays on the target's devices.

Same sharding as saved: each process reads its own shards, one read each,
straight into aligned memory that becomes the array's host copy. Any other
sharding, mesh or device count: each target shard is assembled from the
saved shards that overlap it. Reads are batched (restore_batch_bytes) so the
engine keeps a deep queue across many leaves.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import crc32c
import jax
import numpy as np

from fastpersist_jax import layout, shardings, treepath
from fastpersist_jax.errors import (ChecksumMismatchError, CorruptCheckpointError,
                                    RestoreMismatchError)
from fastpersist_jax.io_engine import AlignedBuffer, IOEngine
from fastpersist_jax.options import FastPersistOptions
from fastpersist_jax.plan import normalize_index

logger = logging.getLogger(__name__)

Index = tuple[tuple[int, int], ...]


@dataclasses.dataclass
class _SavedShard:
  process: int
  record: layout.ShardRecord
  view: np.ndarray | None = None    # bytes once read


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

  def __init__(self, engine: IOEngine, options: FastPersistOptions, directory: str):
    self._engine = engine
    self._options = options
    self._directory = directory
    self.meta = layout.read_metadata(directory)
    self._manifests: list[layout.Manifest] | None = None

  @property
  def manifests(self) -> list[layout.Manifest]:
    if self._manifests is None:
      self._manifests = [layout.read_manifest(self._directory, p, self.meta)
                         for p in range(self.meta.process_count)]
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
    if any(leaves[i].kind in ("array", "numpy", "np_scalar") for i, _ in selected):
      for m in self.manifests:
        for rec in m.shards:
          shards_by_leaf.setdefault(rec.leaf, []).append(_SavedShard(m.process_index, rec))

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
              if any(_overlap(s.record.index, idx) is not None for _, idx in device_indices)]
    # Every target region must be covered by saved data.
    for _, idx in device_indices:
      covered = sum(_volume(o) for s in needed if (o := _overlap(s.record.index, idx)) is not None)
      if covered != _volume(idx):
        raise CorruptCheckpointError(
            f"leaf {name!r}: the checkpoint holds {covered} of the {_volume(idx)} elements of "
            f"region {list(map(list, idx))} (a process's data is missing?)")
    return _LeafJob(leaf_id, meta, sharding, device_indices, needed)

  # Reading ------------------------------------------------------------------

  def _read_and_build(self, jobs: list[tuple[int, _LeafJob]], values: list[Any]) -> None:
    files: dict[tuple[int, int], Any] = {}
    try:
      batch: list[tuple[int, _LeafJob]] = []
      batch_bytes = 0
      for pos, job in jobs:
        nbytes = sum(layout.align_up(s.record.nbytes) for s in job.needed)
        if batch and batch_bytes + nbytes > self._options.restore_batch_bytes:
          self._read_batch(batch, files, values)
          batch, batch_bytes = [], 0
        batch.append((pos, job))
        batch_bytes += nbytes
      if batch:
        self._read_batch(batch, files, values)
    finally:
      for f in files.values():
        f.close()

  def _file(self, files, process: int, file_id: int):
    key = (process, file_id)
    if key not in files:
      name = self.manifests[process].files[file_id][0]
      files[key] = self._engine.open_for_read(os.path.join(self._directory, name))
    return files[key]

  def _read_batch(self, batch, files, values) -> None:
    shards = [s for _, job in batch for s in job.needed]
    total = sum(layout.align_up(s.record.nbytes) for s in shards)
    buf = AlignedBuffer(total)
    whole = np.frombuffer(buf, np.uint8)
    extents = []
    at = 0
    for s in shards:
      s.view = whole[at:at + s.record.nbytes]
      if s.record.nbytes:
        extents.append((self._file(files, s.process, s.record.file), s.record.offset, s.view))
      at += layout.align_up(s.record.nbytes)
    self._engine.read(extents)
    for pos, job in batch:
      name = treepath.to_str(job.meta.path)
      if self._options.verify_checksums:
        for s in job.needed:
          if crc32c.crc32c(s.view) != s.record.crc32c:
            raise ChecksumMismatchError(
                f"leaf {name!r}, shard {list(map(list, s.record.index))} (process {s.process}, "
                f"{self.manifests[s.process].files[s.record.file][0]} @ {s.record.offset}): "
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
    if s.record.index == index:
      return s.view.view(dtype).reshape(shape)   # exact match: no copy
  out = np.empty(shape, dtype)
  for s in job.needed:
    o = _overlap(s.record.index, index)
    if o is None:
      continue
    src = s.view.view(dtype).reshape(tuple(b - a for a, b in s.record.index))
    src_sl = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(o, s.record.index))
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
  arrays = []
  for device, idx in job.device_indices:
    if idx not in per_index:
      per_index[idx] = _region(job, idx, dtype)
    arrays.append(jax.device_put(per_index[idx], device))
  return jax.make_array_from_single_device_arrays(meta.shape, job.sharding, arrays)
