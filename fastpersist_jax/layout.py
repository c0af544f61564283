"""The on-disk layout: file names, metadata and manifests (see FORMAT.md).

Everything read back from disk is validated here before it is used: types,
ranges, file names (never a path), and sizes against the real files, so a
damaged or hostile checkpoint produces a CorruptCheckpointError and nothing
else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import numpy as np

from fastpersist_jax import treepath
from fastpersist_jax.errors import CheckpointNotFoundError, CorruptCheckpointError

FORMAT_NAME = "fastpersist"
FORMAT_VERSION = 1
METADATA_FILE = "fastpersist.json"
# Shards start on this boundary in data files: the largest O_DIRECT alignment
# in practice, so every shard can be read straight into an aligned buffer.
SHARD_ALIGN = 4096
# JSON files larger than this are refused without being read.
MAX_JSON_BYTES = 1 << 30

_DATA_RE = re.compile(r"^data\.\d{5}\.\d{4}\.bin$")

LEAF_KINDS = ("array", "numpy", "np_scalar", "scalar", "none", "empty_dict",
              "empty_list", "empty_tuple")
SCALAR_TYPES = ("int", "float", "bool", "complex", "str")


def manifest_name(process_index: int) -> str:
  return f"manifest.{process_index:05d}.json"


def data_file_name(process_index: int, file_index: int) -> str:
  return f"data.{process_index:05d}.{file_index:04d}.bin"


def align_up(n: int, a: int = SHARD_ALIGN) -> int:
  return (n + a - 1) // a * a


@dataclasses.dataclass
class LeafMeta:
  """What is known of one leaf without reading its data."""
  path: list            # encoded key path (treepath.encode)
  kind: str             # one of LEAF_KINDS
  dtype: str | None = None
  shape: tuple[int, ...] | None = None
  sharding: dict | None = None
  value: Any = None     # Python scalars: the value itself
  scalar_type: str | None = None

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(dtype_from_name(self.dtype)).itemsize


@dataclasses.dataclass
class ShardRecord:
  leaf: int
  index: tuple[tuple[int, int], ...]   # [start, stop) per dimension, global
  file: int                            # index into Manifest.files
  offset: int
  nbytes: int
  crc32c: int


@dataclasses.dataclass
class Manifest:
  process_index: int
  files: list[tuple[str, int]]         # (name, size)
  shards: list[ShardRecord]


@dataclasses.dataclass
class CheckpointMetadata:
  process_count: int
  leaves: list[LeafMeta]
  version: int = FORMAT_VERSION


# dtypes ---------------------------------------------------------------------

def dtype_from_name(name: str) -> np.dtype:
  """numpy dtype from its name, including ml_dtypes' (bfloat16, int4, ...)."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top  (jax depends on it)
  try:
    return np.dtype(name)
  except TypeError:
    pass
  t = getattr(ml_dtypes, str(name), None)
  if t is None:
    raise CorruptCheckpointError(f"unknown dtype {name!r}")
  return np.dtype(t)


def dtype_is_supported(dtype: np.dtype) -> bool:
  if dtype.kind in "biufc":
    return True
  # ml_dtypes types (bfloat16, float8_*, int4, ...) are numpy "V" kinds
  # whose names round-trip.
  try:
    return dtype.kind == "V" and dtype.names is None and dtype_from_name(dtype.name) == dtype \
        and dtype.name != "void" and not dtype.name.startswith("void")
  except CorruptCheckpointError:
    return False


# JSON I/O ---------------------------------------------------------------------

def read_json(path: str, what: str) -> Any:
  try:
    size = os.stat(path).st_size
  except FileNotFoundError as e:
    raise CheckpointNotFoundError(f"{what} not found: {path}") from e
  if size > MAX_JSON_BYTES:
    raise CorruptCheckpointError(f"{what} {path} is {size} bytes, over the {MAX_JSON_BYTES} limit")
  with open(path, "rb") as f:
    raw = f.read(MAX_JSON_BYTES + 1)
  try:
    return json.loads(raw)
  except (ValueError, RecursionError) as e:
    raise CorruptCheckpointError(f"{what} {path} is not valid JSON: {e}") from e


def to_json_bytes(obj: Any) -> bytes:
  return json.dumps(obj, separators=(",", ":")).encode()


# Encoding ---------------------------------------------------------------------

def encode_metadata(meta: CheckpointMetadata) -> bytes:
  leaves = []
  for leaf in meta.leaves:
    d = {"path": leaf.path, "kind": leaf.kind}
    if leaf.dtype is not None:
      d["dtype"] = leaf.dtype
    if leaf.shape is not None:
      d["shape"] = list(leaf.shape)
    if leaf.sharding is not None:
      d["sharding"] = leaf.sharding
    if leaf.kind == "scalar":
      d["scalar_type"] = leaf.scalar_type
      d["value"] = [leaf.value.real, leaf.value.imag] if leaf.scalar_type == "complex" else leaf.value
    leaves.append(d)
  return to_json_bytes({"format": FORMAT_NAME, "version": meta.version,
                        "process_count": meta.process_count, "leaves": leaves})


def encode_manifest(m: Manifest) -> bytes:
  return to_json_bytes({
      "format": FORMAT_NAME, "version": FORMAT_VERSION,
      "process_index": m.process_index,
      "files": [{"name": n, "size": s} for n, s in m.files],
      "shards": [{"leaf": s.leaf, "index": [list(r) for r in s.index], "file": s.file,
                  "offset": s.offset, "nbytes": s.nbytes, "crc32c": s.crc32c}
                 for s in m.shards],
  })


# Decoding, with validation ---------------------------------------------------------

def _int(v: Any, what: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
  if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
    raise CorruptCheckpointError(f"{what}: expected an integer in [{lo}, {hi}], got {v!r}")
  return v


def _get(d: Any, key: str, what: str) -> Any:
  if not isinstance(d, dict) or key not in d:
    raise CorruptCheckpointError(f"{what}: missing field {key!r}")
  return d[key]


def _check_header(d: Any, what: str) -> None:
  if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
    raise CorruptCheckpointError(f"{what} is not a {FORMAT_NAME} file")
  version = _get(d, "version", what)
  if version != FORMAT_VERSION:
    raise CorruptCheckpointError(
        f"{what} has format version {version!r}; this fastpersist_jax reads version {FORMAT_VERSION}")


def _decode_leaf(d: Any, i: int) -> LeafMeta:
  what = f"metadata leaf {i}"
  path = treepath.validate(_get(d, "path", what))
  kind = _get(d, "kind", what)
  if kind not in LEAF_KINDS:
    raise CorruptCheckpointError(f"{what}: unknown kind {kind!r}")
  leaf = LeafMeta(path=path, kind=kind)
  if kind in ("array", "numpy", "np_scalar"):
    dtype_name = _get(d, "dtype", what)
    if not isinstance(dtype_name, str):
      raise CorruptCheckpointError(f"{what}: dtype must be a string")
    if not dtype_is_supported(dtype_from_name(dtype_name)):
      raise CorruptCheckpointError(f"{what}: unsupported dtype {dtype_name!r}")
    shape = _get(d, "shape", what)
    if not isinstance(shape, list) or len(shape) > 64:
      raise CorruptCheckpointError(f"{what}: malformed shape {shape!r}")
    leaf.dtype = dtype_name
    leaf.shape = tuple(_int(s, f"{what} shape") for s in shape)
    if math.prod(leaf.shape) > 2**62:
      raise CorruptCheckpointError(f"{what}: shape {leaf.shape} is implausibly large")
    sharding = d.get("sharding")
    if sharding is not None and not isinstance(sharding, dict):
      raise CorruptCheckpointError(f"{what}: malformed sharding")
    leaf.sharding = sharding
  elif kind == "scalar":
    st = _get(d, "scalar_type", what)
    value = _get(d, "value", what)
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, str),
          "complex": lambda v: isinstance(v, list) and len(v) == 2 and all(
              isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)}.get(st)
    if ok is None or not ok(value):
      raise CorruptCheckpointError(f"{what}: malformed scalar {st!r}={value!r}")
    leaf.scalar_type = st
    leaf.value = {"float": float, "complex": lambda v: complex(*v)}.get(st, lambda v: v)(value)
  return leaf


def read_metadata(directory: str) -> CheckpointMetadata:
  path = os.path.join(directory, METADATA_FILE)
  if not os.path.isdir(directory):
    raise CheckpointNotFoundError(f"no checkpoint directory at {directory}")
  d = read_json(path, "checkpoint metadata")
  _check_header(d, path)
  process_count = _int(_get(d, "process_count", path), f"{path} process_count", 1, 1 << 20)
  leaves = _get(d, "leaves", path)
  if not isinstance(leaves, list):
    raise CorruptCheckpointError(f"{path}: leaves must be a list")
  return CheckpointMetadata(process_count=process_count,
                            leaves=[_decode_leaf(l, i) for i, l in enumerate(leaves)])


def read_manifest(directory: str, process_index: int, meta: CheckpointMetadata) -> Manifest:
  """Reads and validates one process's manifest against metadata and files."""
  path = os.path.join(directory, manifest_name(process_index))
  d = read_json(path, f"manifest of process {process_index}")
  _check_header(d, path)
  if _get(d, "process_index", path) != process_index:
    raise CorruptCheckpointError(f"{path}: process_index does not match its file name")
  files_raw = _get(d, "files", path)
  if not isinstance(files_raw, list):
    raise CorruptCheckpointError(f"{path}: files must be a list")
  files = []
  for j, f in enumerate(files_raw):
    name = _get(f, "name", f"{path} file {j}")
    if not isinstance(name, str) or not _DATA_RE.match(name):
      raise CorruptCheckpointError(f"{path}: file {j} has an invalid name {name!r}")
    size = _int(_get(f, "size", f"{path} file {j}"), f"{path} file {j} size")
    try:
      actual = os.stat(os.path.join(directory, name)).st_size
    except FileNotFoundError as e:
      raise CorruptCheckpointError(f"{path}: data file {name} is missing") from e
    if actual != size:
      raise CorruptCheckpointError(
          f"{path}: data file {name} is {actual} bytes, the manifest says {size} (truncated?)")
    files.append((name, size))
  shards_raw = _get(d, "shards", path)
  if not isinstance(shards_raw, list):
    raise CorruptCheckpointError(f"{path}: shards must be a list")
  shards = []
  for j, s in enumerate(shards_raw):
    what = f"{path} shard {j}"
    leaf_id = _int(_get(s, "leaf", what), f"{what} leaf", 0, len(meta.leaves) - 1)
    leaf = meta.leaves[leaf_id]
    if leaf.kind not in ("array", "numpy", "np_scalar"):
      raise CorruptCheckpointError(f"{what}: leaf {leaf_id} holds no array data")
    index_raw = _get(s, "index", what)
    if not isinstance(index_raw, list) or len(index_raw) != len(leaf.shape):
      raise CorruptCheckpointError(f"{what}: index rank does not match shape {leaf.shape}")
    index = []
    for dim, (r, n) in enumerate(zip(index_raw, leaf.shape)):
      if not isinstance(r, list) or len(r) != 2:
        raise CorruptCheckpointError(f"{what}: malformed index {index_raw!r}")
      start = _int(r[0], f"{what} index", 0, n)
      stop = _int(r[1], f"{what} index", start, n)
      index.append((start, stop))
    file_id = _int(_get(s, "file", what), f"{what} file", 0, max(len(files) - 1, 0))
    if not files:
      raise CorruptCheckpointError(f"{what}: refers to a data file but the manifest lists none")
    offset = _int(_get(s, "offset", what), f"{what} offset")
    nbytes = _int(_get(s, "nbytes", what), f"{what} nbytes")
    expected = math.prod(b - a for a, b in index) * dtype_from_name(leaf.dtype).itemsize
    if nbytes != expected:
      raise CorruptCheckpointError(f"{what}: nbytes {nbytes} does not match its index ({expected})")
    if offset + nbytes > files[file_id][1]:
      raise CorruptCheckpointError(f"{what}: extends past the end of {files[file_id][0]}")
    crc = _int(_get(s, "crc32c", what), f"{what} crc32c", 0, 2**32 - 1)
    shards.append(ShardRecord(leaf_id, tuple(index), file_id, offset, nbytes, crc))
  return Manifest(process_index, files, shards)
