"""Host-only reading of a checkpoint item: saved bytes into numpy arrays.

For tools (verify, export) that need a checkpoint's values without the
devices it was saved on: no jax device is touched. Every manifest present is
read and validated (disk_format.read_manifest), the parts of each saved shard
(replica-parallel writes, possibly from several processes' manifests) are
put in byte order, each part's CRC-32C is checked, and a leaf's saved shards
are assembled into one C-order numpy array of its global shape.

Memory: reading one leaf holds that leaf's array plus, for shards that are
not one contiguous range of it, a scratch buffer of at most
max(SCRATCH_BYTES, the largest such shard).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterator

import crc32c
import numpy as np
from jax import tree_util

from fastpersist_jax import disk_format, restore_plan
# plain_value (exported here too) is disk_format's, the one definition.
from fastpersist_jax.disk_format import ARRAY_KINDS, Index, plain_value
from fastpersist_jax.errors import (CheckpointNotFoundError, ChecksumMismatchError,
                                    CorruptCheckpointError)
from fastpersist_jax.io_engine import AlignedBuffer, IOEngine
from fastpersist_jax.options import FastPersistOptions

SCRATCH_BYTES = 64 << 20


def keystr(path: list) -> str:
  """A decoded key path (treepath.encode form) as jax.tree_util.keystr prints
  it, e.g. "['params']['w']" or "[0].kernel"."""
  keys = []
  for kind, key in path:
    if kind == "d":
      keys.append(tree_util.DictKey(key))
    elif kind == "s":
      keys.append(tree_util.SequenceKey(key))
    elif kind == "a":
      keys.append(tree_util.GetAttrKey(key))
    else:
      keys.append(tree_util.FlattenedIndexKey(key))
  return tree_util.keystr(tuple(keys)) or "<root>"


@dataclasses.dataclass
class SavedShard:
  """One saved shard of a leaf: its global index and the records holding its
  C-order bytes, as (process, record) in byte order (one record unless the
  shard was split among replicas)."""
  leaf: int
  index: Index
  nbytes: int
  parts: list[tuple[int, disk_format.ShardRecord]]
  missing: str | None = None   # why some of its bytes are not in this directory


def _volume(index: Index) -> int:
  return math.prod(b - a for a, b in index)


def _contiguous_start(index: Index, shape: tuple[int, ...]) -> int | None:
  """Element offset of a shard in the C-order global array when its block is
  one contiguous range of it (a slab along the leading dimensions), else None."""
  k = 0
  while k < len(index) and index[k][1] - index[k][0] == 1:
    k += 1
  if any(index[d] != (0, shape[d]) for d in range(k + 1, len(index))):
    return None
  start = 0
  for (a, _), n in zip(index, shape):
    start = start * n + a
  return start


class CheckpointReader:
  """Reads one checkpoint item directory (holding fastpersist.json) on the
  host. Use as a context manager, or call close()."""

  def __init__(self, directory: str | os.PathLike, engine: IOEngine | None = None,
               manifests: bool = True):
    """Reads and validates the metadata and (with `manifests`) every manifest
    present. Raises CheckpointNotFoundError (no checkpoint there) or
    CorruptCheckpointError (a file fails validation)."""
    self.directory = os.fspath(directory)
    self.meta = disk_format.read_metadata(self.directory)
    self._engine = engine
    self._files: dict[tuple[int, int], Any] = {}
    self.manifests: dict[int, disk_format.Manifest] = {}
    self._shards: dict[int, list[SavedShard]] | None = None
    if manifests:
      for p in self.present_processes():
        self.manifests[p] = disk_format.read_manifest(self.directory, p, self.meta)
      if not self.manifests:
        raise CorruptCheckpointError(f"{self.directory}: no manifest of any process")

  def present_processes(self) -> list[int]:
    """Processes whose manifest is expected here: all of them in a shared
    checkpoint (a missing one is an error when read), those present in a
    per-host one."""
    procs = range(self.meta.process_count)
    if self.meta.placement != "per_host":
      return list(procs)
    return [p for p in procs
            if os.path.exists(os.path.join(self.directory, disk_format.manifest_name(p)))]

  @property
  def complete(self) -> bool:
    """Whether every process's manifest is here (per-host checkpoints hold
    only some)."""
    return len(self.manifests) == self.meta.process_count

  def __enter__(self) -> CheckpointReader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Closes the data files opened so far."""
    for f in self._files.values():
      f.close()
    self._files.clear()

  # Shards -------------------------------------------------------------------

  def leaf_name(self, leaf_id: int) -> str:
    """The leaf's path as jax.tree_util.keystr prints it."""
    return keystr(self.meta.leaves[leaf_id].path)

  def describe(self, process: int, rec: disk_format.ShardRecord) -> str:
    """Where one record is: leaf, shard index, part, file and offset."""
    part = f" bytes {list(rec.part)}" if rec.part is not None else ""
    name = self.manifests[process].files[rec.file][0]
    return (f"leaf {self.leaf_name(rec.leaf)}, shard {list(map(list, rec.index))}{part} "
            f"(process {process}, {name} @ {rec.offset})")

  def shards(self, leaf_id: int) -> list[SavedShard]:
    """The saved shards of a leaf, their parts in byte order. Raises
    CorruptCheckpointError if parts overlap or saved shards overlap."""
    if self._shards is None:
      self._shards = self._group_shards()
    return self._shards.get(leaf_id, [])

  def _group_shards(self) -> dict[int, list[SavedShard]]:
    records: dict[tuple[int, Index], list[tuple[int, disk_format.ShardRecord]]] = {}
    for p, m in self.manifests.items():
      for rec in m.shards:
        records.setdefault((rec.leaf, rec.index), []).append((p, rec))
    out: dict[int, list[SavedShard]] = {}
    for (leaf_id, index), recs in records.items():
      itemsize = disk_format.dtype_from_name(self.meta.leaves[leaf_id].dtype).itemsize
      out.setdefault(leaf_id, []).append(
          self._order_parts(leaf_id, index, _volume(index) * itemsize, recs))
    for leaf_id, group in out.items():
      disk_format.check_grid([s.index for s in group],
                        f"{self.directory}: leaf {self.leaf_name(leaf_id)}: saved shards")
    return out

  def _order_parts(self, leaf_id: int, index: Index, nbytes: int,
                   recs: list[tuple[int, disk_format.ShardRecord]]) -> SavedShard:
    """Parts must tile the shard's bytes; the same part twice (per-host
    directories gathered in one) is kept once (restore_plan.assemble_parts)."""
    shard = restore_plan.assemble_parts(self.leaf_name(leaf_id), index, nbytes, recs)
    return SavedShard(leaf_id, index, nbytes, shard.parts, shard.missing)

  def coverage_error(self, leaf_id: int) -> str | None:
    """Why the saved shards here do not hold every element of an array leaf
    (a missing part or shard), or None when they do."""
    meta = self.meta.leaves[leaf_id]
    if meta.kind not in ARRAY_KINDS:
      return None
    shards = self.shards(leaf_id)
    for s in shards:
      if s.missing:
        return s.missing
    covered = sum(_volume(s.index) for s in shards)   # no overlaps: check_grid
    total = math.prod(meta.shape)
    if covered != total:
      return (f"leaf {self.leaf_name(leaf_id)}: the shards in {self.directory} hold {covered} "
              f"of its {total} elements")
    return None

  # Reading ------------------------------------------------------------------

  def engine(self) -> IOEngine:
    """The I/O engine reads go through (created on first use)."""
    if self._engine is None:
      self._engine = IOEngine(FastPersistOptions())
    return self._engine

  def file(self, process: int, file_id: int):
    """The opened data file `file_id` of `process`'s manifest (cached)."""
    key = (process, file_id)
    if key not in self._files:
      name = self.manifests[process].files[file_id][0]
      path = os.path.join(self.directory, name)
      try:
        self._files[key] = self.engine().open_for_read(path)
      except (OSError, RuntimeError) as e:
        raise CorruptCheckpointError(f"{path} cannot be opened: {e}") from e
    return self._files[key]

  def _read(self, extents: list) -> None:
    try:
      self.engine().read(extents)
    except (OSError, RuntimeError) as e:
      raise CorruptCheckpointError(f"{self.directory}: a data file cannot be read: {e}") from e

  def _check(self, process: int, rec: disk_format.ShardRecord, data: np.ndarray) -> None:
    if crc32c.crc32c(data) != rec.crc32c:
      raise ChecksumMismatchError(
          f"{self.directory}: {self.describe(process, rec)}: checksum mismatch, the data "
          "is corrupt")

  def read_leaf(self, leaf_id: int) -> Any:
    """The value of one leaf: a C-order numpy array of its global shape and
    saved dtype for array leaves (a numpy scalar for np_scalar leaves), the
    value itself for the others. Every part read is checked against its
    CRC-32C. Raises ChecksumMismatchError (damaged data), or
    CorruptCheckpointError (missing shards or parts, unreadable files)."""
    meta = self.meta.leaves[leaf_id]
    if meta.kind not in ARRAY_KINDS:
      return plain_value(meta)
    why = self.coverage_error(leaf_id)
    if why:
      raise CorruptCheckpointError(why)
    dtype = disk_format.dtype_from_name(meta.dtype)
    total = math.prod(meta.shape) * dtype.itemsize
    if total == 0:
      out = np.empty(meta.shape, dtype)
      return out.reshape(())[()] if meta.kind == "np_scalar" else out
    flat = np.frombuffer(AlignedBuffer(total), np.uint8)
    # Shards that are one contiguous byte range of the array are read in
    # place; the others go through a scratch buffer and are copied.
    direct, other = [], []
    for s in self.shards(leaf_id):
      start = _contiguous_start(s.index, meta.shape)
      (other if start is None else direct).append((s, start))
    extents, checks = [], []
    for s, start in direct:
      at = start * dtype.itemsize
      for p, rec in s.parts:
        lo = at + (rec.part[0] if rec.part else 0)
        view = flat[lo:lo + rec.nbytes]
        extents.append((self.file(p, rec.file), rec.offset, view))
        checks.append((p, rec, view))
    self._read(extents)
    for p, rec, view in checks:
      self._check(p, rec, view)
    out = flat.view(dtype).reshape(meta.shape)
    for group in _groups([s for s, _ in other], SCRATCH_BYTES):
      size = sum(disk_format.align_up(s.nbytes) for s in group)
      scratch = np.frombuffer(AlignedBuffer(size), np.uint8)
      extents, checks, blocks, at = [], [], [], 0
      for s in group:
        blocks.append((s, scratch[at:at + s.nbytes]))
        for p, rec in s.parts:
          lo = at + (rec.part[0] if rec.part else 0)
          view = scratch[lo:lo + rec.nbytes]
          extents.append((self.file(p, rec.file), rec.offset, view))
          checks.append((p, rec, view))
        at += disk_format.align_up(s.nbytes)
      self._read(extents)
      for p, rec, view in checks:
        self._check(p, rec, view)
      for s, block in blocks:
        shape = tuple(b - a for a, b in s.index)
        out[tuple(slice(a, b) for a, b in s.index)] = block.view(dtype).reshape(shape)
      del scratch, blocks, checks
    return out.reshape(())[()] if meta.kind == "np_scalar" else out

  def iter_leaves(self) -> Iterator[tuple[int, disk_format.LeafMeta, Any]]:
    """(leaf id, metadata, value) of every leaf, one leaf read at a time."""
    for i, meta in enumerate(self.meta.leaves):
      yield i, meta, self.read_leaf(i)


def _groups(shards: list[SavedShard], limit: int) -> Iterator[list[SavedShard]]:
  """Consecutive groups of shards of at most `limit` bytes (a larger shard
  is a group of its own)."""
  group, size = [], 0
  for s in shards:
    n = disk_format.align_up(s.nbytes)
    if group and size + n > limit:
      yield group
      group, size = [], 0
    group.append(s)
    size += n
  if group:
    yield group


def item_directories(path: str | os.PathLike) -> list[str]:
  """The checkpoint item directories at `path`: [path] itself when it holds
  fastpersist.json (an item), else its subdirectories that do (an Orbax
  step directory: <step>/<item>/), sorted by name. Raises
  CheckpointNotFoundError when there is neither."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointNotFoundError(f"no directory at {path}")
  if os.path.exists(os.path.join(path, disk_format.METADATA_FILE)):
    return [path]
  items = sorted(os.path.join(path, n) for n in os.listdir(path)
                 if os.path.isfile(os.path.join(path, n, disk_format.METADATA_FILE)))
  if not items:
    raise CheckpointNotFoundError(
        f"{path} is not a fastpersist checkpoint: neither it nor any subdirectory holds "
        f"{disk_format.METADATA_FILE}")
  return items


__all__ = ["CheckpointReader", "SavedShard", "item_directories", "keystr",
           "plain_value"]
