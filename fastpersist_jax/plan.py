"""The shard plan: which bytes this process writes, and where they go.

Turns a pytree into leaf metadata (for everyone) and the list of shards this
process owns, each assigned a 4 KiB-aligned offset in one of the process's
few large data files. Every leaf is checked here, before a byte is written.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from fastpersist_jax import layout, shardings, treepath
from fastpersist_jax.errors import UnsupportedLeafError


@dataclasses.dataclass
class ShardSource:
  """One shard this process writes: where its bytes come from and go to."""
  leaf: int
  index: tuple[tuple[int, int], ...]
  nbytes: int
  data: Any                 # single-device jax.Array, or np.ndarray
  file: int = 0
  offset: int = 0
  on_accelerator: bool = False   # data lives in device memory (needs a D2H copy)
  # Byte range of the shard written by this process when its replicas on
  # several processes share the writing (replica-parallel); None: all of it.
  part: tuple[int, int] | None = None


def resolve_snapshot_mode(mode: str, tree: Any) -> str:
  """"auto" -> "reference" when every jax.Array in `tree` is on CPU."""
  if mode != "auto":
    return mode
  for x in jax.tree_util.tree_leaves(tree):
    if isinstance(x, jax.Array) and next(iter(x.sharding.device_set)).platform != "cpu":
      return "copy"
  return "reference"


@dataclasses.dataclass
class SavePlan:
  leaves: list[layout.LeafMeta]
  shards: list[ShardSource]
  file_sizes: list[int]
  process_index: int
  process_count: int
  layout: str = "shared"
  replica_parallel: bool = False

  @property
  def total_bytes(self) -> int:
    return sum(s.nbytes for s in self.shards)

  @property
  def staged_bytes(self) -> int:
    """Bytes of data files, alignment padding included: what staging holds."""
    return sum(self.file_sizes)


def normalize_index(index: tuple, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  out = []
  for sl, n in zip(index, shape):
    start, stop, step = sl.indices(n)
    if step != 1:
      raise UnsupportedLeafError(f"strided shard index {index} is not supported")
    out.append((start, stop))
  return tuple(out)


def _check_dtype(dtype: np.dtype, where: str) -> None:
  if not layout.dtype_is_supported(np.dtype(dtype)):
    raise UnsupportedLeafError(f"{where}: dtype {dtype} cannot be checkpointed")


def _scalar_type(x: Any) -> str | None:
  # bool before int: bool is an int subclass.
  for t, name in ((bool, "bool"), (int, "int"), (float, "float"), (complex, "complex"), (str, "str")):
    if isinstance(x, t):
      return name
  return None


def make_plan(tree: Any, *, process_index: int, process_count: int,
              write_host_arrays: bool, data_file_bytes: int,
              snapshot: str = "copy", layout_mode: str = "shared",
              replica_parallel: bool = True) -> SavePlan:
  """Plans a save of `tree` by this process.

  Args:
    tree: the pytree to save.
    process_index, process_count: this process in the JAX runtime.
    write_host_arrays: whether this process writes numpy arrays and numpy
      scalars (which every process holds whole); the primary does.
    data_file_bytes: start a new data file once one would grow past this.
    snapshot: the resolved snapshot mode ("copy" or "reference"); with
      "reference", CPU shards are pinned as host views now and numpy leaves
      copied now (see FastPersistOptions.snapshot).
    layout_mode: "shared" (all processes write into one directory) or
      "per_host" (each process writes into its own directory).
    replica_parallel: split each shard replicated on several processes into
      byte ranges, one per process, so every process (and its disk) writes
      an equal part. Without it, "shared" writes each shard whole once and
      "per_host" writes on every host every shard its devices hold.
  """
  flat, _ = treepath.flatten(tree)
  leaves: list[layout.LeafMeta] = []
  shards: list[ShardSource] = []
  for leaf_id, (path, x) in enumerate(flat):
    where = f"leaf {treepath.to_str(path)!r}"
    try:
      encoded = treepath.encode(path)
    except TypeError as e:
      raise UnsupportedLeafError(f"{where}: {e}") from e
    if x is None:
      leaves.append(layout.LeafMeta(encoded, "none"))
    elif type(x) in (dict, list, tuple) and not x:
      leaves.append(layout.LeafMeta(encoded, {dict: "empty_dict", list: "empty_list",
                                              tuple: "empty_tuple"}[type(x)]))
    elif isinstance(x, jax.Array):
      _check_dtype(x.dtype, where)
      if x.is_deleted():
        raise UnsupportedLeafError(f"{where}: the jax.Array has been deleted (donated?)")
      shape = tuple(int(n) for n in x.shape)
      leaves.append(layout.LeafMeta(encoded, "array", dtype=np.dtype(x.dtype).name, shape=shape,
                                    sharding=shardings.encode(x.sharding)))
      itemsize = np.dtype(x.dtype).itemsize
      on_accelerator = next(iter(x.sharding.device_set)).platform != "cpu"
      per_device = _addressable_arrays(x)
      for position, index, part in _owned_shards(x, process_index, layout_mode, replica_parallel):
        nbytes = math.prod(b - a for a, b in index) * itemsize if part is None else part[1] - part[0]
        data = per_device[position]
        if snapshot == "reference" and not on_accelerator:
          data = np.asarray(data)  # the host view pins the buffer (see options)
        shards.append(ShardSource(leaf_id, index, nbytes, data, on_accelerator, part=part))
    elif isinstance(x, (np.ndarray, np.generic)):
      _check_dtype(x.dtype, where)
      kind = "numpy" if isinstance(x, np.ndarray) else "np_scalar"
      shape = tuple(int(n) for n in np.shape(x))
      leaves.append(layout.LeafMeta(encoded, kind, dtype=np.dtype(x.dtype).name, shape=shape))
      if write_host_arrays:
        arr = np.array(x, copy=True) if snapshot == "reference" else np.asarray(x)
        shards.append(ShardSource(leaf_id, tuple((0, n) for n in shape), arr.nbytes, arr))
    elif (st := _scalar_type(x)) is not None:
      leaves.append(layout.LeafMeta(encoded, "scalar", value=x, scalar_type=st))
    else:
      raise UnsupportedLeafError(
          f"{where}: values of type {type(x).__module__}.{type(x).__qualname__} cannot be "
          "checkpointed (supported: jax.Array, numpy arrays and scalars, Python "
          "bool/int/float/complex/str, None)")
  file_sizes = _assign_offsets(shards, data_file_bytes)
  if snapshot == "reference":
    for s in shards:  # referenced arrays must still be alive to be read later
      if isinstance(s.data, jax.Array) and s.data.is_deleted():
        raise UnsupportedLeafError(
            f"leaf {treepath.to_str(leaves[s.leaf].path)!r}: the jax.Array has been deleted")
  return SavePlan(leaves, shards, file_sizes, process_index, process_count, layout_mode,
                  replica_parallel)


# Which shards (or byte ranges of them) this process writes depends only on
# the sharding and shape, and a training step makes new arrays with the same
# shardings every time, so the answer is cached. Building Shard objects costs
# ~10 us each; jax keeps an array's addressable data in the sharding's device
# order, so a position found once stays valid for every array that shares it.
_OWNED_CACHE: dict = {}
_OWNED_CACHE_MAX = 16384

Owned = list[tuple[int, tuple[tuple[int, int], ...], tuple[int, int] | None]]


def split_bytes(nbytes: int, parts: int) -> list[tuple[int, int]]:
  """`parts` contiguous ranges covering [0, nbytes), boundaries 4 KiB-aligned."""
  step = layout.align_up(-(-nbytes // parts))
  return [(min(k * step, nbytes), min((k + 1) * step, nbytes)) for k in range(parts)]


def _owned_shards(x: jax.Array, me: int, layout_mode: str, replica_parallel: bool) -> Owned:
  """[(position among x's addressable shards, index, byte range or None)]."""
  key = (x.sharding, x.shape, x.dtype, me, layout_mode, replica_parallel)
  owned = _OWNED_CACHE.get(key)
  if owned is not None:
    return owned
  first_local: dict = {}   # index -> position of the first local device holding it
  for i, s in enumerate(x.addressable_shards):
    first_local.setdefault(normalize_index(s.index, x.shape), i)
  owned = []
  if layout_mode == "per_host" and not replica_parallel:
    # Each host keeps everything its own devices hold.
    owned = [(pos, index, None) for index, pos in first_local.items()]
  else:
    # Each shard once, split among the processes holding it. Per host, a
    # shard held by this host alone is written whole; one held by several is
    # split, and on restore the hosts swap their parts (exchange.py).
    holders: dict = {}     # index -> processes holding a replica
    for device, idx in x.sharding.devices_indices_map(x.shape).items():
      holders.setdefault(normalize_index(idx, x.shape), set()).add(device.process_index)
    itemsize = np.dtype(x.dtype).itemsize
    for index, pos in first_local.items():
      procs = sorted(holders[index])
      if not replica_parallel or len(procs) == 1:
        if procs[0] == me:
          owned.append((pos, index, None))
        continue
      nbytes = math.prod(b - a for a, b in index) * itemsize
      part = split_bytes(nbytes, len(procs))[procs.index(me)]
      if part[0] < part[1]:
        # Recorded as a part even when it is all of a small shard: the other
        # holders wrote nothing of it, and per-host restore swaps parts.
        owned.append((pos, index, part))
  if len(_OWNED_CACHE) >= _OWNED_CACHE_MAX:
    _OWNED_CACHE.clear()
  _OWNED_CACHE[key] = owned
  return owned


def _addressable_arrays(x: jax.Array) -> list:
  """The per-device arrays of x, in addressable-shard order.

  `jax.Array._arrays` is that list, read without building a Sharding per shard
  (addressable_data does, ~50 us each); public API where it is absent.
  """
  arrays = getattr(x, "_arrays", None)
  if isinstance(arrays, list) and len(arrays) == len(x.sharding.addressable_devices):
    return arrays
  return [x.addressable_data(i) for i in range(len(x.sharding.addressable_devices))]


def _assign_offsets(shards: list[ShardSource], data_file_bytes: int) -> list[int]:
  """Packs shards into data files at aligned offsets; returns file sizes."""
  sizes: list[int] = []
  for s in shards:
    if not sizes:
      sizes.append(0)
    offset = layout.align_up(sizes[-1])
    if offset + s.nbytes > data_file_bytes and sizes[-1] > 0:
      sizes.append(0)
      offset = 0
    s.file, s.offset = len(sizes) - 1, offset
    sizes[-1] = offset + s.nbytes
  return sizes
