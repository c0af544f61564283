"""`export`: a checkpoint item to safetensors or to a standard Orbax
checkpoint, leaf by leaf (never the whole tree in memory), every CRC-32C
checked on the way (reader.CheckpointReader).

safetensors: tensor names are the leaf's key path entries (dict keys,
sequence indices, attribute names) joined with "." (e.g. params.layers.0.w;
a single-leaf tree is named "root"); non-array leaves (Python scalars, None,
empty containers) go into the header's `__metadata__` under the same name,
as JSON. The header is computed from the metadata before any data is read,
then each leaf is read, verified and appended, so memory holds one leaf at a
time. With max_shard_bytes the tensors are split into
model-0000i-of-0000n.safetensors files plus model.safetensors.index.json
(Hugging Face's layout). Each file is checked with the safetensors package
(header, names, metadata) before the output, written into a temporary
directory, is renamed into place.

orbax: written through Orbax's PyTreeCheckpointHandler (TensorStore, the
format StandardCheckpointer reads) with a type handler that loads each leaf
only when Orbax writes it, one leaf at a time. Leaves Orbax would store in
one place (parameter names "a" and "a/"; strings named "x" and "x/y") are
refused before anything is written, naming both: Orbax's save would fail in
TensorStore or, for two numbers, restore one value for both.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import shutil
import struct
from typing import Any

import jax
import numpy as np

from fastpersist_jax import disk_format, reader, treepath
from fastpersist_jax.errors import FastPersistError, UnsupportedLeafError

FORMATS = ("safetensors", "orbax")

# numpy/ml_dtypes name -> safetensors dtype code.
SAFETENSORS_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16",
    "uint32": "U32", "int32": "I32", "uint64": "U64", "int64": "I64",
    "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
    "complex64": "C64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class ExportError(FastPersistError):
  """The export cannot be written as asked (name clash, output exists, an
  unknown format, a tree Orbax refuses, safetensors not installed)."""


def tensor_name(path: list) -> str:
  """The safetensors (and Orbax parameter) name of a leaf: the keys of its
  saved key path `path` ([(kind, key), ...], LeafMeta.path) joined with "."
  (e.g. "params.layers.0.w"); "root" for the empty path of a single-leaf
  tree."""
  return ".".join(str(key) for _, key in path) or "root"


def _json_value(meta: disk_format.LeafMeta) -> str:
  value = disk_format.plain_value(meta)
  if isinstance(value, complex):
    value = {"complex": [value.real, value.imag]}
  return json.dumps(value)


def _target_dtype(where: str, leaf_name: str, dtype_name: str, cast: str | None) -> np.dtype:
  """The dtype a leaf is written as: its own, or `cast` where safetensors lacks
  its own. Raises UnsupportedLeafError naming the leaf and --cast."""
  if dtype_name in SAFETENSORS_DTYPES:
    return disk_format.dtype_from_name(dtype_name)
  if cast is None:
    raise UnsupportedLeafError(
        f"{where}: leaf {leaf_name} has dtype {dtype_name}, which safetensors cannot hold; pass "
        f"--cast=DTYPE (e.g. --cast={_suggested_cast(dtype_name)}) to convert such leaves")
  return cast_dtype(cast)


def _suggested_cast(dtype_name: str) -> str:
  for prefix, cast in (("uint", "uint8"), ("int", "int8"), ("complex", "complex64")):
    if dtype_name.startswith(prefix):
      return cast
  return "float32"


def cast_dtype(name: str) -> np.dtype:
  """The numpy dtype named by --cast (a numpy/ml_dtypes name such as "int8"
  or "bfloat16"); it must be one safetensors holds (SAFETENSORS_DTYPES).
  Raises UnsupportedLeafError naming the choices otherwise."""
  if name not in SAFETENSORS_DTYPES:
    raise UnsupportedLeafError(
        f"--cast={name}: not a dtype safetensors holds (one of {sorted(SAFETENSORS_DTYPES)})")
  return disk_format.dtype_from_name(name)


def _prepare_out(out: str) -> str:
  """A fresh temporary directory next to `out`, which must not exist. Raises
  ExportError."""
  out = os.path.abspath(out)
  if os.path.lexists(out):
    raise ExportError(f"{out} already exists; remove it or choose another output")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = f"{out}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  return tmp


def _commit(tmp: str, out: str) -> None:
  for name in os.listdir(tmp):
    fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  os.rename(tmp, out)
  fd = os.open(os.path.dirname(os.path.abspath(out)), os.O_RDONLY | os.O_DIRECTORY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def export_safetensors(item_dir: str, out: str, max_shard_bytes: int = 0,
                       cast: str | None = None) -> list[str]:
  """Writes the item at `item_dir` as safetensors into the new directory
  `out`: model.safetensors, or (max_shard_bytes > 0 and more than one shard
  needed) model-0000i-of-0000n.safetensors files of at most max_shard_bytes
  of tensor data each (a larger tensor gets a file of its own) plus
  model.safetensors.index.json ({"metadata": {"total_size": bytes of
  tensor data}, "weight_map": {name: file}}). `cast`: dtype name for leaves
  whose dtype safetensors lacks (others keep theirs). Everything is written
  into a temporary directory next to `out`, fsynced and renamed to `out`, so
  on any failure nothing is left at `out`.

  Returns:
    The paths of the files written, under `out`.

  Raises:
    UnsupportedLeafError: a dtype safetensors lacks and no `cast`, or a
      `cast` safetensors lacks.
    ExportError: `out` exists, two leaves map to one name (or one to
      "__metadata__"), the safetensors package is missing, or a file does
      not read back with the names and metadata written.
    CheckpointNotFoundError / CorruptCheckpointError /
      ChecksumMismatchError: no or a damaged checkpoint at `item_dir`.
    OSError: the output cannot be made or written (ENOENT, EACCES, ENOSPC,
      ...).
  """
  try:
    import safetensors  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ExportError("--format=safetensors needs the safetensors package: "
                      "pip install 'fastpersist_jax[export]'") from e
  with reader.CheckpointReader(item_dir) as rd:
    tensors: list[tuple[int, str, np.dtype, tuple[int, ...], int]] = []
    metadata: dict[str, str] = {}
    owner: dict[str, str] = {}
    for i, meta in enumerate(rd.meta.leaves):
      name = tensor_name(meta.path)
      if name == "__metadata__":
        raise ExportError(f"leaf {rd.leaf_name(i)} maps to the safetensors name {name!r}, "
                          "which safetensors reserves for the header's metadata")
      if name in owner:
        raise ExportError(f"leaves {owner[name]} and {rd.leaf_name(i)} both map to the "
                          f"safetensors name {name!r}")
      owner[name] = rd.leaf_name(i)
      if meta.kind in disk_format.ARRAY_KINDS:
        dtype = _target_dtype(rd.directory, rd.leaf_name(i), meta.dtype, cast)
        nbytes = int(np.prod(meta.shape, dtype=np.int64)) * dtype.itemsize
        tensors.append((i, name, dtype, meta.shape, nbytes))
      else:
        metadata[name] = _json_value(meta)
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
      if max_shard_bytes > 0 and shards[-1] and size + t[4] > max_shard_bytes:
        shards.append([])
        size = 0
      shards[-1].append(t)
      size += t[4]
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [
        f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    tmp = _prepare_out(out)
    try:
      for fname, group in zip(names, shards):
        _write_safetensors(rd, os.path.join(tmp, fname), group, metadata)
        with safetensors.safe_open(os.path.join(tmp, fname), "np") as f:
          if set(f.keys()) != {t[1] for t in group} or (f.metadata() or {}) != metadata:
            raise ExportError(f"{fname}: safetensors reads back other names or metadata")
      if n > 1:
        index = {"metadata": {"total_size": sum(t[4] for t in tensors)},
                 "weight_map": {t[1]: fname for fname, g in zip(names, shards) for t in g}}
        with open(os.path.join(tmp, INDEX_FILE), "w") as f:
          json.dump(index, f, indent=1)
      _commit(tmp, out)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  return [os.path.join(out, f) for f in names + ([INDEX_FILE] if n > 1 else [])]


def _write_safetensors(rd: reader.CheckpointReader, path: str, group: list,
                       metadata: dict[str, str]) -> None:
  """One safetensors file: the header from shapes and dtypes, then each
  tensor's bytes, read and verified one leaf at a time."""
  header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
  at = 0
  for _, name, dtype, shape, nbytes in group:
    header[name] = {"dtype": SAFETENSORS_DTYPES[dtype.name], "shape": list(shape),
                    "data_offsets": [at, at + nbytes]}
    at += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)   # tensor data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for leaf_id, _, dtype, _, nbytes in group:
      value = np.asarray(rd.read_leaf(leaf_id))
      if value.dtype != dtype:
        value = value.astype(dtype)
      data = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
      assert data.nbytes == nbytes, (rd.leaf_name(leaf_id), data.nbytes, nbytes)
      f.write(data.data)
      del value, data


# Orbax ------------------------------------------------------------------------------


class _LeafSource:
  """A leaf to be read only when Orbax writes it."""

  def __init__(self, rd: reader.CheckpointReader, leaf_id: int, dtype: np.dtype | None):
    self.rd = rd
    self.leaf_id = leaf_id
    meta = rd.meta.leaves[leaf_id]
    self.shape = tuple(meta.shape)
    self.dtype = dtype or disk_format.dtype_from_name(meta.dtype)
    self.ndim = len(self.shape)
    self.size = int(np.prod(self.shape, dtype=np.int64))

  def load(self) -> np.ndarray:
    value = np.asarray(self.rd.read_leaf(self.leaf_id))
    return value if value.dtype == self.dtype else value.astype(self.dtype)


def _streaming_handler_class():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  class StreamingNumpyHandler(ocp.type_handlers.NumpyHandler):
    """Writes _LeafSource leaves exactly as NumpyHandler writes np.ndarrays
    (same typestr, same files), loading one leaf at a time."""

    async def serialize(self, values, infos, args=None):
      args = args or [ocp.SaveArgs()] * len(values)
      return [ocp.future.CommitFutureAwaitingContractedSignals(
          self._write_one_by_one(values, infos, args), name="fastpersist_export")]

    async def _write_one_by_one(self, values, infos, args):
      for value, info, arg in zip(values, infos, args):
        array = await asyncio.to_thread(value.load)
        await _numpy_write(self, array, info, arg)
        del array

  return StreamingNumpyHandler


async def _numpy_write(handler: Any, array: np.ndarray, info: Any, arg: Any) -> None:
  """Writes one numpy array the way Orbax's NumpyHandler does. The one use of
  a non-public Orbax method (NumpyHandler._background_serialize: its public
  serialize defers the write into a commit future of its own); the orbax
  export test fails if Orbax moves it."""
  await handler._background_serialize([array], [info], [arg])  # pylint: disable=protected-access


def orbax_storage_key(name: str, value: Any) -> tuple[str, tuple[str, ...]] | None:
  """Where Orbax stores a leaf of parameter name `name` (tensor_name) and
  value `value` (as export_orbax passes it): ("zarr", (key prefix,)) for
  arrays and numbers, each a TensorStore array at the key prefix `name`
  with "/" appended unless it ends in one (so "a" and "a/" are one
  array); ("json", tokens) for strings, each a member of _strings.json at
  the JSON pointer "/" + name, whose tokens are `name` split at "/" with
  "~1" and "~0" unescaped; None for None and empty nodes (not stored).
  Raises ExportError for a string whose pointer is not valid JSON Pointer
  (a "~" followed by neither 0 nor 1), which Orbax cannot write."""
  if value is None or isinstance(value, (dict, list, tuple)):
    return None
  if isinstance(value, str):
    if re.search("~(?![01])", name):
      raise ExportError(f"its Orbax parameter name {name!r} is not a valid JSON pointer "
                        "(a '~' followed by neither 0 nor 1)")
    return "json", tuple(t.replace("~1", "/").replace("~0", "~") for t in name.split("/"))
  return "zarr", (name if name.endswith("/") else name + "/",)


def _check_orbax_keys(leaves: list[tuple[str, str, Any]]) -> None:
  """Refuses (ExportError naming both leaves) a tree two of whose leaves
  Orbax would store in one place (orbax_storage_key): its save would fail
  in TensorStore or, for two numbers, silently keep one value for both. Two
  strings collide when one's pointer tokens equal or begin the other's (a
  JSON member cannot be both a string and an object). `leaves`: (keystr
  path, parameter name, value) of every leaf."""
  arrays: dict[tuple[str, ...], tuple[str, str]] = {}
  strings: dict[tuple[str, ...], tuple[str, str]] = {}
  # Proper prefixes of the strings' tokens so far -> a string below it.
  parents: dict[tuple[str, ...], tuple[str, str]] = {}
  for path, name, value in leaves:
    try:
      where = orbax_storage_key(name, value)
    except ExportError as e:
      raise ExportError(f"leaf {path} is a string Orbax cannot store: {e}") from None
    if where is None:
      continue
    store, key = where
    if store == "zarr":
      clash, why = arrays.get(key), "TensorStore keys them alike"
      arrays.setdefault(key, (path, name))
    else:
      clash = strings.get(key) or parents.get(key) or next(
          (strings[key[:n]] for n in range(1, len(key)) if key[:n] in strings), None)
      why = "as strings, one would be nested in the other in Orbax's _strings.json"
      strings.setdefault(key, (path, name))
      for n in range(1, len(key)):
        parents.setdefault(key[:n], (path, name))
    if clash is not None:
      raise ExportError(f"leaves {clash[0]} and {path} have the Orbax parameter names "
                        f"{clash[1]!r} and {name!r}, which Orbax would store in one place "
                        f"({why}); rename one of them")


def export_orbax(item_dir: str, out: str, cast: str | None = None) -> str:
  """Writes the item at `item_dir` as a standard Orbax checkpoint at the new
  path `out`, which `ocp.StandardCheckpointer().restore(out)` (or
  PyTreeCheckpointHandler) reads: arrays come back as numpy arrays, with the
  saved dtype (or `cast`, applied to every array when given). Python scalars
  and strings are written as Orbax writes them; None and empty containers as
  empty nodes.

  Returns:
    `out` as an absolute path.

  Raises:
    ExportError: `out` exists, two leaves map to one Orbax parameter name
      or would be stored by Orbax in one place (names "a" and "a/"; strings
      "x" and "x/y": orbax_storage_key), a string's name is no valid JSON
      pointer ("~" not followed by 0 or 1), an array has no elements, or
      the tree holds no leaf but empty nodes (Orbax refuses the last two).
    CheckpointNotFoundError / CorruptCheckpointError /
      ChecksumMismatchError: no or a damaged checkpoint at `item_dir`.
    Whatever Orbax's save raises (e.g. OSError when `out` cannot be
    written); Orbax's temporary directory is removed, nothing is committed.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(out)
  if os.path.lexists(out):
    raise ExportError(f"{out} already exists; remove it or choose another output")
  target = disk_format.dtype_from_name(cast) if cast else None
  with reader.CheckpointReader(item_dir) as rd:
    items = []
    owner: dict[str, str] = {}
    for i, meta in enumerate(rd.meta.leaves):
      # Orbax names each leaf by its keys joined with ".": two leaves of one
      # name would overwrite each other.
      name = tensor_name(meta.path)
      if name in owner:
        raise ExportError(f"leaves {owner[name]} and {rd.leaf_name(i)} both map to the Orbax "
                          f"parameter name {name!r}")
      owner[name] = rd.leaf_name(i)
      if meta.kind in disk_format.ARRAY_KINDS:
        if 0 in meta.shape:
          raise ExportError(f"leaf {rd.leaf_name(i)} has shape {meta.shape}: Orbax cannot save "
                            "an array with no elements")
        value = _LeafSource(rd, i, target)
      else:
        value = disk_format.plain_value(meta)
        if isinstance(value, complex):
          value = np.complex128(value)
      items.append((meta.path, value))
    _check_orbax_keys([(rd.leaf_name(i), tensor_name(meta.path), value)
                       for i, ((_, value), meta) in enumerate(zip(items, rd.meta.leaves))])
    tree = treepath.unflatten_as_nested(items)
    scalar = ocp.type_handlers.ScalarHandler()
    registry = ocp.type_handlers.create_type_handler_registry(
        (int, scalar), (float, scalar), (bytes, scalar), (np.number, scalar),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (str, ocp.type_handlers.StringHandler()),
        (_LeafSource, _streaming_handler_class()(deepcopy_host_arrays=False)))
    if not jax.tree_util.tree_leaves(tree):
      raise ExportError(f"{item_dir} holds no leaf but empty nodes, which Orbax refuses to save")
    try:
      with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as ckptr:
        ckptr.save(out, args=ocp.args.PyTreeSave(tree))
    except BaseException:
      for tmp in glob.glob(glob.escape(out) + ".orbax-checkpoint-tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)   # nothing half-written is left
      raise
  return out


def main(path: str, out: str, fmt: str, max_shard_bytes: int = 0, cast: str | None = None) -> int:
  """The export command. Exports one item (an item directory, or a step
  directory holding one item) to `out`; a step directory of several items
  is exported item by item into out/<item name>, through a temporary
  directory renamed to `out` at the end (a failing item leaves nothing).
  Prints "wrote PATH" for each file (safetensors) or checkpoint (orbax).

  Args:
    path: an item directory or an Orbax step directory of items.
    out: the output path; it must not exist.
    fmt: "safetensors" or "orbax".
    max_shard_bytes: safetensors: bytes of tensor data per file (0: one
      file).
    cast: dtype name for leaves the format cannot hold (see --cast).

  Returns:
    0 (the exit status).

  Raises:
    ExportError: an unknown `fmt`, or as export_safetensors / export_orbax.
    CheckpointNotFoundError: `path` holds no checkpoint.
    UnsupportedLeafError, CorruptCheckpointError, ChecksumMismatchError,
    OSError: as export_safetensors / export_orbax. __main__ turns these into
    exit statuses 2 (usage: ExportError, CheckpointNotFoundError,
    UnsupportedLeafError, an output path that cannot be made) or 1.
  """
  if fmt not in FORMATS:
    raise ExportError(f"--format must be one of {FORMATS}, got {fmt!r}")
  items = reader.item_directories(path)
  if len(items) == 1:
    written = _export_item(items[0], out, fmt, max_shard_bytes, cast)
  else:
    # Every item into a temporary directory renamed into place at the end:
    # nothing is left at `out` when one item fails.
    tmp = _prepare_out(out)
    try:
      written = [w for item in items for w in
                 _export_item(item, os.path.join(tmp, os.path.basename(item)), fmt,
                              max_shard_bytes, cast)]
      _commit(tmp, out)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    written = [os.path.join(out, os.path.relpath(w, tmp)) for w in written]
  for w in written:
    print(f"wrote {w}")
  return 0


def _export_item(item: str, dest: str, fmt: str, max_shard_bytes: int,
                 cast: str | None) -> list[str]:
  if fmt == "safetensors":
    return export_safetensors(item, dest, max_shard_bytes, cast)
  return [export_orbax(item, dest, cast)]
