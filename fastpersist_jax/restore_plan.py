"""Restore planning: which saved bytes each target shard needs.

manifests + target -> one LeafJob per array leaf: the target's dtype,
sharding and per-device regions, and the saved shards overlapping them (each
possibly in parts written by several processes). Pure: nothing here reads
data. Restoring onto the saved sharding, each target region is one saved
shard, found by a dict lookup; only a resharding restore computes overlaps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import numpy as np

from fastpersist_jax import checksums, disk_format, orbax_internals, shardings, treepath
from fastpersist_jax.disk_format import Index
from fastpersist_jax.errors import CorruptCheckpointError, RestoreMismatchError
from fastpersist_jax.plan import normalize_index



@dataclasses.dataclass
class SavedShard:
  """One saved shard: its bytes may be split in parts written by several
  processes (replica-parallel), each part with its own record and crc."""
  index: Index
  nbytes: int
  parts: list[tuple[int, disk_format.ShardRecord]]   # (process, record), in byte order
  missing: str | None = None                    # why some bytes are not here
  at: int = 0                                   # its offset in its read batch's buffer
  view: np.ndarray | None = None                # all its bytes, once read and checked
  # Only these chunk runs [first, stop) of its record's chunk_crc32c are read
  # (a resharding restore needing some of its rows); None: all of it.
  chunk_runs: list[tuple[int, int]] | None = None

  @property
  def bytes_to_read(self) -> int:
    """Bytes this restore reads of the shard."""
    if self.chunk_runs is None:
      return self.nbytes
    step = self.parts[0][1].chunk_bytes
    return sum(min(stop * step, self.nbytes) - first * step for first, stop in self.chunk_runs)


def assemble_parts(leaf_name: Any, index: Index, nbytes: int,
                    records: list[tuple[int, disk_format.ShardRecord]]) -> SavedShard:
  """Orders a shard's parts; they must not overlap. The same range saved
  twice (per-host checkpoints gathered in one directory) is fine. Bytes no
  part holds (anywhere: other hosts' parts of a per-host checkpoint) make
  the shard `missing`, an error only where a target needs it (plan_leaf).
  Raises CorruptCheckpointError where parts overlap."""
  if len(records) == 1 and records[0][1].part is None:   # the common case: saved whole, once
    return SavedShard(index, nbytes, records)
  chosen = []
  present: list[tuple[int, int]] = []
  at = 0
  for process, rec in sorted(records, key=lambda pr: (pr[1].part or (0, nbytes), pr[0])):
    start, stop = rec.part or (0, nbytes)
    if stop == start:
      continue   # an empty part holds nothing
    if chosen and (start, stop) == (chosen[-1][1].part or (0, nbytes)):
      continue   # a duplicate of the part just taken
    if start < at:
      raise CorruptCheckpointError(
          f"leaf {leaf_name}, shard {list(map(list, index))}: saved parts overlap at byte "
          f"{start} (part {[start, stop]}, bytes up to {at} already held)")
    chosen.append((process, rec))
    if present and present[-1][1] == start:
      present[-1] = (present[-1][0], stop)
    else:
      present.append((start, stop))
    at = stop
  missing = None
  if present != [(0, nbytes)] and nbytes:
    # An error only if a target needs this shard (see plan_leaf).
    held = ", ".join(f"[{a}, {b})" for a, b in present) or "none"
    missing = (f"leaf {leaf_name}, shard {list(map(list, index))}: only bytes {held} of "
               f"{nbytes} are here")
  return SavedShard(index, nbytes, chosen, missing)


@dataclasses.dataclass
class LeafJob:
  leaf_id: int
  meta: disk_format.LeafMeta
  sharding: jax.sharding.Sharding | None    # None: build a numpy array
  device_indices: list[tuple[Any, Index]]   # (device, index) of target shards, in saved data
  needed: list[SavedShard]
  dtype: np.dtype                           # what to build: the target's, cast from the saved
  prng_impl: str | None = None              # build typed keys of this implementation
  python_type: type | None = None           # a Python scalar target: return one of this type
  resharded: bool = False                   # some target region is not one saved shard
  numpy_scalar: bool = False                # a numpy scalar target: return one

  @property
  def read_bytes(self) -> int:
    """Bytes of buffer the saved shards need (each at an aligned start)."""
    return sum(disk_format.align_up(s.nbytes) for s in self.needed)


def overlap(a: Index, b: Index) -> Index | None:
  out = []
  for (a0, a1), (b0, b1) in zip(a, b):
    lo, hi = max(a0, b0), min(a1, b1)
    if lo >= hi:
      return None
    out.append((lo, hi))
  return tuple(out)


def volume(index: Index) -> int:
  return math.prod(b - a for a, b in index)


_PYTHON_SCALARS = (bool, int, float, complex)
_ARRAY_TARGET_TYPES = (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic)


def _python_type(x: Any) -> type | None:
  """The Python scalar type a target leaf asks for: a value's own type (0,
  1.5), or the type itself (`int`, `float`: Orbax v1's abstract scalars);
  None for any other leaf."""
  t = type(x)
  if t in _PYTHON_SCALARS:
    return t
  if t is type and x in _PYTHON_SCALARS:
    return x
  return None


def is_numpy_abstract(x: Any) -> bool:
  """An abstract numpy array as Orbax v1 describes one (its AbstractArray
  protocol: `shape` and `dtype`, no `sharding`), such as
  ocp.v1's NumpyShapeDtype or NumpyMetadata: restored as a numpy array of
  that shape and dtype. Shape and dtype must both be given."""
  if isinstance(x, _ARRAY_TARGET_TYPES) or type(x) is type:
    return False
  shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
  if shape is None or dtype is None or hasattr(x, "sharding"):
    return False
  try:
    return (all(type(n) is int or isinstance(n, np.integer) for n in shape)
            and np.dtype(dtype) is not None)
  except TypeError:   # not a sequence of dims, or not a numpy dtype
    return False


def is_array_target(x: Any) -> bool:
  return isinstance(x, _ARRAY_TARGET_TYPES) or is_numpy_abstract(x)


def is_target_leaf(x: Any) -> bool:
  """Whether `x` may be a leaf of a restore target (FastPersistRestore, and
  the v1 handler's load): None (not restored where the checkpoint holds an
  array or scalar), `...` (ocp.PLACEHOLDER: not restored), an array or
  abstract array (jax.Array, jax.ShapeDtypeStruct, numpy array or scalar,
  Orbax v1's abstract numpy arrays), a Python scalar or scalar type (`int`,
  `float`, ...), a str, or an empty node ({}, [], (), optax.EmptyState())."""
  return (isinstance(x, _ARRAY_TARGET_TYPES) or x is None or x is Ellipsis
          or _python_type(x) is not None or type(x) is str or is_numpy_abstract(x)
          or treepath.is_empty_node(x))


def is_restore_target(tree: Any) -> bool:
  """Whether `tree` can be a restore target: a pytree (or None) whose leaves
  are all is_target_leaf and whose keys a save could have recorded. Whether
  it fits a given checkpoint is decided by the restore (RestoreMismatchError
  names the leaf)."""
  try:
    flat, _ = treepath.flatten(orbax_internals.unwrap_tree_metadata(tree))
    return all(is_target_leaf(x) and treepath.key_of(path) is not None for path, x in flat)
  except Exception:  # pylint: disable=broad-except  (not a pytree, a key no save records)
    return False


def saved_shape(meta: disk_format.LeafMeta) -> tuple[int, ...]:
  """The shape users see: a typed key array's, without the key data's dims."""
  return meta.shape[:-1] if meta.prng_impl else meta.shape


def key_dtype(impl: str) -> Any:
  return jax.eval_shape(lambda: jax.random.key(0, impl=impl)).dtype


def _target_dtype(meta: disk_format.LeafMeta, target: Any, name: str) -> tuple[np.dtype, str | None]:
  """(dtype of the data to build, PRNG impl of the keys to wrap it in).

  A saved typed key restores into a key target of the same implementation,
  or into its raw key data (uint32, with the key data's shape). Any other
  saved array is cast to the target's dtype with numpy's semantics, as
  np.asarray(saved).astype(dtype) does."""
  saved = disk_format.dtype_from_name(meta.dtype)
  t_dtype = getattr(target, "dtype", None)
  if meta.prng_impl:
    if t_dtype is not None and jax.dtypes.issubdtype(t_dtype, jax.dtypes.prng_key):
      if t_dtype != key_dtype(meta.prng_impl):
        raise RestoreMismatchError(f"leaf {name}: target keys {t_dtype} differ from the saved "
                                   f"{meta.prng_impl} keys")
      return saved, meta.prng_impl
    if target is None:
      return saved, meta.prng_impl
    if (python_type := _python_type(target)) is not None:
      raise RestoreMismatchError(f"leaf {name}: saved as {meta.prng_impl} keys; the target is a "
                                 f"Python {python_type.__name__}")
    shape = tuple(getattr(target, "shape", ()))
    if shape != meta.shape or np.dtype(t_dtype) != saved:
      raise RestoreMismatchError(
          f"leaf {name}: saved as {meta.prng_impl} keys of shape {saved_shape(meta)}; the target "
          f"({shape}, {t_dtype}) is neither such keys nor their key data ({meta.shape}, uint32)")
    return saved, None
  if target is None or _python_type(target) is not None:
    return saved, None
  if jax.dtypes.issubdtype(t_dtype, jax.dtypes.extended):
    raise RestoreMismatchError(f"leaf {name}: the target holds {t_dtype}, the checkpoint "
                               f"{meta.dtype} data, which cannot become {t_dtype}")
  try:
    dtype = np.dtype(t_dtype)
    np.zeros(1, saved).astype(dtype)
  except (TypeError, ValueError) as e:
    raise RestoreMismatchError(
        f"leaf {name}: the saved {meta.dtype} cannot be cast to the target's {t_dtype} ({e})") from e
  return dtype, None


def _check_shape(meta: disk_format.LeafMeta, target: Any, name: str, raw_key_data: bool) -> None:
  shape = () if _python_type(target) is not None else tuple(getattr(target, "shape", ()))
  want = meta.shape if raw_key_data else saved_shape(meta)
  if shape != want:
    raise RestoreMismatchError(f"leaf {name}: target shape {shape} differs from saved {want}")


def scalar_as_array(meta: disk_format.LeafMeta, target: Any, name: str) -> Any:
  """A saved Python scalar restored into an array target (e.g. a step saved as
  0, restored into ShapeDtypeStruct((), int32)): a 0-d array of the target's
  dtype, on the target's sharding (numpy for a numpy target)."""
  shape = tuple(target.shape)
  if shape != ():
    raise RestoreMismatchError(
        f"leaf {name}: saved as a Python {meta.scalar_type}; the target has shape {shape}")
  if meta.scalar_type == "str" or jax.dtypes.issubdtype(target.dtype, jax.dtypes.extended):
    raise RestoreMismatchError(
        f"leaf {name}: a saved {meta.scalar_type} cannot become a {target.dtype} array")
  try:
    value = np.asarray(meta.value).astype(np.dtype(target.dtype))
  except (OverflowError, TypeError, ValueError) as e:   # an int beyond int64, say
    raise RestoreMismatchError(
        f"leaf {name}: the saved {meta.value} does not fit the target's {target.dtype}") from e
  if meta.scalar_type in ("int", "bool") and value.item() != meta.value:
    raise RestoreMismatchError(
        f"leaf {name}: the saved {meta.value} does not fit the target's {target.dtype}")
  if isinstance(target, np.generic):
    return value[()]
  if isinstance(target, np.ndarray) or is_numpy_abstract(target):
    return value
  _check_device_dtype(value.dtype, name)
  sharding = getattr(target, "sharding", None)
  return jax.device_put(value, sharding) if sharding is not None else jax.device_put(value)


def as_python(value: np.ndarray, python_type: type, name: str) -> Any:
  """A restored 0-d array as the target's Python scalar type, when lossless."""
  v = value.reshape(()).item()
  try:
    out = python_type(v)
  except (TypeError, ValueError) as e:
    raise RestoreMismatchError(f"leaf {name}: the saved {v!r} is not a {python_type.__name__}") from e
  if not (out == v or (out != out and v != v)):   # (NaN restores as NaN)
    raise RestoreMismatchError(
        f"leaf {name}: the saved {v!r} would change as a {python_type.__name__} ({out!r})")
  return out


def _on_devices(sharding: Any, meta: disk_format.LeafMeta, name: str) -> Any:
  """A target sharding on an AbstractMesh (what jax.eval_shape gives for
  arrays on an Explicit mesh) made concrete: on the saved mesh's devices when
  its axes are the same, else over all devices when their number fits."""
  if not (isinstance(sharding, jax.sharding.NamedSharding) and
          isinstance(sharding.mesh, jax.sharding.AbstractMesh)):
    return sharding
  abstract_mesh = sharding.mesh
  saved, _ = shardings.decode(meta.sharding)
  if (isinstance(saved, jax.sharding.NamedSharding) and
      saved.mesh.shape_tuple == abstract_mesh.shape_tuple):
    devices = saved.mesh.devices
  elif math.prod(abstract_mesh.axis_sizes) == jax.device_count():
    devices = np.asarray(jax.devices()).reshape(abstract_mesh.axis_sizes)
  else:
    raise RestoreMismatchError(
        f"leaf {name}: the target's sharding is on an abstract mesh {dict(abstract_mesh.shape)} "
        f"and {jax.device_count()} devices are present; give the target a concrete mesh")
  mesh = jax.sharding.Mesh(devices, abstract_mesh.axis_names, axis_types=abstract_mesh.axis_types)
  return jax.sharding.NamedSharding(mesh, sharding.spec, memory_kind=sharding.memory_kind)


def _key_data_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """The sharding of a key array's key data: the same, plus a whole last dim."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec, None),
                                      memory_kind=sharding.memory_kind)
  return sharding   # single-device and fully replicated shardings fit any rank




def saved_shards(leaves: list[disk_format.LeafMeta], records: dict[tuple[int, Index], list]
                 ) -> dict[int, list[SavedShard]]:
  """Saved shards per leaf from {(leaf, index): [(process, record), ...]}, each
  with its parts ordered; the shards of a leaf must be cells of one grid."""
  by_leaf: dict[int, list[SavedShard]] = {}
  for (leaf_id, index), recs in records.items():
    if len(recs) == 1 and recs[0][1].part is None:   # saved whole, once: its record's size
      by_leaf.setdefault(leaf_id, []).append(SavedShard(index, recs[0][1].nbytes, recs))
      continue
    meta = leaves[leaf_id]
    nbytes = volume(index) * disk_format.dtype_from_name(meta.dtype).itemsize
    by_leaf.setdefault(leaf_id, []).append(
        assemble_parts(treepath.LazyName(meta.path), index, nbytes, recs))
  for leaf_id, shards in by_leaf.items():
    if len(shards) > 1:
      disk_format.check_grid([s.index for s in shards],
                        f"leaf {treepath.to_str(leaves[leaf_id].path)}: saved shards")
  return by_leaf


# Saved leaf kinds that a None target leaf leaves unrestored (None comes
# back); a saved None or empty node under a None target is restored as saved.
_NOT_RESTORED_UNDER_NONE = frozenset(disk_format.ARRAY_KINDS) | {"scalar"}


def match_target(leaves: list[disk_format.LeafMeta], target: Any, where: str,
                 partial_restore: bool = False) -> tuple[list[tuple[int, Any]], Any]:
  """[(saved leaf id, target leaf)] in target order, and the target's treedef
  (None without a target: every saved leaf, in saved order). Leaves are
  matched by key name and index (treepath.key_of). The saved leaf id is None
  where the target's own leaf is the result, nothing read: Orbax's
  placeholder `...` (skip this leaf), None where the checkpoint holds an
  array or a scalar (not restored, as with Orbax's handlers), or an empty
  node the checkpoint does not record (format version 1 kept no record of,
  e.g., optax.EmptyState()), and, with `partial_restore`, any target leaf
  the checkpoint lacks (Orbax's partial_restore: it keeps the target's value).
  Raises RestoreMismatchError for a target leaf that is not is_target_leaf,
  and (without `partial_restore`) for any other target leaf the checkpoint
  lacks."""
  if target is None:
    return [(i, None) for i in range(len(leaves))], None
  flat, treedef = treepath.flatten(target)
  by_key: dict[tuple, int] = {}
  for i, leaf in enumerate(leaves):
    if by_key.setdefault(treepath.key_of(leaf.path), i) != i:
      raise CorruptCheckpointError(f"{where}: two saved leaves are both named "
                                   f"{treepath.to_str(leaf.path)}")
  selected = []
  named: dict[int, tuple] = {}   # saved leaf -> the target path naming it
  for path, t in flat:
    try:
      i = by_key.get(treepath.key_of(path))
    except TypeError as e:   # a key no checkpoint records (encode refuses it on save)
      raise RestoreMismatchError(f"leaf {treepath.to_str(path)} of the restore target: {e}") from e
    if t is Ellipsis:   # ocp.PLACEHOLDER: not restored, as with Orbax's handlers
      selected.append((None, t))
      continue
    if t is None:
      if i is not None and leaves[i].kind in _NOT_RESTORED_UNDER_NONE:
        selected.append((None, None))   # not restored, as with Orbax's handlers
        continue
    elif not is_target_leaf(t):
      raise RestoreMismatchError(
          f"leaf {treepath.to_str(path)} of the restore target: a {type(t).__module__}."
          f"{type(t).__qualname__} is not a restore target (give a jax.ShapeDtypeStruct, an "
          "array, a Python scalar or scalar type, None or ocp.PLACEHOLDER)")
    if i is not None and named.setdefault(i, path) is not path:
      # One leaf restored twice would share its read buffers between two
      # jobs; the save refuses such a tree (plan._check_names_distinct).
      raise RestoreMismatchError(
          f"leaves {treepath.to_str(named[i])} and {treepath.to_str(path)} of the restore target "
          f"both name the saved leaf {treepath.to_str(leaves[i].path)}")
    if i is None and t is not None and treepath.is_empty_node(t):
      selected.append((None, t))
      continue
    if i is None:
      if partial_restore:
        selected.append((None, t))   # the target's own value
        continue
      raise RestoreMismatchError(
          f"leaf {treepath.to_str(path)} of the restore target is not in the checkpoint "
          "(FastPersistRestore(..., partial_restore=True) keeps the target's value there)")
    selected.append((i, t))
  return selected, treedef


def restore_plain(meta: disk_format.LeafMeta, target: Any, name: str) -> Any:
  """The value of a leaf with no array data (scalar, None, empty node)."""
  if meta.kind == "scalar" and is_array_target(target):
    return scalar_as_array(meta, target, name)
  python_type = _python_type(target) if meta.kind == "scalar" else None
  if python_type is not None and python_type is not type(meta.value):
    return as_python(np.asarray(meta.value), python_type, name)   # where lossless
  if is_array_target(target):
    raise RestoreMismatchError(f"leaf {name}: saved as {meta.kind}, target is an array")
  if meta.kind != "scalar" and target is not None and treepath.is_empty_node(target):
    return target    # the target's own empty node (e.g. optax.EmptyState())
  return disk_format.plain_value(meta)


def _saved_sharding(meta, name, prng_impl, fallback_to_numpy):
  """The saved sharding rebuilt here, or None (noted for the warning)."""
  sharding, why = shardings.decode(meta.sharding)
  if sharding is None:
    fallback_to_numpy.append(f"{name}: {why}")
  elif meta.prng_impl and prng_impl is None:
    sharding = _key_data_sharding(sharding)   # raw key data: the keys' sharding + a dim
  return sharding


def plan_leaf(leaf_id: int, meta: disk_format.LeafMeta, target: Any, saved: list[SavedShard],
              fallback_to_numpy: list[str], missing_hint: str,
              layouts: TargetLayouts | None = None) -> LeafJob:
  """What to read and build for one array leaf.

  Args:
    leaf_id, meta: the saved leaf.
    target: its restore target leaf (None: as saved).
    saved: the leaf's saved shards (saved_shards()).
    fallback_to_numpy: appended to when the saved sharding cannot be rebuilt
      here (the array is then built as numpy; the caller warns once).
    missing_hint: what to add to the error when saved bytes are missing.
    layouts: the restore's TargetLayouts (None: target_layout, uncached).
  Raises RestoreMismatchError (target does not fit) or CorruptCheckpointError
  (saved data missing for a region the target needs).
  """
  job = (layouts or target_layout)(leaf_id, meta, target, fallback_to_numpy)
  if len(saved) == 1 and len(job.device_indices) == 1 and saved[0].index == job.device_indices[0][1]:
    # The common case, one target shard that is the one saved shard: as below, without the lookups.
    if saved[0].missing:
      raise CorruptCheckpointError(f"{saved[0].missing} ({missing_hint})")
    job.needed = [saved[0]]
    return job
  name = treepath.LazyName(meta.path)
  by_index = {s.index: s for s in saved}
  needed: dict[Index, SavedShard] = {}
  for _, idx in job.device_indices:
    exact = by_index.get(idx)
    if exact is not None:
      needed[idx] = exact
      continue
    job.resharded = True
    covered = 0
    for s in saved:
      o = overlap(s.index, idx)
      if o is not None:
        needed[s.index] = s
        covered += volume(o)
    # Every target region must be covered by saved data (the saved shards
    # are cells of one grid, so the count proves it).
    if covered != volume(idx):
      raise CorruptCheckpointError(
          f"leaf {name}: the checkpoint holds {covered} of the {volume(idx)} elements of "
          f"region {list(map(list, idx))} ({missing_hint})")
  for s in needed.values():
    if s.missing:
      raise CorruptCheckpointError(f"{s.missing} ({missing_hint})")
    if job.resharded:
      s.chunk_runs = _chunks_needed(s, [idx for _, idx in job.device_indices],
                                    disk_format.dtype_from_name(meta.dtype).itemsize)
  job.needed = list(needed.values())
  return job


def _chunks_needed(s: SavedShard, regions: list[Index], itemsize: int
                   ) -> list[tuple[int, int]] | None:
  """The chunk runs of saved shard `s` holding every element of `regions`
  it overlaps, or None when that is all of them, or `s` has no chunk CRCs
  (it is then read whole). Each overlap is taken as the row-major range
  from its first to its last element: exact for row blocks, a superset
  otherwise, never less."""
  if len(s.parts) != 1:
    return None
  rec = s.parts[0][1]
  if rec.part is not None or rec.chunk_crc32c is None or not rec.chunk_bytes:
    return None
  shape = [b - a for a, b in s.index]
  strides = [itemsize] * len(shape)
  for d in range(len(shape) - 2, -1, -1):
    strides[d] = strides[d + 1] * shape[d + 1]
  ranges = set()
  for idx in regions:
    o = overlap(s.index, idx)
    if o is not None:
      first = sum((lo - a) * st for (lo, _), (a, _), st in zip(o, s.index, strides))
      last = sum((hi - 1 - a) * st for (_, hi), (a, _), st in zip(o, s.index, strides))
      ranges.add((first, last + itemsize))
  runs = checksums.chunks_covering(sorted(ranges), rec.chunk_bytes)
  if runs == [(0, len(rec.chunk_crc32c))]:
    return None
  return runs


def target_layout(leaf_id: int, meta: disk_format.LeafMeta, target: Any,
                  fallback_to_numpy: list[str]) -> LeafJob:
  """The leaf's job without its saved shards: the dtype to build, and the
  sharding and per-device regions (of the saved data) its target asks for.
  Raises RestoreMismatchError when the target does not fit."""
  name = treepath.LazyName(meta.path)
  t = target
  sharding = None
  python_type = _python_type(t)
  if t is not None and python_type is None and not is_array_target(t):
    raise RestoreMismatchError(
        f"leaf {name}: saved as an array; target {type(t).__name__} is not an array")
  dtype, prng_impl = _target_dtype(meta, t, name)
  if t is not None:
    _check_shape(meta, t, name, raw_key_data=bool(meta.prng_impl) and prng_impl is None)
    if isinstance(t, jax.Array):
      sharding = t.sharding
    elif isinstance(t, jax.ShapeDtypeStruct):
      sharding = _on_devices(t.sharding, meta, name)
      if sharding is None and meta.kind == "array":
        sharding = _saved_sharding(meta, name, prng_impl, fallback_to_numpy)
  elif meta.kind == "array":
    sharding = _saved_sharding(meta, name, prng_impl, fallback_to_numpy)
  if sharding is not None:
    _check_device_dtype(dtype, name)
    # Target shards of the data: a typed key's index covers its key data too.
    shape = saved_shape(meta) if prng_impl else meta.shape
    tail = tuple((0, n) for n in meta.shape[len(shape):])
    try:
      regions = _device_regions(sharding, shape)
    except Exception as e:  # pylint: disable=broad-except  (jax raises several kinds)
      raise RestoreMismatchError(
          f"leaf {name}: the target's sharding {sharding} does not fit shape {shape}: {e}") from e
    device_indices = [(d, idx + tail) for d, idx in regions]
  else:
    device_indices = [(None, tuple((0, n) for n in meta.shape))]
  return LeafJob(leaf_id, meta, sharding, device_indices, [], dtype, prng_impl, python_type,
                 numpy_scalar=isinstance(t, np.generic))


class TargetLayouts:
  """target_layout for the leaves of one restore, computed once for each
  distinct pair of saved leaf fields and target (10,000 small leaves of one
  shape on one device: once, not 10,000 times; 0.08 s on a 2-core VM).

  A saved leaf's fields are keyed by its sharding record's identity, which
  the leaves sharing all fields share (disk_format._decode_leaves); so an
  instance is valid only for the metadata it first saw. Targets are keyed
  by type, shape, dtype and sharding, for jax.ShapeDtypeStruct, jax.Array
  and None only; any other target, or a layout that fell back to numpy
  (noted per leaf), is computed for its leaf alone.
  """

  def __init__(self):
    self._known: dict[tuple, LeafJob] = {}

  def __call__(self, leaf_id: int, meta: disk_format.LeafMeta, target: Any,
               fallback_to_numpy: list[str]) -> LeafJob:
    """target_layout(leaf_id, meta, target, fallback_to_numpy), from the
    cache where an equal leaf and target were laid out already."""
    key = _layout_key(meta, target)
    try:
      known = self._known.get(key) if key is not None else None
    except TypeError:   # a sharding that cannot be hashed: laid out for this leaf alone
      key = known = None
    if known is not None:
      return LeafJob(leaf_id, meta, known.sharding, known.device_indices, [], known.dtype,
                     known.prng_impl, known.python_type, numpy_scalar=known.numpy_scalar)
    noted = len(fallback_to_numpy)
    job = target_layout(leaf_id, meta, target, fallback_to_numpy)
    if key is not None and len(fallback_to_numpy) == noted:
      self._known[key] = job
    return job


def _layout_key(meta: disk_format.LeafMeta, target: Any) -> tuple | None:
  if target is None:
    target_key = None
  elif type(target) is jax.ShapeDtypeStruct or isinstance(target, jax.Array):
    target_key = (type(target), target.shape, target.dtype, target.sharding,
                  getattr(target, "weak_type", False))
  else:
    return None
  return (meta.kind, meta.dtype, meta.shape, meta.prng_impl, id(meta.sharding), target_key)


@functools.lru_cache(maxsize=4096)
def _device_regions(sharding: jax.sharding.Sharding, shape: tuple[int, ...]
                    ) -> tuple[tuple[Any, Index], ...]:
  """(device, region) of every addressable device: many leaves share a
  sharding and shape (10,000 small leaves on one device), so computed once."""
  return tuple((d, normalize_index(idx, shape))
               for d, idx in sharding.addressable_devices_indices_map(shape).items())


@functools.lru_cache(maxsize=None)
def _device_can_hold(dtype: np.dtype, x64: bool) -> str | None:
  """Why a jax.Array cannot hold `dtype` in this process (with
  jax_enable_x64 as `x64`), or None."""
  canonical = jax.dtypes.canonicalize_dtype(dtype)
  if canonical != dtype:
    return (f"this process's jax.Arrays hold {dtype} as {canonical} (jax_enable_x64 is off); "
            "enable it, or pass a target of the dtype you want (a cast)")
  try:
    jax.device_put(np.zeros((0,), dtype)).block_until_ready()
  except Exception as e:  # pylint: disable=broad-except  (TypeError, XLA runtime errors)
    return f"a jax.Array cannot hold {dtype} ({type(e).__name__})"
  return None


def _check_device_dtype(dtype: np.dtype, name: Any) -> None:
  why = _device_can_hold(np.dtype(dtype), bool(jax.config.jax_enable_x64))
  if why:
    raise RestoreMismatchError(f"leaf {name}: {why}")
