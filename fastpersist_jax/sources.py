"""Where each planned shard's bytes are, for one save.

The plan (plan.py) says which shards this process writes; `bind` ties them
to one save's values, as the snapshot asks: each shard's single-device
jax.Array, a host view of a CPU one, a numpy leaf (copied when it might
change), or, by reference, its leaf's global jax.Array, looked up only when
staged. `ShardSources.take` then hands staging each shard's bytes, starting
the device-to-host transfers of accelerator shards a bounded distance ahead.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from fastpersist_jax import treepath
from fastpersist_jax.errors import SaveError, UnsupportedLeafError
from fastpersist_jax.options import FastPersistOptions
from fastpersist_jax.plan import SavePlan

# The snapshot a save takes (FastPersistOptions.snapshot, resolved):
#   "copy"       every owned shard is copied into staging while blocking;
#   "view"       host views of the CPU shards are taken while blocking (they
#                keep the runtime from donating or freeing the buffers) and
#                copied in the background: what "auto" means when every
#                jax.Array is on CPU ("copy" otherwise);
#   "reference"  nothing but references are taken while blocking.
SNAPSHOT_MODES = ("copy", "view", "reference")

# Device-to-host transfers run this many staging slabs ahead of the copy
# into the pool: deep enough that the copy never waits on the DMA (a 64 MiB
# slab is copied in ~5 ms, and 4 of them take ~10 ms over PCIe), small
# enough that a save's host memory stays the pool plus 256 MiB.
_D2H_LOOKAHEAD_SLABS = 4

_DELETED = ("the array was deleted (donated?) before its bytes were staged; with "
            "snapshot='reference', arrays must stay alive until the save finishes (use "
            "snapshot='copy' or 'auto' for arrays the training step donates)")


def resolve_snapshot(requested: str, plan: SavePlan) -> str:
  """The snapshot a save of `plan` takes: `requested` (an option value of
  FastPersistOptions.snapshot), with "auto" resolved to "copy" when any
  array is on an accelerator and "view" otherwise. Returns one of
  SNAPSHOT_MODES."""
  if requested == "auto":
    return "copy" if plan.any_on_accelerator else "view"
  return requested


def bind(plan: SavePlan, values: Sequence[Any], options: FastPersistOptions) -> ShardSources:
  """Binds one save's values to its plan.

  Args:
    plan: the save's plan (make_plan of the tree `values` come from).
    values: the tree's leaves in flattening order (CheckedTree.values).
    options: snapshot (what is taken now, see resolve_snapshot; numpy leaves
      are copied now unless the snapshot is "copy", which copies them into
      staging before returning anyway) and staging_slab_bytes (the unit of
      the device-to-host lookahead).
  Returns:
    The shards' sources.
  Raises:
    UnsupportedLeafError: a jax.Array leaf has been deleted (donated), named.
  """
  snapshot = resolve_snapshot(options.snapshot, plan)
  if plan.prng_leaves:
    values = list(values)
    for i in plan.prng_leaves:
      values[i] = jax.random.key_data(values[i])   # a view of the same buffers
  sources: list[Any] = []
  for leaf_id, kind, addressable_indices in plan.leaf_runs:
    x = values[leaf_id]
    if kind == "host":
      sources.append(_host_source(x, copy=snapshot != "copy"))
      continue
    if x.is_deleted():
      raise UnsupportedLeafError(f"leaf {treepath.to_str(plan.leaves[leaf_id].path)}: the "
                                 "jax.Array has been deleted (donated?)")
    if snapshot == "reference":
      sources.extend([x] * len(addressable_indices))
      continue
    per_device = addressable_arrays(x)
    if snapshot == "view" and leaf_id not in plan.accelerator_leaves:
      # The host view pins the buffer (see FastPersistOptions.snapshot).
      sources.extend([np.asarray(per_device[p]) for p in addressable_indices])
    else:
      sources.extend([per_device[p] for p in addressable_indices])
  return ShardSources(plan, sources, snapshot,
                      _D2H_LOOKAHEAD_SLABS * options.staging_slab_bytes)


def _host_source(x: Any, copy: bool) -> np.ndarray:
  """A numpy leaf's bytes as saved: in native byte order (the dtype's name,
  all the metadata records, means native bytes on disk), copied when the
  caller may change them before they are staged."""
  a = np.asarray(x)
  if not a.dtype.isnative:
    return a.astype(a.dtype.newbyteorder("="))
  return np.array(a, copy=True) if copy else a


def addressable_arrays(x: jax.Array) -> list:
  """The per-device arrays of x, in addressable-shard order.

  `jax.Array._arrays` is that list, read without building a Sharding per shard
  (addressable_data does, ~50 us each); public API where it is absent.
  """
  arrays = getattr(x, "_arrays", None)
  if isinstance(arrays, list) and len(arrays) == len(x.sharding.addressable_devices):
    return arrays
  return [x.addressable_data(i) for i in range(len(x.sharding.addressable_devices))]


def host_bytes(data: Any) -> np.ndarray:
  """The bytes of `data` (an array) as a flat uint8 array, a view where
  possible. Raises SaveError when it is a deleted jax.Array."""
  try:
    arr = np.asarray(data)
  except Exception:  # pylint: disable=broad-except  (a deleted array, or a real failure)
    if isinstance(data, jax.Array) and data.is_deleted():
      raise SaveError(_DELETED) from None
    raise
  if not arr.flags.c_contiguous:
    arr = np.ascontiguousarray(arr)
  return arr.reshape(-1).view(np.uint8)


class ShardSources:
  """Where each of a plan's shards is, for one save (made by bind).

  Shards are taken in plan order, each once (take), and dropped once their
  bytes are staged (drop), so nothing stays pinned by the save.

  Attributes:
    plan: the plan bound.
    snapshot: the snapshot taken, one of SNAPSHOT_MODES.
  """

  def __init__(self, plan: SavePlan, sources: list[Any], snapshot: str, lookahead_bytes: int):
    """Args: plan; sources[i]: shard i's single-device jax.Array or numpy
    array, or with snapshot "reference" its leaf's global jax.Array;
    snapshot: one of SNAPSHOT_MODES; lookahead_bytes: how many bytes of
    device-to-host transfers may be in flight ahead of take()."""
    self.plan = plan
    self.snapshot = snapshot
    self._sources = sources
    self._resolve = _Resolver(self)
    self._transfers = _Transfers(self, lookahead_bytes)

  @property
  def held(self) -> int:
    """How many shards' sources are still referenced (0 once all are
    staged, or the save has failed)."""
    return sum(s is not None for s in self._sources)

  def take(self, shard_id: int) -> np.ndarray:
    """The bytes of plan.shards[shard_id] this process writes (its part, or
    all of it), as a flat uint8 array (a view of the source where possible).
    Starts device-to-host transfers of the next accelerator shards, up to
    the lookahead. Raises SaveError naming the leaf when the array has been
    deleted since it was bound."""
    shard = self.plan.shards[shard_id]
    try:
      src = host_bytes(self._transfers.take(shard_id) if shard.on_accelerator
                       else self._resolve(shard_id))
    except SaveError as e:
      path = treepath.to_str(self.plan.leaves[shard.leaf].path)
      raise SaveError(f"leaf {path}: {e}") from None
    if shard.part is not None:
      src = src[shard.part[0]:shard.part[1]]
    return src

  def drop(self, shard_id: int) -> None:
    """Forgets shard `shard_id`'s source (its bytes are staged)."""
    self._sources[shard_id] = None

  def drop_all(self) -> None:
    """Forgets every source (the save failed)."""
    for i in range(len(self._sources)):
      self._sources[i] = None

  def source(self, shard_id: int) -> Any:
    """Shard `shard_id`'s source as bound: its single-device array (or numpy
    array), or, by reference, its leaf's global array; None once dropped."""
    return self._sources[shard_id]


class _Resolver:
  """Shard i's single-device array (or numpy array). A shard bound by
  reference is its leaf's global array; the per-device list is looked up
  once per leaf (shards of a leaf are consecutive in a plan)."""

  def __init__(self, sources: ShardSources):
    self._sources = sources
    self._leaf = -1
    self._arrays: list = []

  def __call__(self, i: int) -> Any:
    source = self._sources.source(i)
    if self._sources.snapshot != "reference" or not isinstance(source, jax.Array):
      return source
    shard = self._sources.plan.shards[i]
    if self._leaf != shard.leaf:
      if source.is_deleted():
        raise SaveError(_DELETED)
      self._arrays, self._leaf = addressable_arrays(source), shard.leaf
    return self._arrays[shard.addressable_index]


class _Transfers:
  """Device-to-host copies of accelerator shards, started ahead of the copy
  into staging: into pinned host memory (memory kind "pinned_host", so the
  DMA needs no bounce), falling back to jax's own host copy. At most
  `lookahead_bytes` are in flight, so the extra host memory a save uses stays
  the pool plus that much instead of growing to the checkpoint's size."""

  def __init__(self, sources: ShardSources, lookahead_bytes: int):
    self._shards = sources.plan.shards
    self._resolve = _Resolver(sources)
    self._lookahead = lookahead_bytes
    self._next = 0          # first shard whose transfer is not started
    self._in_flight = 0     # bytes started and not yet consumed
    self._started: dict[int, Any] = {}

  def take(self, consumed: int) -> Any:
    """Shard `consumed`'s host copy (in progress); starts transfers up to
    the lookahead."""
    while self._next < len(self._shards) and (
        self._next <= consumed or self._in_flight < self._lookahead):
      s = self._shards[self._next]
      if s.on_accelerator and s.nbytes:
        try:
          self._started[self._next] = _start_device_to_host(self._resolve(self._next))
        except SaveError:
          if self._next == consumed:
            raise
          break   # raised for the shard it concerns, when that one is taken
        self._in_flight += s.nbytes
      self._next += 1
    self._in_flight -= self._shards[consumed].nbytes
    return self._started.pop(consumed)


def _start_device_to_host(x):
  try:
    return jax.device_put(x, x.sharding.with_memory_kind("pinned_host"))
  except Exception:  # pylint: disable=broad-except  (backend without pinned_host)
    try:
      x.copy_to_host_async()
    except Exception:  # pylint: disable=broad-except  (np.asarray will copy anyway)
      pass
    return x
