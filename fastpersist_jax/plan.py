"""The save plan: which bytes this process writes, and where they go.

Pure geometry of a tree: from its structure, key paths, shardings, shapes and
dtypes alone, the leaves' metadata and the shards (or byte ranges of them)
this process owns, each at a 4 KiB-aligned offset in one of the process's few
large data files. Every leaf is checked here, before a byte is written. A
plan holds no reference to the arrays, so the plan of a tree is made once
and reused by every later save of trees like it; sources.py binds a save's
values to it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from fastpersist_jax import disk_format, redundancy, shardings, treepath
from fastpersist_jax.disk_format import Index
from fastpersist_jax.errors import UnsupportedLeafError
from fastpersist_jax.options import FastPersistOptions

# A shard's place in its global array: [start, stop) per dimension.


@dataclasses.dataclass(frozen=True)
class PlannedShard:
  """One shard this process writes: which bytes, and where they go."""
  leaf: int
  index: Index
  nbytes: int
  file: int = 0
  offset: int = 0
  on_accelerator: bool = False   # the data lives in device memory (needs a D2H copy)
  # Byte range of the shard written by this process when its replicas on
  # several processes share the writing (replica-parallel); None: all of it.
  part: tuple[int, int] | None = None
  addressable_index: int = 0  # among the leaf's addressable_arrays()


@dataclasses.dataclass(frozen=True)
class SavePlan:
  """What this process writes of a tree, and where: shared by every save of
  trees with the same structure, key types, shardings, shapes and dtypes
  (make_plan caches it), so it is immutable and holds no array.

  Attributes:
    leaves: every leaf's metadata, in flattening order; Python scalars'
      values are left out (leaf_metadata fills them in for one save).
    shards: the shards (or parts of them) this process writes, in file
      order: grouped by leaf, in leaf order.
    file_sizes: bytes of each of this process's data files (each ends with
      its last shard's last byte).
    process_index, process_count: the process this plan is for, of how many.
    placement: "shared" (one directory) or "per_host" (each process its own).
    replica_parallel: replicated shards are split among their holders.
    leaf_runs: the shards as runs of one leaf each, in shard order:
      (leaf, "array" or "host", the run's addressable indices); "host" is a
      numpy leaf (one shard, all of it).
    scalar_leaves: leaves that are Python scalars.
    prng_leaves: typed PRNG key leaves (saved as their key data).
    accelerator_leaves: jax.Array leaves in accelerator (non-CPU) memory.
  """
  leaves: tuple[disk_format.LeafMeta, ...]
  shards: tuple[PlannedShard, ...]
  file_sizes: tuple[int, ...]
  process_index: int
  process_count: int
  placement: str
  replica_parallel: bool
  leaf_runs: tuple[tuple[int, str, tuple[int, ...]], ...] = ()
  scalar_leaves: tuple[int, ...] = ()
  prng_leaves: tuple[int, ...] = ()
  accelerator_leaves: frozenset[int] = frozenset()

  @property
  def any_on_accelerator(self) -> bool:
    """Whether any jax.Array leaf is in accelerator memory."""
    return bool(self.accelerator_leaves)

  @functools.cached_property
  def total_bytes(self) -> int:
    """Bytes of shard data this process writes (padding excluded)."""
    return sum(s.nbytes for s in self.shards)

  @functools.cached_property
  def staged_bytes(self) -> int:
    """Bytes of data files, alignment padding included: what staging holds."""
    return sum(self.file_sizes)

  def leaf_metadata(self, values: Sequence[Any]) -> list[disk_format.LeafMeta]:
    """The leaves' metadata for one save.

    Args:
      values: the save's leaves in flattening order (CheckedTree.values) of a
        tree this plan is for.
    Returns:
      `leaves` with each Python scalar's value filled in (a new list; the
      plan is not changed).
    """
    leaves = list(self.leaves)
    for i in self.scalar_leaves:
      leaves[i] = dataclasses.replace(leaves[i], value=values[i])
    return leaves


def normalize_index(index: tuple, shape: tuple[int, ...]) -> Index:
  """A shard index of slices as [start, stop) per dimension.

  Raises UnsupportedLeafError for a strided slice."""
  out = []
  for sl, n in zip(index, shape):
    start, stop, step = sl.indices(n)
    if step != 1:
      raise UnsupportedLeafError(f"strided shard index {index} is not supported")
    out.append((start, stop))
  return tuple(out)


def _check_dtype(dtype: Any, where: str) -> None:
  try:
    supported = disk_format.dtype_is_supported(np.dtype(dtype))
  except TypeError:   # extended dtypes other than PRNG keys
    supported = False
  if not supported:
    raise UnsupportedLeafError(f"{where}: dtype {dtype} cannot be checkpointed")


# Python ints are written into the metadata as JSON numbers; Python refuses to
# print ints of more than 4,300 digits (sys.get_int_max_str_digits).
_MAX_SCALAR_INT_BITS = 13_000


def is_prng_key(x: Any) -> bool:
  """A typed PRNG key array (jax.random.key), saved as its key data."""
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _scalar_type(x: Any) -> str | None:
  # bool before int: bool is an int subclass.
  for t, name in ((bool, "bool"), (int, "int"), (float, "float"), (complex, "complex"), (str, "str")):
    if isinstance(x, t):
      return name
  return None


def make_plan(tree: Any, options: FastPersistOptions, *, process_index: int, process_count: int,
              write_host_arrays: bool, placement: str) -> SavePlan:
  """Plans a save of `tree` by this process (or returns the cached plan of a
  tree like it).

  Args:
    tree: the pytree to save, or its CheckedTree (check_tree).
    options: the handler's options; the plan depends on data_file_bytes
      (a new data file is started once one would grow past it),
      replica_parallel (split each shard replicated on several processes
      into byte ranges, one per holder; without it, "shared" writes each
      shard whole once and "per_host" writes on every host every shard its
      devices hold) and host_redundancy (with "per_host" and
      replica_parallel: how many hosts write each part, redundancy.py).
    process_index, process_count: this process in the JAX runtime.
    write_host_arrays: whether this process writes numpy arrays and numpy
      scalars (which every process holds whole); the primary does.
    placement: "shared" (all processes write into one directory) or
      "per_host" (each process writes into its own directory).
  Returns:
    The plan, shared with every save of trees with the same structure, key
    types, shardings, shapes and dtypes and the same arguments.
  Raises:
    UnsupportedLeafError: a leaf that cannot be saved, named.
  """
  checked = tree if isinstance(tree, CheckedTree) else check_tree(tree)
  key = plan_key(checked, options, process_index=process_index, process_count=process_count,
                 write_host_arrays=write_host_arrays, placement=placement)
  if key is not None:
    try:
      with _PLAN_CACHE_LOCK:
        plan = _PLAN_CACHE.get(key)
    except Exception:  # pylint: disable=broad-except  (node data that cannot be compared)
      plan, key = None, None
    if plan is not None:
      return plan
  plan = _build_plan(checked.flat, process_index, process_count, write_host_arrays,
                     options.data_file_bytes, placement, options.replica_parallel,
                     options.host_redundancy)
  if key is not None:
    with _PLAN_CACHE_LOCK:
      if len(_PLAN_CACHE) >= _PLAN_CACHE_MAX:
        _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
      _PLAN_CACHE[key] = plan
  return plan


def plan_key(checked: CheckedTree, options: FastPersistOptions, *, process_index: int,
             process_count: int, write_host_arrays: bool, placement: str) -> tuple | None:
  """What a plan depends on, the key it is cached under: the tree's
  signature (structure, key types, shardings, shapes, dtypes), this
  process, and the options that shape the plan. None when the tree cannot
  be hashed (such a plan is not cached)."""
  if checked.signature is None:
    return None
  return checked.signature + (process_index, process_count, write_host_arrays, placement,
                              options.data_file_bytes, options.replica_parallel,
                              options.host_redundancy)


# A training loop saves trees of the same structure, shardings, shapes and
# dtypes again and again, so their plan is made once: planning 2,000 shards
# from scratch takes ~10 ms of the blocking time, and the thousands of
# objects it makes trigger full garbage collections.
_PLAN_CACHE: dict = {}
_PLAN_CACHE_MAX = 8
_PLAN_CACHE_LOCK = threading.Lock()


def _signature(x: Any) -> Any:
  """What the plan of a leaf depends on (besides its key path)."""
  if isinstance(x, jax.Array):
    return (type(x), x.sharding, x.shape, x.dtype)
  if isinstance(x, np.ndarray):
    return (type(x), x.shape, x.dtype)
  if isinstance(x, np.generic):
    return (type(x), x.dtype)
  return type(x)


@dataclasses.dataclass(frozen=True)
class CheckedTree:
  """A pytree flattened and checked (check_tree), with the signature its
  plan is cached under (None: node data that cannot be hashed)."""
  flat: list
  treedef: Any
  signature: tuple | None

  @functools.cached_property
  def values(self) -> list:
    """The leaves, in flattening order."""
    return [x for _, x in self.flat]


def check_tree(tree: Any) -> CheckedTree:
  """Flattens `tree` and raises UnsupportedLeafError, naming the leaf, for
  anything a save would refuse (leaf types, dtypes, key types and names,
  sizes of Python ints). FastPersistSave runs it when it is made, before
  Orbax starts a save: a handler failing inside Orbax's save leaves Orbax's
  signalling thread waiting for minutes (the process cannot exit). A tree of
  a structure, key types, shardings, shapes and dtypes already checked is
  only flattened (the same work make_plan would do; it reuses the result)."""
  flat, treedef = treepath.flatten(tree)
  # Dict keys 1, True and 1.0 make equal treedefs; only some of them can be
  # saved, so their types are part of the signature.
  key_types = tuple(type(k.key) for path, _ in flat for k in path
                    if isinstance(k, jax.tree_util.DictKey))
  signature = (treedef, key_types, tuple(_signature(x) for _, x in flat))
  try:
    with _PLAN_CACHE_LOCK:
      known = signature in _CHECKED
  except Exception:  # pylint: disable=broad-except  (pytree node data that cannot be hashed or compared)
    signature, known = None, False
  if not known:
    _check_leaves(flat)
    if signature is not None:
      with _PLAN_CACHE_LOCK:
        if len(_CHECKED) >= _PLAN_CACHE_MAX:
          _CHECKED.pop(next(iter(_CHECKED)))
        _CHECKED[signature] = True
  return CheckedTree(flat, treedef, signature)


_CHECKED: dict = {}


def _check_leaves(flat: list[tuple[tuple, Any]]) -> None:
  for path, x in flat:
    where = f"leaf {treepath.to_str(path)}"
    try:
      treepath.encode(path)
    except TypeError as e:
      raise UnsupportedLeafError(f"{where}: {e}") from e
    if treepath.is_empty_node(x):
      continue
    if isinstance(x, jax.Array):
      if is_prng_key(x):
        impl = str(jax.random.key_impl(x))
        if impl not in disk_format.PRNG_IMPLS:
          raise UnsupportedLeafError(f"{where}: PRNG key implementation {impl!r} cannot be "
                                     f"checkpointed (supported: {', '.join(disk_format.PRNG_IMPLS)})")
      else:
        _check_dtype(x.dtype, where)
    elif isinstance(x, (np.ndarray, np.generic)):
      _check_dtype(x.dtype, where)
    elif (st := _scalar_type(x)) is not None:
      _check_scalar(x, st, where)
    else:
      _unsupported_type(x, where)
  _check_names_distinct(flat)


def _check_scalar(x: Any, st: str, where: str) -> None:
  if st == "int" and x.bit_length() > _MAX_SCALAR_INT_BITS:
    raise UnsupportedLeafError(f"{where}: a Python int of {x.bit_length()} bits cannot be "
                               "checkpointed (save it as a string or in an array)")


def _unsupported_type(x: Any, where: str) -> None:
  raise UnsupportedLeafError(
      f"{where}: values of type {type(x).__module__}.{type(x).__qualname__} cannot be "
      "checkpointed (supported: jax.Array, numpy arrays and scalars, Python "
      "bool/int/float/complex/str, None)")


def _sharding_record(sharding: jax.sharding.Sharding, known: dict) -> dict:
  """shardings.encode(sharding), the same record for equal shardings."""
  try:
    record = known.get(sharding)
  except TypeError:   # an unhashable sharding: a record of its own
    return shardings.encode(sharding)
  if record is None:
    record = known[sharding] = shardings.encode(sharding)
  return record


def _build_plan(flat: list[tuple[tuple, Any]], process_index: int, process_count: int,
                write_host_arrays: bool, data_file_bytes: int, placement: str,
                replica_parallel: bool, host_redundancy: int) -> SavePlan:
  """Checks every leaf and plans its shards; raises UnsupportedLeafError."""
  leaves: list[disk_format.LeafMeta] = []
  shards: list[PlannedShard] = []
  leaf_runs: list[tuple[int, str, tuple[int, ...]]] = []
  scalar_leaves: list[int] = []
  prng_leaves: list[int] = []
  accelerator_leaves: set[int] = set()
  # One sharding record per distinct sharding, shared by its leaves (the
  # metadata then describes their arrays once: disk_format.encode_metadata).
  sharding_records: dict[jax.sharding.Sharding, dict] = {}
  for leaf_id, (path, x) in enumerate(flat):
    where = f"leaf {treepath.to_str(path)}"
    try:
      encoded = treepath.encode(path)
    except TypeError as e:
      raise UnsupportedLeafError(f"{where}: {e}") from e
    if treepath.is_empty_node(x):
      leaves.append(disk_format.LeafMeta(encoded, treepath.empty_node_kind(x)))
    elif isinstance(x, jax.Array):
      prng_impl = None
      if is_prng_key(x):
        prng_impl = str(jax.random.key_impl(x))
        if prng_impl not in disk_format.PRNG_IMPLS:
          raise UnsupportedLeafError(f"{where}: PRNG key implementation {prng_impl!r} cannot be "
                                     f"checkpointed (supported: {', '.join(disk_format.PRNG_IMPLS)})")
        prng_leaves.append(leaf_id)
        sharding = x.sharding       # of the keys; the key data adds trailing dims
        x = jax.random.key_data(x)
      else:
        _check_dtype(x.dtype, where)
        sharding = x.sharding
      if x.is_deleted():
        raise UnsupportedLeafError(f"{where}: the jax.Array has been deleted (donated?)")
      shape = tuple(int(n) for n in x.shape)
      leaves.append(disk_format.LeafMeta(encoded, "array", dtype=np.dtype(x.dtype).name, shape=shape,
                                         sharding=_sharding_record(sharding, sharding_records),
                                         prng_impl=prng_impl))
      on_accelerator = next(iter(x.sharding.device_set)).platform != "cpu"
      if on_accelerator:
        accelerator_leaves.add(leaf_id)
      owned = _owned_shards(x, process_index, placement, replica_parallel, host_redundancy)
      shards.extend(PlannedShard(leaf_id, index, nbytes, on_accelerator=on_accelerator,
                                 part=part, addressable_index=addressable_index)
                    for addressable_index, index, part, nbytes in owned)
      if owned:
        leaf_runs.append((leaf_id, "array", tuple(i for i, *_ in owned)))
    elif isinstance(x, (np.ndarray, np.generic)):
      _check_dtype(x.dtype, where)
      kind = "numpy" if isinstance(x, np.ndarray) else "np_scalar"
      shape = tuple(int(n) for n in np.shape(x))
      leaves.append(disk_format.LeafMeta(encoded, kind, dtype=np.dtype(x.dtype).name, shape=shape))
      if write_host_arrays:
        index = tuple((0, n) for n in shape)
        shards.append(PlannedShard(leaf_id, index, _nbytes(index, np.dtype(x.dtype).itemsize)))
        leaf_runs.append((leaf_id, "host", (0,)))
    elif (st := _scalar_type(x)) is not None:
      _check_scalar(x, st, where)
      # The value is the save's, not the plan's: leaf_metadata fills it in.
      leaves.append(disk_format.LeafMeta(encoded, "scalar", scalar_type=st))
      scalar_leaves.append(leaf_id)
    else:
      _unsupported_type(x, where)
  _check_names_distinct(flat)
  placed, file_sizes = _assign_offsets(shards, data_file_bytes)
  return SavePlan(tuple(leaves), tuple(placed), tuple(file_sizes), process_index, process_count,
                  placement, replica_parallel, tuple(leaf_runs), tuple(scalar_leaves),
                  tuple(prng_leaves), frozenset(accelerator_leaves))


def _check_names_distinct(flat: list[tuple[tuple, Any]]) -> None:
  """Restore matches leaves by key name and index (treepath.key_of), so two
  leaves whose paths differ only in the kind of key (a custom node with an
  attribute "w" and a dict key "w") could not both be restored: refused."""
  seen: dict[tuple, tuple] = {}
  for path, _ in flat:
    other = seen.setdefault(treepath.key_of(path), path)
    if other is not path:
      raise UnsupportedLeafError(
          f"leaves {treepath.to_str(other)} and {treepath.to_str(path)} have the same key names; "
          "restore could not tell them apart")


# Which shards (or byte ranges of them) this process writes depends only on
# the sharding and shape, and a training step makes new arrays with the same
# shardings every time, so the answer is cached. Building Shard objects costs
# ~10 us each; jax keeps an array's addressable data in the sharding's device
# order, so an addressable index found once stays valid for every array that shares it.
_OWNED_CACHE: dict = {}
_OWNED_CACHE_MAX = 16384

# [(index among x's addressable shards, index, byte range or None, bytes)]
OwnedShards = list[tuple[int, Index, tuple[int, int] | None, int]]


def split_bytes(nbytes: int, parts: int) -> list[tuple[int, int]]:
  """`parts` contiguous [start, stop) byte ranges covering [0, nbytes), each
  boundary a multiple of 4 KiB (the last ranges are empty when there are
  fewer 4 KiB blocks than parts)."""
  step = disk_format.align_up(-(-nbytes // parts))
  return [(min(k * step, nbytes), min((k + 1) * step, nbytes)) for k in range(parts)]


def _owned_shards(x: jax.Array, me: int, placement: str, replica_parallel: bool,
                  host_redundancy: int) -> OwnedShards:
  """The shards (or byte ranges of them) of x this process writes (cached;
  see owned_shards)."""
  copies = host_redundancy if placement == "per_host" else 1
  key = (x.sharding, x.shape, x.dtype, me, placement, replica_parallel, copies)
  owned = _OWNED_CACHE.get(key)
  if owned is not None:
    return owned
  local: dict = {}   # index -> addressable index of the first local device holding it
  for i, s in enumerate(x.addressable_shards):
    local.setdefault(normalize_index(s.index, x.shape), i)
  holders: dict = {}     # index -> processes holding a replica
  if placement != "per_host" or replica_parallel:
    for device, idx in x.sharding.devices_indices_map(x.shape).items():
      holders.setdefault(normalize_index(idx, x.shape), set()).add(device.process_index)
  owned = owned_shards(local, holders, np.dtype(x.dtype).itemsize, me, placement=placement,
                       replica_parallel=replica_parallel, host_redundancy=host_redundancy)
  if len(_OWNED_CACHE) >= _OWNED_CACHE_MAX:
    _OWNED_CACHE.clear()
  _OWNED_CACHE[key] = owned
  return owned


def owned_shards(local: Mapping[Index, int], holders: Mapping[Index, Any], itemsize: int,
                 me: int, *, placement: str, replica_parallel: bool,
                 host_redundancy: int) -> OwnedShards:
  """Which of an array's shards, or byte ranges of them, process `me` writes.

  Args:
    local: each distinct shard index this process holds -> its addressable
      index (that of the first local device holding it), in addressable order.
    holders: each shard index -> the processes holding a replica of it
      (unused, may be empty, with "per_host" and not replica_parallel).
    itemsize: bytes per element.
    me: this process.
    placement, replica_parallel, host_redundancy: as in FastPersistOptions
      and make_plan.
  Returns:
    [(addressable index, index, byte range of the shard or None for all of
    it, bytes written)], in `local`'s order. Each shard is written once in
    all: whole by its only holder (or with "shared" and not replica_parallel
    by its lowest holder); with replica_parallel, a shard held by R processes
    is split (split_bytes) into R parts, holder j writing part j, or with
    "per_host" parts j .. j+k-1 mod R, k = min(host_redundancy, R)
    (redundancy.parts_of_holder). Empty parts are left out. With "per_host"
    and not replica_parallel, every shard this process holds, whole.
  """
  if placement == "per_host" and not replica_parallel:
    # Each host keeps everything its own devices hold.
    return [(i, index, None, _nbytes(index, itemsize)) for index, i in local.items()]
  copies = host_redundancy if placement == "per_host" else 1
  owned: OwnedShards = []
  # Each shard once, split among the processes holding it. Per host, a shard
  # held by this host alone is written whole; one held by several is split,
  # and on restore the hosts swap their parts (exchange.py).
  for index, addressable_index in local.items():
    procs = sorted(holders[index])
    nbytes = _nbytes(index, itemsize)
    if not replica_parallel or len(procs) == 1:
      if procs[0] == me:
        owned.append((addressable_index, index, None, nbytes))
      continue
    # Per host, each part on `copies` hosts (redundancy.py: holder j writes
    # parts j, ..., j+copies-1 mod R), each part its own record and crc.
    parts = split_bytes(nbytes, len(procs))
    for k in redundancy.parts_of_holder(len(procs), procs.index(me), copies):
      part = parts[k]
      if part[0] < part[1]:
        # Recorded as a part even when it is all of a small shard: the other
        # holders wrote nothing of it, and per-host restore swaps parts.
        owned.append((addressable_index, index, part, part[1] - part[0]))
  return owned


def _nbytes(index: Index, itemsize: int) -> int:
  return math.prod(b - a for a, b in index) * itemsize


def _assign_offsets(shards: list[PlannedShard],
                    data_file_bytes: int) -> tuple[list[PlannedShard], list[int]]:
  """Packs shards into data files at aligned offsets; returns them placed,
  and the file sizes (each ends with its last shard's last byte).

  A shard of no bytes (a zero-size array) occupies nothing: it is recorded
  at offset 0 of the current file, which it neither grows nor pads."""
  sizes: list[int] = []
  placed = []
  for s in shards:
    if not sizes:
      sizes.append(0)
    if not s.nbytes:
      placed.append(dataclasses.replace(s, file=len(sizes) - 1, offset=0))
      continue
    offset = disk_format.align_up(sizes[-1])
    if offset + s.nbytes > data_file_bytes and sizes[-1] > 0:
      sizes.append(0)
      offset = 0
    placed.append(dataclasses.replace(s, file=len(sizes) - 1, offset=offset))
    sizes[-1] = offset + s.nbytes
  return placed, sizes
