"""The shard plan: which bytes this process writes, and where they go.

Turns a pytree into leaf metadata (for everyone) and the list of shards this
process owns, each assigned a 4 KiB-aligned offset in one of the process's
few large data files. Every leaf is checked here, before a byte is written.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any

import jax
import numpy as np

from fastpersist_jax import disk_format, redundancy, shardings, treepath
from fastpersist_jax.errors import UnsupportedLeafError


@dataclasses.dataclass(frozen=True)
class PlannedShard:
  """One shard this process writes: which bytes, and where they go."""
  leaf: int
  index: tuple[tuple[int, int], ...]
  nbytes: int
  file: int = 0
  offset: int = 0
  on_accelerator: bool = False   # the data lives in device memory (needs a D2H copy)
  # Byte range of the shard written by this process when its replicas on
  # several processes share the writing (replica-parallel); None: all of it.
  part: tuple[int, int] | None = None
  addressable_index: int = 0  # among the leaf's addressable_arrays()


# The snapshot a save takes (FastPersistOptions.snapshot, resolved):
#   "copy"       every owned shard is copied into staging while blocking;
#   "view"       host views of the CPU shards are taken while blocking (they
#                keep the runtime from donating or freeing the buffers) and
#                copied in the background: what "auto" means when every
#                jax.Array is on CPU ("copy" otherwise);
#   "reference"  nothing but references are taken while blocking.
SNAPSHOT_MODES = ("copy", "view", "reference")


@dataclasses.dataclass
class SavePlan:
  """A save of one tree by this process.

  `shards` (and the leaves' metadata) are shared by every plan of a tree with
  the same structure, shardings, shapes and dtypes, and must not be changed.
  `sources[i]` is where shard i's bytes are now: its single-device jax.Array
  or numpy array, or with `lazy` the leaf's global jax.Array (the shard is
  addressable_arrays()[addressable_index] of it). Staging sets it to None once the
  bytes are copied, so nothing stays pinned by the plan.
  """
  leaves: list[disk_format.LeafMeta]
  shards: list[PlannedShard]
  sources: list[Any]
  file_sizes: list[int]
  process_index: int
  process_count: int
  placement: str = "shared"
  replica_parallel: bool = False
  snapshot: str = "copy"     # resolved: one of SNAPSHOT_MODES

  @property
  def lazy(self) -> bool:
    return self.snapshot == "reference"

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


def _check_dtype(dtype: Any, where: str) -> None:
  try:
    supported = disk_format.dtype_is_supported(np.dtype(dtype))
  except TypeError:   # extended dtypes other than PRNG keys
    supported = False
  if not supported:
    raise UnsupportedLeafError(f"{where}: dtype {dtype} cannot be checkpointed")


def _host_source(x: Any, copy: bool) -> np.ndarray:
  """A numpy leaf's bytes as saved: in native byte order (the dtype's name,
  all the metadata records, means native bytes on disk), copied when the
  caller may change them before they are staged."""
  a = np.asarray(x)
  if not a.dtype.isnative:
    return a.astype(a.dtype.newbyteorder("="))
  return np.array(a, copy=True) if copy else a


# Python ints are written into the metadata as JSON numbers; Python refuses to
# print ints of more than 4,300 digits (sys.get_int_max_str_digits).
_MAX_SCALAR_INT_BITS = 13_000


def is_prng_key(x: Any) -> bool:
  """A typed PRNG key array (jax.random.key), saved as its key data."""
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _array_data(x: Any) -> Any:
  """What is saved of a leaf: a typed key's uint32 key data (a view of the
  same buffers, no copy), anything else as it is."""
  return jax.random.key_data(x) if is_prng_key(x) else x


def _scalar_type(x: Any) -> str | None:
  # bool before int: bool is an int subclass.
  for t, name in ((bool, "bool"), (int, "int"), (float, "float"), (complex, "complex"), (str, "str")):
    if isinstance(x, t):
      return name
  return None


def make_plan(tree: Any, *, process_index: int, process_count: int,
              write_host_arrays: bool, data_file_bytes: int,
              snapshot: str = "copy", placement: str = "shared",
              replica_parallel: bool = True, host_redundancy: int = 1) -> SavePlan:
  """Plans a save of `tree` by this process.

  Args:
    tree: the pytree to save, or its CheckedTree (check_tree).
    process_index, process_count: this process in the JAX runtime.
    write_host_arrays: whether this process writes numpy arrays and numpy
      scalars (which every process holds whole); the primary does.
    data_file_bytes: start a new data file once one would grow past this.
    snapshot: "auto" or one of SNAPSHOT_MODES: with "view", CPU shards are
      pinned as host views now; with "reference", only the arrays are
      referenced (each shard is looked up when it is staged); with either,
      numpy leaves are copied now (they are mutable in place).
    placement: "shared" (all processes write into one directory) or
      "per_host" (each process writes into its own directory).
    replica_parallel: split each shard replicated on several processes into
      byte ranges, one per process, so every process (and its disk) writes
      an equal part. Without it, "shared" writes each shard whole once and
      "per_host" writes on every host every shard its devices hold.
    host_redundancy: with "per_host" and replica_parallel, how many hosts
      write each part of a shard replicated across hosts (redundancy.py);
      ignored for "shared".
  """
  checked = tree if isinstance(tree, CheckedTree) else check_tree(tree)
  flat = checked.flat
  values = [x for _, x in flat]
  key = None
  skeleton = None
  if checked.signature is not None:
    key = checked.signature + (process_index, process_count, write_host_arrays, data_file_bytes,
                               placement, replica_parallel, host_redundancy)
    with _LAYOUT_CACHE_LOCK:
      skeleton = _SKELETON_CACHE.get(key)
  if skeleton is None:
    skeleton = _build_skeleton(flat, process_index, write_host_arrays, data_file_bytes,
                                placement, replica_parallel, host_redundancy)
    if key is not None:
      with _LAYOUT_CACHE_LOCK:
        if len(_SKELETON_CACHE) >= _LAYOUT_CACHE_MAX:
          _SKELETON_CACHE.pop(next(iter(_SKELETON_CACHE)))
        _SKELETON_CACHE[key] = skeleton
  if snapshot == "auto":
    snapshot = "copy" if skeleton.any_on_accelerator else "view"
  if skeleton.prng_leaves:
    values = list(values)
    for i in skeleton.prng_leaves:
      values[i] = jax.random.key_data(values[i])
  leaves, sources = skeleton.bind(values, snapshot)
  return SavePlan(leaves, skeleton.shards, sources, skeleton.file_sizes, process_index,
                  process_count, placement, replica_parallel, snapshot=snapshot)


# A training loop saves trees of the same structure, shardings, shapes and
# dtypes again and again, so everything that depends only on those is planned
# once: planning 2,000 shards from scratch takes ~10 ms of the blocking time,
# and the thousands of objects it makes trigger full garbage collections.
_SKELETON_CACHE: dict = {}
_LAYOUT_CACHE_MAX = 8
_LAYOUT_CACHE_LOCK = threading.Lock()


def _signature(x: Any) -> Any:
  """What the layout of a leaf depends on (besides its key path)."""
  if isinstance(x, jax.Array):
    return (type(x), x.sharding, x.shape, x.dtype)
  if isinstance(x, np.ndarray):
    return (type(x), x.shape, x.dtype)
  if isinstance(x, np.generic):
    return (type(x), x.dtype)
  return type(x)


@dataclasses.dataclass(frozen=True)
class _PlanSkeleton:
  """The plan of a tree, less what changes from one save to the next."""
  paths: tuple[tuple, ...]
  leaves: tuple[disk_format.LeafMeta, ...]      # scalar values filled in by bind()
  shards: list[PlannedShard]
  file_sizes: list[int]
  # In shard order: (leaf id, "array" or "host", the leaf's shard addressable indices).
  sources: tuple[tuple[int, str, tuple[int, ...]], ...]
  scalar_leaves: tuple[int, ...]
  array_on_accelerator: dict[int, bool]
  prng_leaves: tuple[int, ...]             # typed keys: saved as their key data

  @property
  def any_on_accelerator(self) -> bool:
    return any(self.array_on_accelerator.values())

  def bind(self, values: list[Any], snapshot: str) -> tuple[list[disk_format.LeafMeta], list[Any]]:
    """This save's leaf metadata and shard sources."""
    leaves = list(self.leaves)
    for i in self.scalar_leaves:
      leaves[i] = dataclasses.replace(leaves[i], value=values[i])
    sources: list[Any] = []
    for leaf_id, kind, addressable_indices in self.sources:
      x = values[leaf_id]
      if kind == "host":
        sources.append(_host_source(x, copy=snapshot != "copy"))
        continue
      if x.is_deleted():
        raise UnsupportedLeafError(f"leaf {treepath.to_str(self.paths[leaf_id])}: the "
                                   "jax.Array has been deleted (donated?)")
      if snapshot == "reference":
        sources.extend([x] * len(addressable_indices))
        continue
      per_device = addressable_arrays(x)
      if snapshot == "view" and not self.array_on_accelerator[leaf_id]:
        # The host view pins the buffer (see FastPersistOptions.snapshot).
        sources.extend([np.asarray(per_device[p]) for p in addressable_indices])
      else:
        sources.extend([per_device[p] for p in addressable_indices])
    return leaves, sources


@dataclasses.dataclass(frozen=True)
class CheckedTree:
  """A pytree flattened and checked (check_tree), with the signature its
  plan is cached under (None: node data that cannot be hashed)."""
  flat: list
  treedef: Any
  signature: tuple | None


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
    with _LAYOUT_CACHE_LOCK:
      known = signature in _CHECKED
  except Exception:  # pylint: disable=broad-except  (pytree node data that cannot be hashed or compared)
    signature, known = None, False
  if not known:
    _check_leaves(flat)
    if signature is not None:
      with _LAYOUT_CACHE_LOCK:
        if len(_CHECKED) >= _LAYOUT_CACHE_MAX:
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


def _build_skeleton(flat: list[tuple[tuple, Any]], process_index: int, write_host_arrays: bool,
                  data_file_bytes: int, placement: str, replica_parallel: bool,
                  host_redundancy: int = 1) -> _PlanSkeleton:
  """Checks every leaf and plans its shards; raises UnsupportedLeafError."""
  leaves: list[disk_format.LeafMeta] = []
  shards: list[PlannedShard] = []
  sources: list[tuple[int, str, tuple[int, ...]]] = []
  scalar_leaves: list[int] = []
  prng_leaves: list[int] = []
  on_accel: dict[int, bool] = {}
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
                                    sharding=shardings.encode(sharding), prng_impl=prng_impl))
      on_accel[leaf_id] = next(iter(x.sharding.device_set)).platform != "cpu"
      owned = _owned_shards(x, process_index, placement, replica_parallel, host_redundancy)
      shards.extend(PlannedShard(leaf_id, index, nbytes, on_accelerator=on_accel[leaf_id],
                                 part=part, addressable_index=addressable_index)
                    for addressable_index, index, part, nbytes in owned)
      if owned:
        sources.append((leaf_id, "array", tuple(i for i, *_ in owned)))
    elif isinstance(x, (np.ndarray, np.generic)):
      _check_dtype(x.dtype, where)
      kind = "numpy" if isinstance(x, np.ndarray) else "np_scalar"
      shape = tuple(int(n) for n in np.shape(x))
      leaves.append(disk_format.LeafMeta(encoded, kind, dtype=np.dtype(x.dtype).name, shape=shape))
      if write_host_arrays:
        shards.append(PlannedShard(leaf_id, tuple((0, n) for n in shape), int(np.asarray(x).nbytes)))
        sources.append((leaf_id, "host", (0,)))
    elif (st := _scalar_type(x)) is not None:
      _check_scalar(x, st, where)
      leaves.append(disk_format.LeafMeta(encoded, "scalar", value=x, scalar_type=st))
      scalar_leaves.append(leaf_id)
    else:
      _unsupported_type(x, where)
  _check_names_distinct(flat)
  shards, file_sizes = _assign_offsets(shards, data_file_bytes)
  return _PlanSkeleton(tuple(path for path, _ in flat), tuple(leaves), shards, file_sizes,
                 tuple(sources), tuple(scalar_leaves), on_accel, tuple(prng_leaves))


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
Owned = list[tuple[int, tuple[tuple[int, int], ...], tuple[int, int] | None, int]]


def split_bytes(nbytes: int, parts: int) -> list[tuple[int, int]]:
  """`parts` contiguous ranges covering [0, nbytes), boundaries 4 KiB-aligned."""
  step = disk_format.align_up(-(-nbytes // parts))
  return [(min(k * step, nbytes), min((k + 1) * step, nbytes)) for k in range(parts)]


def _owned_shards(x: jax.Array, me: int, placement: str, replica_parallel: bool,
                  host_redundancy: int = 1) -> Owned:
  """The shards (or byte ranges of them) of x this process writes."""
  copies = host_redundancy if placement == "per_host" else 1
  key = (x.sharding, x.shape, x.dtype, me, placement, replica_parallel, copies)
  owned = _OWNED_CACHE.get(key)
  if owned is not None:
    return owned
  first_local: dict = {}   # index -> addressable index of the first local device holding it
  for i, s in enumerate(x.addressable_shards):
    first_local.setdefault(normalize_index(s.index, x.shape), i)
  owned = []
  if placement == "per_host" and not replica_parallel:
    # Each host keeps everything its own devices hold.
    owned = [(i, index, None, _nbytes(index, x.dtype)) for index, i in first_local.items()]
  else:
    # Each shard once, split among the processes holding it. Per host, a
    # shard held by this host alone is written whole; one held by several is
    # split, and on restore the hosts swap their parts (exchange.py).
    holders: dict = {}     # index -> processes holding a replica
    for device, idx in x.sharding.devices_indices_map(x.shape).items():
      holders.setdefault(normalize_index(idx, x.shape), set()).add(device.process_index)
    for index, addressable_index in first_local.items():
      procs = sorted(holders[index])
      nbytes = _nbytes(index, x.dtype)
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
  if len(_OWNED_CACHE) >= _OWNED_CACHE_MAX:
    _OWNED_CACHE.clear()
  _OWNED_CACHE[key] = owned
  return owned


def _nbytes(index: tuple[tuple[int, int], ...], dtype) -> int:
  return math.prod(b - a for a, b in index) * np.dtype(dtype).itemsize


def addressable_arrays(x: jax.Array) -> list:
  """The per-device arrays of x, in addressable-shard order.

  `jax.Array._arrays` is that list, read without building a Sharding per shard
  (addressable_data does, ~50 us each); public API where it is absent.
  """
  arrays = getattr(x, "_arrays", None)
  if isinstance(arrays, list) and len(arrays) == len(x.sharding.addressable_devices):
    return arrays
  return [x.addressable_data(i) for i in range(len(x.sharding.addressable_devices))]


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
