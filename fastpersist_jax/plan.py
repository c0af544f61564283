"""The shard plan: which bytes this process writes, and where they go.

Turns a pytree into leaf metadata (for everyone) and the list of shards this
process owns, each assigned a 4 KiB-aligned offset in one of the process's
few large data files. Every leaf is checked here, before a byte is written.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass
class SavePlan:
  leaves: list[layout.LeafMeta]
  shards: list[ShardSource]
  file_sizes: list[int]
  process_index: int
  process_count: int

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
              write_host_arrays: bool, data_file_bytes: int) -> SavePlan:
  """Plans a save of `tree` by this process.

  Args:
    tree: the pytree to save.
    process_index, process_count: this process in the JAX runtime.
    write_host_arrays: whether this process writes numpy arrays and numpy
      scalars (which every process holds whole); the primary does.
    data_file_bytes: start a new data file once one would grow past this.
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
      for shard in x.addressable_shards:
        if shard.replica_id != 0:
          continue  # another device (maybe another process) writes this one
        index = normalize_index(shard.index, shape)
        nbytes = int(np.prod([b - a for a, b in index], dtype=np.int64)) * itemsize
        shards.append(ShardSource(leaf_id, index, nbytes, shard.data))
    elif isinstance(x, (np.ndarray, np.generic)):
      _check_dtype(x.dtype, where)
      kind = "numpy" if isinstance(x, np.ndarray) else "np_scalar"
      shape = tuple(int(n) for n in np.shape(x))
      leaves.append(layout.LeafMeta(encoded, kind, dtype=np.dtype(x.dtype).name, shape=shape))
      if write_host_arrays:
        arr = np.asarray(x)
        shards.append(ShardSource(leaf_id, tuple((0, n) for n in shape), arr.nbytes, arr))
    elif (st := _scalar_type(x)) is not None:
      leaves.append(layout.LeafMeta(encoded, "scalar", value=x, scalar_type=st))
    else:
      raise UnsupportedLeafError(
          f"{where}: values of type {type(x).__module__}.{type(x).__qualname__} cannot be "
          "checkpointed (supported: jax.Array, numpy arrays and scalars, Python "
          "bool/int/float/complex/str, None)")
  file_sizes = _assign_offsets(shards, data_file_bytes)
  return SavePlan(leaves, shards, file_sizes, process_index, process_count)


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
