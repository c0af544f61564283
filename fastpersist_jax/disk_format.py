"""The on-disk format: file names, metadata and manifests (see FORMAT.md).

Everything read back from disk is validated here before it is used: types,
ranges, file names (never a path), and sizes against the real files, so a
damaged or hostile checkpoint produces a CorruptCheckpointError and nothing
else.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import operator
import os
import re
import reprlib
import stat
from typing import Any

import crc32c
import numpy as np

from fastpersist_jax import checksums, treepath
from fastpersist_jax.errors import (CheckpointNotFoundError, CorruptCheckpointError,
                                    UnsupportedLeafError)

FORMAT_NAME = "fastpersist"
# Version 2 added typed PRNG keys ("prng_impl"), empty custom nodes
# ("empty_node") and the saved devices of a sharding ("device_ids").
# Version 3 records each distinct array description (kind, dtype, shape,
# sharding, PRNG implementation) once, in fastpersist.json's "arrays", and
# array leaves refer to it: 10,000 small leaves of one shape decode in a
# fifth of the time.
FORMAT_VERSION = 3
# Versions this reader understands (what version 1 lacks simply is absent).
READABLE_VERSIONS = (1, 2, 3)
METADATA_FILE = "fastpersist.json"
# The item's custom metadata (FastPersistSave(custom_metadata=...)), written
# by the process that writes METADATA_FILE, only when there is some. Apart
# from the sealed metadata: a process's manifest records the metadata's
# checksum, and custom metadata need not be the same on every process.
CUSTOM_METADATA_FILE = "custom_metadata.json"
# Shards start on this boundary in data files: the largest O_DIRECT alignment
# in practice, so every shard can be read straight into an aligned buffer.
SHARD_ALIGN = 4096
# JSON files larger than this are refused without being read.
MAX_JSON_BYTES = 1 << 30

_DATA_RE = re.compile(r"data\.([0-9]{5})\.[0-9]{4}\.bin")
# Canonical dtype names, as np.dtype(...).name writes them (float32, bfloat16, ...).
_DTYPE_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_SAVED_AXIS_TYPES = ("Explicit", "Auto", "Manual")

# The kinds of leaf (LeafMeta.kind; FORMAT.md's `kind`), each defined once,
# here: restore and the host-side tools (reader, verify, inspect, export,
# recovery) use these, never a table of their own.
# Kinds whose bytes are in data files.
ARRAY_KINDS = ("array", "numpy", "np_scalar")
# Kinds with no data: a Python scalar (its value is in the metadata) and the
# leaves whose kind alone is their value (restore gives a fresh one of these).
_EMPTY_VALUES = {"none": lambda: None, "empty_dict": dict, "empty_list": list,
                 "empty_tuple": tuple, "empty_node": lambda: None}
PLAIN_KINDS = ("scalar", *_EMPTY_VALUES)
LEAF_KINDS = ARRAY_KINDS + PLAIN_KINDS
# Typed PRNG key implementations (jax.random.key_impl) a checkpoint may name.
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
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
  # Typed PRNG keys: the implementation's name. dtype and shape are then
  # those of jax.random.key_data (uint32, the key shape + the impl's shape).
  prng_impl: str | None = None


def plain_value(meta: LeafMeta) -> Any:
  """The value of a leaf with no array data (a kind in PLAIN_KINDS), as a
  restore without a target gives it: a Python scalar's saved value; None for
  `none` and for `empty_node` (an empty custom node such as
  optax.EmptyState(), whose type is not saved); a new {}, [] or () for the
  empty containers. Raises ValueError for an array kind (its value is in the
  data files: reader.CheckpointReader.read_leaf)."""
  if meta.kind == "scalar":
    return meta.value
  make = _EMPTY_VALUES.get(meta.kind)
  if make is None:
    raise ValueError(f"a leaf of kind {meta.kind!r} has no plain value")
  return make()


# A shard's index: [start, stop) per dimension of the global array (JAX's
# Shard.index with the slices as integer ranges). The one definition of it.
Index = tuple[tuple[int, int], ...]


@dataclasses.dataclass
class ShardRecord:
  leaf: int
  index: Index                         # [start, stop) per dimension, global
  file: int                            # index into Manifest.files
  offset: int
  nbytes: int
  crc32c: int
  # Byte range of the shard's C-order bytes this record holds, when the shard
  # was split among the processes holding replicas of it; None: all of it.
  part: tuple[int, int] | None = None
  # CRC-32C of each Manifest.crc_chunk_bytes-long chunk of the record's bytes
  # (the last one shorter), for records longer than one chunk; else None.
  chunk_crc32c: tuple[int, ...] | None = None
  chunk_bytes: int | None = None       # that chunk size, where chunk_crc32c is set


@dataclasses.dataclass
class Manifest:
  process_index: int
  files: list[tuple[str, int]]         # (name, size)
  shards: list[ShardRecord]
  # The "crc32c" of the fastpersist.json written by the same save (version 2):
  # a manifest is never read against another save's metadata.
  metadata_crc32c: int | None = None
  # Chunk size of the records' chunk_crc32c (None: no record has them).
  crc_chunk_bytes: int | None = None


@dataclasses.dataclass
class CheckpointMetadata:
  process_count: int
  leaves: list[LeafMeta]
  version: int = FORMAT_VERSION
  # "shared": one directory, every process's manifest in it. "per_host": each
  # process wrote its own directory holding what its devices need.
  placement: str = "shared"
  # Per-host checkpoints whose replicated shards were split among the hosts:
  # an id all hosts agreed on for this save, so that a restore never combines
  # parts of different saves.
  save_id: str | None = None
  # The document's own "crc32c" as read (None: version 1, or not read yet).
  seal: int | None = None


# dtypes ---------------------------------------------------------------------

# dtypes by their canonical names (a finite set), as dtype_from_name found
# them: restore asks once per leaf.
_DTYPES_BY_NAME: dict[str, np.dtype] = {}


def dtype_from_name(name: str) -> np.dtype:
  """numpy dtype from its name, including ml_dtypes' (bfloat16, int4, ...)."""
  if type(name) is str:  # pylint: disable=unidiomatic-typecheck
    known = _DTYPES_BY_NAME.get(name)
    if known is not None:
      return known
  dtype = _resolve_dtype(name)
  if dtype.name == name:
    _DTYPES_BY_NAME[name] = dtype
  return dtype


def _resolve_dtype(name: Any) -> np.dtype:
  import ml_dtypes  # pylint: disable=g-import-not-at-top  (jax depends on it)
  if not isinstance(name, str):
    raise CorruptCheckpointError(f"dtype must be a string, got {_short(name)}")
  try:
    return np.dtype(name)
  except Exception:  # pylint: disable=broad-except  (TypeError, but SyntaxError for "f4,(")
    pass
  t = getattr(ml_dtypes, name, None)
  # Only ml_dtypes' scalar types, not any attribute (ml_dtypes.__name__, finfo).
  if not (isinstance(t, type) and issubclass(t, np.generic)):
    raise CorruptCheckpointError(f"unknown dtype {_short(name)}")
  return np.dtype(t)


def _jax_can_hold(dtype: np.dtype) -> bool:
  """False for numpy-only types (float128, complex256) that no jax.Array has."""
  return not ((dtype.kind == "f" and dtype.itemsize > 8) or
              (dtype.kind == "c" and dtype.itemsize > 16))


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

def read_json(path: str, what: str) -> tuple[Any, bytes]:
  """The decoded JSON of the file at `path` and its bytes. Raises
  CheckpointNotFoundError (no file) or CorruptCheckpointError (not a regular
  file, over MAX_JSON_BYTES, unreadable, not JSON), naming `what` and `path`."""
  try:
    st = os.stat(path)
  except FileNotFoundError as e:
    raise CheckpointNotFoundError(f"{what} not found: {path}") from e
  except OSError as e:
    raise CorruptCheckpointError(f"{what} {path} cannot be read: {e}") from e
  if not stat.S_ISREG(st.st_mode):  # a FIFO would block open(), a device never end
    raise CorruptCheckpointError(f"{what} {path} is not a regular file")
  if st.st_size > MAX_JSON_BYTES:
    raise CorruptCheckpointError(
        f"{what} {path} is {st.st_size} bytes, over the {MAX_JSON_BYTES} limit")
  try:
    with open(path, "rb") as f:
      raw = f.read(MAX_JSON_BYTES + 1)
  except OSError as e:
    raise CorruptCheckpointError(f"{what} {path} cannot be read: {e}") from e
  if len(raw) > MAX_JSON_BYTES:
    raise CorruptCheckpointError(f"{what} {path} grew past the {MAX_JSON_BYTES} limit")
  try:
    return json.loads(raw), raw
  except (ValueError, RecursionError) as e:
    raise CorruptCheckpointError(f"{what} {path} is not valid JSON: {_short(str(e))}") from e


def to_json_bytes(obj: Any) -> bytes:
  return json.dumps(obj, separators=(",", ":")).encode()


def seal(doc: dict) -> bytes:
  """`doc` as JSON, with a last field "crc32c": the CRC-32C of the JSON of
  everything before it. Data bytes have their own CRCs; this one covers what
  says where they go and what they are (dtype, shape, index, offset), so a
  damaged manifest or metadata file can never restore wrong values."""
  return to_json_bytes({**doc, "crc32c": crc32c.crc32c(to_json_bytes(doc))})


def seal_value(sealed: bytes) -> int:
  """The "crc32c" that seal() wrote last into `sealed` (its own output),
  read from the end without decoding the document."""
  return int(sealed[sealed.rindex(b":") + 1:-1])


def _check_seal(d: dict, what: str, raw: bytes | None = None) -> None:
  """Version 2 documents must carry a matching "crc32c" (see seal); one of
  any version that carries it must match (a "version" damaged into 1 must
  not switch the check off). `raw`: the bytes `d` was decoded from, if at
  hand. Bytes as seal() writes them (the body's JSON, then ',"crc32c":N}')
  are checked as they are, without encoding `d` again (10,000 leaves:
  0.04 s saved per document); any other spelling of the same JSON is
  checked by encoding it again."""
  if d["version"] < 2 and "crc32c" not in d:
    return
  crc = _get(d, "crc32c", what)
  if raw is not None and _is_int(crc) and _seal_of_bytes(raw, crc):
    return
  body = {k: v for k, v in d.items() if k != "crc32c"}
  if not _is_int(crc) or crc != crc32c.crc32c(to_json_bytes(body)):
    raise CorruptCheckpointError(
        f"{what}: the file's checksum does not match its contents (damaged or edited after "
        "it was written)")


def _seal_of_bytes(raw: bytes, crc: int) -> bool:
  """Whether `raw` ends as seal() ends a document sealed with `crc`, and
  the JSON of the body before it has that CRC-32C."""
  tail = b',"crc32c":' + str(crc).encode() + b"}"
  if not raw.endswith(tail):
    return False
  body = memoryview(raw)[:len(raw) - len(tail)]
  return crc32c.crc32c(b"}", crc32c.crc32c(body)) == crc


# Custom metadata --------------------------------------------------------------

def encode_custom_metadata(value: Any, what: str = "custom_metadata") -> bytes:
  """CUSTOM_METADATA_FILE's bytes for `value`, sealed. Raises
  UnsupportedLeafError (a TypeError) naming `what` when `value` is not plain
  JSON (dicts with str keys, lists, str, finite numbers, bool, None) or its
  encoding is over MAX_JSON_BYTES."""
  try:
    _check_json_keys(value)
    json.dumps(value, allow_nan=False)
  except (TypeError, ValueError, RecursionError) as e:
    raise UnsupportedLeafError(f"{what} must be plain JSON: {_short(str(e))}") from e
  raw = seal({"format": FORMAT_NAME, "version": FORMAT_VERSION, "custom_metadata": value})
  if len(raw) > MAX_JSON_BYTES:
    raise UnsupportedLeafError(f"{what} is {len(raw)} bytes as JSON, over the "
                               f"{MAX_JSON_BYTES} limit")
  return raw


def _check_json_keys(value: Any) -> None:
  """Raises TypeError for a dict key that is not a str: JSON would turn it
  into one, and the metadata would not read back as saved. (Tuples read back
  as lists, as with Orbax's custom metadata.)"""
  if isinstance(value, dict):
    for k, v in value.items():
      if not isinstance(k, str):
        raise TypeError(f"dict key {k!r} is not a str")
      _check_json_keys(v)
  elif isinstance(value, (list, tuple)):
    for v in value:
      _check_json_keys(v)


def read_custom_metadata(directory: str) -> Any:
  """The custom metadata saved with the item in `directory`, or None when
  none was. Raises CorruptCheckpointError naming the file when it is
  damaged."""
  path = os.path.join(directory, CUSTOM_METADATA_FILE)
  if not os.path.lexists(path):
    return None
  d, raw = read_json(path, "custom metadata")
  _check_header(d, path)
  _check_seal(d, path, raw)
  return _get(d, "custom_metadata", path)


# Encoding ---------------------------------------------------------------------

def encode_metadata(meta: CheckpointMetadata) -> bytes:
  """fastpersist.json's bytes, sealed, in `meta.version`'s form: from
  version 3, each distinct array description once in "arrays" (leaves with
  equal fields and the same sharding record object share one; plan.py hands
  equal shardings one record), array leaves as {"path", "array": its
  position there}."""
  arrays: list[dict] = []
  array_ids: dict[tuple, int] = {}
  leaves = []
  for leaf in meta.leaves:
    if meta.version >= 3 and leaf.kind in ARRAY_KINDS:
      key = (leaf.kind, leaf.dtype, leaf.shape, leaf.prng_impl, id(leaf.sharding))
      array_id = array_ids.get(key)
      if array_id is None:
        array_id = array_ids[key] = len(arrays)
        arrays.append(_array_fields(leaf))
      leaves.append({"path": leaf.path, "array": array_id})
      continue
    d = {"path": leaf.path, "kind": leaf.kind}
    if leaf.dtype is not None:
      d["dtype"] = leaf.dtype
    if leaf.shape is not None:
      d["shape"] = list(leaf.shape)
    if leaf.sharding is not None:
      d["sharding"] = leaf.sharding
    if leaf.prng_impl is not None:
      d["prng_impl"] = leaf.prng_impl
    if leaf.kind == "scalar":
      d["scalar_type"] = leaf.scalar_type
      d["value"] = [leaf.value.real, leaf.value.imag] if leaf.scalar_type == "complex" else leaf.value
    leaves.append(d)
  return seal({"format": FORMAT_NAME, "version": meta.version,
                        "process_count": meta.process_count, "layout": meta.placement,
                        **({"save_id": meta.save_id} if meta.save_id else {}),
                        **({"arrays": arrays} if meta.version >= 3 else {}),
                        "leaves": leaves})


def _array_fields(leaf: LeafMeta) -> dict:
  """An array leaf's description without its path (an "arrays" entry)."""
  d = {"kind": leaf.kind, "dtype": leaf.dtype, "shape": list(leaf.shape)}
  if leaf.sharding is not None:
    d["sharding"] = leaf.sharding
  if leaf.prng_impl is not None:
    d["prng_impl"] = leaf.prng_impl
  return d


def encode_manifest(m: Manifest) -> bytes:
  return seal({
      "format": FORMAT_NAME, "version": FORMAT_VERSION,
      "process_index": m.process_index,
      "files": [{"name": n, "size": s} for n, s in m.files],
      "shards": [dict({"leaf": s.leaf, "index": [list(r) for r in s.index], "file": s.file,
                       "offset": s.offset, "nbytes": s.nbytes, "crc32c": s.crc32c},
                      **({"part": list(s.part)} if s.part is not None else {}),
                      **({"chunk_crc32c": list(s.chunk_crc32c)}
                         if s.chunk_crc32c is not None else {}))
                 for s in m.shards],
      **({"metadata_crc32c": m.metadata_crc32c} if m.metadata_crc32c is not None else {}),
      **({"crc_chunk_bytes": m.crc_chunk_bytes} if m.crc_chunk_bytes is not None else {}),
  })


# Decoding, with validation ---------------------------------------------------------
#
# Everything below treats the decoded JSON as hostile: any type may appear
# anywhere, numbers may be huge or negative, lists may be nested thousands of
# levels deep. Messages quote values through _short() (bounded size and
# depth), and nothing is allocated or opened from a size or name until it has
# been checked against the checkpoint's real files.

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = _repr.maxother = _repr.maxlong = 80
_repr.maxlist = _repr.maxdict = _repr.maxtuple = 6


def _short(v: Any) -> str:
  """repr() for messages, safe on huge or deeply nested values."""
  try:
    return _repr.repr(v)
  except Exception:  # pylint: disable=broad-except
    return f"<{type(v).__name__}>"


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _int(v: Any, what: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
  if not _is_int(v) or not lo <= v <= hi:
    raise CorruptCheckpointError(f"{what}: expected an integer in [{lo}, {hi}], got {_short(v)}")
  return v


def _get(d: Any, key: str, what: str) -> Any:
  if not isinstance(d, dict) or key not in d:
    raise CorruptCheckpointError(f"{what}: missing field {key!r}")
  return d[key]


def _check_header(d: Any, what: str) -> None:
  if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
    raise CorruptCheckpointError(f"{what} is not a {FORMAT_NAME} file")
  version = _get(d, "version", what)
  if not _is_int(version) or version not in READABLE_VERSIONS:
    raise CorruptCheckpointError(
        f"{what} has format version {_short(version)}; this fastpersist_jax reads versions "
        f"{list(READABLE_VERSIONS)}")


def _decode_dtype(name: Any, kind: str, what: str) -> str:
  if not isinstance(name, str) or not _DTYPE_NAME_RE.fullmatch(name):
    raise CorruptCheckpointError(f"{what}: malformed dtype {_short(name)}")
  try:
    dtype = dtype_from_name(name)
  except CorruptCheckpointError as e:
    raise CorruptCheckpointError(f"{what}: {e}") from e
  # Only the names the writer produces (np.dtype(...).name): no byte order
  # (">f4"), aliases ("i4"), structured or sub-array types.
  if dtype.name != name or not dtype.isnative or not dtype_is_supported(dtype):
    raise CorruptCheckpointError(f"{what}: unsupported dtype {_short(name)}")
  if kind == "array" and not _jax_can_hold(dtype):
    raise CorruptCheckpointError(f"{what}: dtype {name} is not a jax.Array dtype")
  return name


def _check_sharding(d: Any, shape: tuple[int, ...], what: str) -> None:
  """A saved sharding must be one a jax.Array of `shape` could have had."""
  if d is None:
    return
  if not isinstance(d, dict):
    raise CorruptCheckpointError(f"{what}: malformed sharding {_short(d)}")
  memory_kind = d.get("memory_kind")
  if memory_kind is not None and not isinstance(memory_kind, str):
    raise CorruptCheckpointError(f"{what}: malformed sharding memory_kind {_short(memory_kind)}")
  device_ids = d.get("device_ids")
  if device_ids is not None and (
      not isinstance(device_ids, list) or len(device_ids) > 1 << 20 or
      not all(_is_int(i) and 0 <= i < 2**31 for i in device_ids) or
      len(set(device_ids)) != len(device_ids)):
    raise CorruptCheckpointError(f"{what}: malformed sharding device_ids {_short(device_ids)}")
  if d.get("type") == "single" and device_ids is not None and len(device_ids) != 1:
    raise CorruptCheckpointError(f"{what}: a single-device sharding names {len(device_ids)} devices")
  if d.get("type") != "named":
    return  # "single", or one that restore does not rebuild ("other")
  mesh_shape = d.get("mesh_shape")
  names = d.get("axis_names")
  spec = d.get("spec")
  axis_types = d.get("axis_types")
  if (not isinstance(mesh_shape, list) or len(mesh_shape) > 64 or
      not all(_is_int(n) and 1 <= n <= 2**31 for n in mesh_shape)):
    raise CorruptCheckpointError(f"{what}: malformed sharding mesh_shape {_short(mesh_shape)}")
  if (not isinstance(names, list) or len(names) != len(mesh_shape) or
      not all(isinstance(a, str) for a in names) or len(set(names)) != len(names)):
    raise CorruptCheckpointError(
        f"{what}: sharding axis_names {_short(names)} do not match mesh_shape {_short(mesh_shape)}")
  if device_ids is not None and len(device_ids) != math.prod(mesh_shape):
    raise CorruptCheckpointError(
        f"{what}: sharding device_ids {_short(device_ids)} do not fill mesh_shape {mesh_shape}")
  if axis_types is not None and (not isinstance(axis_types, list) or not all(
      t in _SAVED_AXIS_TYPES for t in axis_types) or len(axis_types) not in (0, len(names))):
    raise CorruptCheckpointError(f"{what}: malformed sharding axis_types {_short(axis_types)}")
  if not isinstance(spec, list) or len(spec) > len(shape):
    raise CorruptCheckpointError(
        f"{what}: sharding spec {_short(spec)} does not fit an array of rank {len(shape)}")
  sizes = dict(zip(names, mesh_shape))
  used: set[str] = set()
  for dim, entry in enumerate(spec):
    axes = [] if entry is None else [entry] if isinstance(entry, str) else entry
    if not isinstance(axes, list) or not all(isinstance(a, str) and a in sizes for a in axes):
      raise CorruptCheckpointError(f"{what}: sharding spec entry {_short(entry)} names no mesh axis")
    if used.intersection(axes) or len(set(axes)) != len(axes):
      raise CorruptCheckpointError(f"{what}: sharding spec {_short(spec)} uses a mesh axis twice")
    used.update(axes)
    parts = math.prod(sizes[a] for a in axes)
    if shape[dim] % parts:
      raise CorruptCheckpointError(
          f"{what}: dimension {dim} of size {shape[dim]} cannot be split {parts} ways")


def _decode_scalar(d: Any, what: str) -> tuple[str, Any]:
  st = _get(d, "scalar_type", what)
  value = _get(d, "value", what)
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  ok = {"int": _is_int,
        "float": number,
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "complex": lambda v: isinstance(v, list) and len(v) == 2 and all(map(number, v))}
  if not isinstance(st, str) or st not in ok or not ok[st](value):
    raise CorruptCheckpointError(f"{what}: malformed scalar {_short(st)}={_short(value)}")
  try:
    if st == "float":
      value = float(value)
    elif st == "complex":
      value = complex(float(value[0]), float(value[1]))
  except OverflowError as e:  # an int too large for a float
    raise CorruptCheckpointError(f"{what}: scalar {_short(value)} is out of range") from e
  return st, value


# Fields of an array leaf's record besides its path. Many leaves share all of
# them (10,000 small leaves of one dtype on one device): decode_metadata
# validates each distinct combination once (keyed by its repr, exact for JSON
# values) and then only the path (see _decode_leaf).
_ARRAY_FIELDS = ("kind", "dtype", "shape", "sharding", "prng_impl")
_KNOWN_FIELDS = frozenset(("path",) + _ARRAY_FIELDS)


def _array_fields_key(d: Any) -> str | None:
  """The repr of an array leaf's non-path fields, or None where the record is
  not a plain array record (it is then validated in full)."""
  if not isinstance(d, dict) or d.get("kind") not in ARRAY_KINDS or not _KNOWN_FIELDS.issuperset(d):
    return None
  try:
    return repr((d.get("kind"), d.get("dtype"), d.get("shape"), d.get("sharding"),
                 d.get("prng_impl")))   # _ARRAY_FIELDS, spelled out: 10,000 calls
  except RecursionError:
    return None


def _decode_leaves(leaves: list, path: str) -> list[LeafMeta]:
  """Every leaf record of a version 1 or 2 metadata document, validated."""
  decoded = []
  seen: dict[str, LeafMeta] = {}
  for i, d in enumerate(leaves):
    key = _array_fields_key(d)
    known = seen.get(key) if key is not None else None
    if known is None:
      leaf = _decode_leaf(d, i)
      if key is not None:
        seen[key] = leaf
    else:
      leaf = LeafMeta(_leaf_path(d, i), known.kind, known.dtype,
                      known.shape, known.sharding, prng_impl=known.prng_impl)
    decoded.append(leaf)
  return decoded


def _decode_leaves_v3(leaves: list, arrays: Any, path: str) -> list[LeafMeta]:
  """Every leaf record of a version 3 metadata document, validated: each
  "arrays" entry once (named in errors by the first leaf referring to it),
  then each leaf's path and reference."""
  if not isinstance(arrays, list):
    raise CorruptCheckpointError(f"{path}: arrays must be a list")
  described: list[LeafMeta | None] = [None] * len(arrays)
  decoded = []
  for i, d in enumerate(leaves):
    if type(d) is dict and "array" in d:  # pylint: disable=unidiomatic-typecheck
      array_id = d["array"]
      known = (described[array_id] if type(array_id) is int and 0 <= array_id < len(arrays)  # pylint: disable=unidiomatic-typecheck
               else None)
      if known is None:
        what = f"metadata leaf {i}"
        if type(array_id) is not int or not 0 <= array_id < len(arrays):  # pylint: disable=unidiomatic-typecheck
          raise CorruptCheckpointError(
              f"{what}: array {_short(array_id)} is not one of the {len(arrays)} in arrays")
        known = described[array_id] = _decode_array(arrays[array_id], what)
      if len(d) != 2:
        raise CorruptCheckpointError(f"metadata leaf {i}: malformed array leaf {_short(d)}")
      decoded.append(LeafMeta(_leaf_path(d, i), known.kind, known.dtype,
                              known.shape, known.sharding, prng_impl=known.prng_impl))
      continue
    leaf = _decode_leaf(d, i)
    if leaf.kind in ARRAY_KINDS:
      raise CorruptCheckpointError(
          f"metadata leaf {i}: an array leaf of version 3 refers to an \"arrays\" entry")
    decoded.append(leaf)
  for j, known in enumerate(described):
    if known is None:   # described but unused: still well-formed
      _decode_array(arrays[j], f"metadata array {j}")
  return decoded


def _decode_array(d: Any, what: str) -> LeafMeta:
  """An "arrays" entry (version 3), validated; its path is left empty."""
  if not isinstance(d, dict) or d.get("kind") not in ARRAY_KINDS:
    raise CorruptCheckpointError(f"{what}: not an array description: {_short(d)}")
  return _decode_fields(d, [], what)


def _decode_leaf(d: Any, i: int) -> LeafMeta:
  return _decode_fields(d, _leaf_path(d, i), f"metadata leaf {i}")


def _leaf_path(d: Any, i: int) -> list:
  """Leaf record i's (`d`'s) key path, validated; errors name the leaf."""
  try:
    path = d["path"]
  except (KeyError, TypeError, IndexError):
    path = _get(d, "path", f"metadata leaf {i}")   # raises, naming the field
  try:
    return treepath.validate(path)
  except CorruptCheckpointError as e:
    raise CorruptCheckpointError(f"metadata leaf {i}: {e}") from e


def _decode_fields(d: Any, path: list, what: str) -> LeafMeta:
  """The leaf at `path` (already validated) that record `d` describes."""
  kind = _get(d, "kind", what)
  if not isinstance(kind, str) or kind not in LEAF_KINDS:
    raise CorruptCheckpointError(f"{what}: unknown kind {_short(kind)}")
  leaf = LeafMeta(path=path, kind=kind)
  if kind in ARRAY_KINDS:
    leaf.dtype = _decode_dtype(_get(d, "dtype", what), kind, what)
    shape = _get(d, "shape", what)
    if not isinstance(shape, list) or len(shape) > 64:
      raise CorruptCheckpointError(f"{what}: malformed shape {_short(shape)}")
    leaf.shape = tuple(_int(s, f"{what} shape") for s in shape)
    if math.prod(leaf.shape) > 2**62:
      raise CorruptCheckpointError(f"{what}: shape {_short(leaf.shape)} is implausibly large")
    if kind == "np_scalar" and leaf.shape:
      raise CorruptCheckpointError(f"{what}: a numpy scalar has shape (), not {leaf.shape}")
    sharding = d.get("sharding")
    if kind == "array":
      prng_impl = d.get("prng_impl")
      if prng_impl is not None:
        if prng_impl not in PRNG_IMPLS or leaf.dtype != "uint32" or not leaf.shape:
          raise CorruptCheckpointError(f"{what}: malformed PRNG key record {_short(prng_impl)}")
        leaf.prng_impl = prng_impl
      # A key array's sharding covers the key shape, without the impl's dims.
      _check_sharding(sharding, leaf.shape[:-1] if prng_impl else leaf.shape, what)
    else:   # numpy leaves: restore may still rebuild the recorded sharding for a target
      _check_sharding(sharding, leaf.shape, what)
    leaf.sharding = sharding
  elif kind == "scalar":
    leaf.scalar_type, leaf.value = _decode_scalar(d, what)
  return leaf


def _check_paths(leaves: list[LeafMeta], where: str) -> None:
  """Leaf paths must be distinct, and none may lie inside another leaf."""
  leaf_mark = object()
  root: dict = {}
  for i, leaf in enumerate(leaves):
    node = root
    clash = False
    for kind, key in leaf.path:
      if leaf_mark in node:  # a leaf's path is a prefix of this one
        clash = True
        break
      node = node.setdefault((kind, key), {})
    if clash or node:  # ... or this one is (a prefix of) an earlier leaf's path
      raise CorruptCheckpointError(
          f"{where}: leaf {i} ({_short(treepath.to_str(leaf.path))}) repeats or contains "
          "another leaf's path")
    node[leaf_mark] = i


def read_metadata(directory: str) -> CheckpointMetadata:
  """Reads and validates `directory`'s fastpersist.json.

  Raises CheckpointNotFoundError (no directory or no metadata file) or
  CorruptCheckpointError naming the file and the field at fault.
  """
  path = os.path.join(directory, METADATA_FILE)
  if not os.path.isdir(directory):
    raise CheckpointNotFoundError(f"no checkpoint directory at {directory}")
  d, raw = read_json(path, "checkpoint metadata")
  return decode_metadata(d, path, raw)


def decode_metadata_bytes(raw: bytes, where: str) -> CheckpointMetadata:
  """Validates and decodes the bytes of a fastpersist.json (e.g. received
  from another host); `where` names them in errors. Raises
  CorruptCheckpointError."""
  if len(raw) > MAX_JSON_BYTES:
    raise CorruptCheckpointError(f"{where} is {len(raw)} bytes, over the {MAX_JSON_BYTES} limit")
  try:
    d = json.loads(raw)
  except (ValueError, RecursionError) as e:
    raise CorruptCheckpointError(f"{where} is not valid JSON: {_short(str(e))}") from e
  return decode_metadata(d, where, raw)


def decode_metadata(d: Any, path: str, raw: bytes | None = None) -> CheckpointMetadata:
  """Validates decoded JSON of fastpersist.json (named `path` in messages;
  `raw`: the bytes it was decoded from, if at hand). Raises
  CorruptCheckpointError naming the field at fault."""
  _check_header(d, path)
  _check_seal(d, path, raw)
  process_count = _int(_get(d, "process_count", path), f"{path} process_count", 1, 1 << 20)
  leaves = _get(d, "leaves", path)
  if not isinstance(leaves, list):
    raise CorruptCheckpointError(f"{path}: leaves must be a list")
  try:
    if d["version"] >= 3:
      decoded = _decode_leaves_v3(leaves, _get(d, "arrays", path), path)
    else:
      decoded = _decode_leaves(leaves, path)
  except CorruptCheckpointError as e:
    if str(e).startswith(f"{path}:"):
      raise
    raise CorruptCheckpointError(f"{path}: {e}") from e   # name the file too
  _check_paths(decoded, path)
  mode = d.get("layout", "shared")   # the placement; its on-disk key is "layout" (FORMAT.md)
  if mode not in ("shared", "per_host"):
    raise CorruptCheckpointError(f"{path}: unknown placement {_short(mode)}")
  save_id = d.get("save_id")
  if save_id is not None and (not isinstance(save_id, str) or not 0 < len(save_id) <= 128):
    raise CorruptCheckpointError(f"{path}: malformed save_id {_short(save_id)}")
  return CheckpointMetadata(process_count=process_count, leaves=decoded, placement=mode,
                            save_id=save_id, version=d["version"], seal=d.get("crc32c"))


def _check_file(directory: str, name: str, size: int, what: str) -> None:
  try:
    st = os.stat(os.path.join(directory, name))
  except FileNotFoundError as e:
    raise CorruptCheckpointError(f"{what}: data file {name} is missing") from e
  except OSError as e:
    raise CorruptCheckpointError(f"{what}: data file {name} cannot be examined: {e}") from e
  if not stat.S_ISREG(st.st_mode):
    raise CorruptCheckpointError(f"{what}: data file {name} is not a regular file")
  if st.st_size != size:
    raise CorruptCheckpointError(
        f"{what}: data file {name} is {st.st_size} bytes, the manifest says {size} (truncated?)")


def check_grid(indices: list[Index], what: str) -> None:
  """Non-empty shard indices of one array must be cells of one grid (as every
  jax sharding makes them): per dimension, ranges equal or disjoint. Then
  distinct cells never overlap, so counting covered elements proves every
  element of a region is written exactly once."""
  nonempty = [idx for idx in indices if all(a < b for a, b in idx)]
  for dim in range(len(nonempty[0]) if nonempty else 0):
    ranges = sorted({idx[dim] for idx in nonempty})
    for (a0, a1), (b0, _) in zip(ranges, ranges[1:]):
      if b0 < a1:
        raise CorruptCheckpointError(
            f"{what} overlap along dimension {dim} ([{a0}, {a1}) and [{b0}, ...))")


def check_shard_tiling(shards: list[ShardRecord], files: list[tuple[str, int]] | None,
                       what: str) -> None:
  """Shards must not share file bytes, nor (per leaf) array elements.

  Non-empty shards of one leaf must be cells of one grid (as every jax
  sharding produces): along each dimension their ranges are equal or
  disjoint, and no cell appears twice. With that, restore's coverage count
  can only reach a region's size when every element is covered exactly once:
  a duplicated shard cannot hide a missing one and leave memory unwritten.
  With `files` (shards of one manifest), byte ranges in a file must not
  overlap either, so a restore never reads (and allocates) more than the
  data files hold. The records must be validated ones (nbytes matching
  index and part): a record of no bytes holds nothing and is skipped.
  """
  nonempty = [s for s in shards if s.nbytes]
  shards_per_leaf = collections.Counter(s.leaf for s in nonempty)
  by_leaf: dict[int, list[ShardRecord]] = {}
  for s in nonempty:
    if shards_per_leaf[s.leaf] > 1:   # one shard overlaps nothing
      by_leaf.setdefault(s.leaf, []).append(s)
  for leaf_id, group in by_leaf.items():
    check_grid([s.index for s in group], f"{what}: shards of leaf {leaf_id}")
    # Parts of one shard (replica-parallel writes) share its index.
    if len({(s.index, s.part) for s in group}) != len(group):
      raise CorruptCheckpointError(f"{what}: leaf {leaf_id} has the same shard more than once")
  if files is None:
    return
  in_files = sorted(nonempty, key=operator.attrgetter("file", "offset"))
  for a, b in zip(in_files, in_files[1:]):
    if a.file == b.file and b.offset < a.offset + a.nbytes:
      raise CorruptCheckpointError(
          f"{what}: shards at offsets {a.offset} and {b.offset} of {files[a.file][0]} overlap")


def _checked_shard(s: Any, what: str, meta: CheckpointMetadata,
                   files: list[tuple[str, int]], chunk_bytes: int | None) -> ShardRecord:
  """Shard record `s` (named `what` in errors), validated field by field;
  `chunk_bytes` is the manifest's crc_chunk_bytes. Raises
  CorruptCheckpointError naming the field at fault."""
  leaf_id = _int(_get(s, "leaf", what), f"{what} leaf", 0, len(meta.leaves) - 1)
  leaf = meta.leaves[leaf_id]
  if leaf.kind not in ARRAY_KINDS:
    raise CorruptCheckpointError(f"{what}: leaf {leaf_id} holds no array data")
  index_raw = _get(s, "index", what)
  if not isinstance(index_raw, list) or len(index_raw) != len(leaf.shape):
    raise CorruptCheckpointError(f"{what}: index rank does not match shape {leaf.shape}")
  index = []
  for r, n in zip(index_raw, leaf.shape):
    if not isinstance(r, list) or len(r) != 2:
      raise CorruptCheckpointError(f"{what}: malformed index {_short(index_raw)}")
    start = _int(r[0], f"{what} index", 0, n)
    stop = _int(r[1], f"{what} index", start, n)
    index.append((start, stop))
  file_id = _int(_get(s, "file", what), f"{what} file", 0, max(len(files) - 1, 0))
  if not files:
    raise CorruptCheckpointError(f"{what}: refers to a data file but the manifest lists none")
  offset = _int(_get(s, "offset", what), f"{what} offset")
  if offset % SHARD_ALIGN:
    raise CorruptCheckpointError(f"{what}: offset {offset} is not {SHARD_ALIGN}-byte aligned")
  nbytes = _int(_get(s, "nbytes", what), f"{what} nbytes")
  expected = math.prod(b - a for a, b in index) * dtype_from_name(leaf.dtype).itemsize
  part = None
  if "part" in s:
    raw_part = s["part"]
    if (not isinstance(raw_part, list) or len(raw_part) != 2):
      raise CorruptCheckpointError(f"{what}: malformed part {_short(raw_part)}")
    start = _int(raw_part[0], f"{what} part", 0, expected)
    stop = _int(raw_part[1], f"{what} part", start, expected)
    part = (start, stop)
    expected = stop - start
  if nbytes != expected:
    raise CorruptCheckpointError(f"{what}: nbytes {nbytes} does not match its index ({expected})")
  if offset + nbytes > files[file_id][1]:
    raise CorruptCheckpointError(f"{what}: extends past the end of {files[file_id][0]}")
  crc = _int(_get(s, "crc32c", what), f"{what} crc32c", 0, 2**32 - 1)
  chunks = s.get("chunk_crc32c")
  if chunks is not None:
    if not chunk_bytes or nbytes <= chunk_bytes:
      raise CorruptCheckpointError(f"{what}: chunk checksums for a record of one chunk")
    if (not isinstance(chunks, list) or len(chunks) != checksums.chunk_count(nbytes, chunk_bytes) or
        not all(_is_int(c) and 0 <= c < 2**32 for c in chunks)):
      raise CorruptCheckpointError(f"{what}: malformed chunk_crc32c {_short(chunks)}")
    if not checksums.chunks_combine_to(crc, chunks, nbytes, chunk_bytes):
      # Else a read of some chunks could accept bytes the record's CRC refuses.
      raise CorruptCheckpointError(f"{what}: its chunk_crc32c do not combine to its crc32c")
    chunks = tuple(chunks)
  return ShardRecord(leaf_id, tuple(index), file_id, offset, nbytes, crc, part, chunks,
                     chunk_bytes if chunks is not None else None)


def _plain_shard(s: Any, leaves: list[LeafMeta], files: list[tuple[str, int]],
                 itemsizes: dict[str, int], chunk_bytes: int | None) -> ShardRecord | None:
  """The record `s` when it is a well-formed whole-shard record (no part);
  None for anything else, which decode_manifest then validates field by field
  (and names what is wrong). The same rules, without a function call per
  field: 10,000 records took 85 ms the long way."""
  if type(s) is not dict or "part" in s:  # pylint: disable=unidiomatic-typecheck
    return None
  try:
    leaf_id, index_raw, file_id = s["leaf"], s["index"], s["file"]
    offset, nbytes, crc = s["offset"], s["nbytes"], s["crc32c"]
  except KeyError:
    return None
  # type() is int, not isinstance: bool is an int subclass and is refused.
  if not (type(leaf_id) is int and 0 <= leaf_id < len(leaves) and  # pylint: disable=unidiomatic-typecheck
          type(file_id) is int and 0 <= file_id < len(files) and  # pylint: disable=unidiomatic-typecheck
          type(offset) is int and offset >= 0 and not offset % SHARD_ALIGN and  # pylint: disable=unidiomatic-typecheck
          type(nbytes) is int and type(crc) is int and 0 <= crc < 2**32):  # pylint: disable=unidiomatic-typecheck
    return None
  leaf = leaves[leaf_id]
  if leaf.kind not in ARRAY_KINDS or type(index_raw) is not list or len(index_raw) != len(leaf.shape):  # pylint: disable=unidiomatic-typecheck
    return None
  index = []
  count = 1
  for r, n in zip(index_raw, leaf.shape):
    if type(r) is not list or len(r) != 2:  # pylint: disable=unidiomatic-typecheck
      return None
    start, stop = r
    if type(start) is not int or type(stop) is not int or not 0 <= start <= stop <= n:  # pylint: disable=unidiomatic-typecheck
      return None
    index.append((start, stop))
    count *= stop - start
  itemsize = itemsizes.get(leaf.dtype)
  if itemsize is None:
    itemsize = itemsizes[leaf.dtype] = dtype_from_name(leaf.dtype).itemsize
  if nbytes != count * itemsize or offset + nbytes > files[file_id][1]:
    return None
  chunks = s.get("chunk_crc32c")
  if chunks is not None:
    if (not chunk_bytes or nbytes <= chunk_bytes or type(chunks) is not list or  # pylint: disable=unidiomatic-typecheck
        len(chunks) != checksums.chunk_count(nbytes, chunk_bytes) or
        not all(type(c) is int and 0 <= c < 2**32 for c in chunks) or  # pylint: disable=unidiomatic-typecheck
        not checksums.chunks_combine_to(crc, chunks, nbytes, chunk_bytes)):
      return None
    chunks = tuple(chunks)
  return ShardRecord(leaf_id, tuple(index), file_id, offset, nbytes, crc, None, chunks,
                     chunk_bytes if chunks is not None else None)


def read_manifest(directory: str, process_index: int, meta: CheckpointMetadata) -> Manifest:
  """Reads and validates one process's manifest against metadata and files."""
  path = os.path.join(directory, manifest_name(process_index))
  d, raw = read_json(path, f"manifest of process {process_index}")
  return decode_manifest(d, path, directory, process_index, meta, raw)


def decode_manifest(d: Any, path: str, directory: str, process_index: int,
                    meta: CheckpointMetadata, raw: bytes | None = None) -> Manifest:
  """Validates decoded JSON of one manifest against `meta` and the data
  files in `directory` (sizes as they are on disk now). Save runs this on
  what it is about to commit, so a save never commits what restore rejects.
  `raw`: the bytes `d` was decoded from, if at hand.
  Raises CorruptCheckpointError naming `path` and the record at fault."""
  _check_header(d, path)
  _check_seal(d, path, raw)
  found = _get(d, "process_index", path)
  if not _is_int(found) or found != process_index:
    raise CorruptCheckpointError(
        f"{path}: process_index {_short(found)} does not match its file name")
  files_raw = _get(d, "files", path)
  if not isinstance(files_raw, list):
    raise CorruptCheckpointError(f"{path}: files must be a list")
  files = []
  for j, f in enumerate(files_raw):
    name = _get(f, "name", f"{path} file {j}")
    # A bare file name of this process's own data files, never a path.
    m = _DATA_RE.fullmatch(name) if isinstance(name, str) else None
    if m is None or int(m.group(1)) != process_index:
      raise CorruptCheckpointError(f"{path}: file {j} has an invalid name {_short(name)}")
    size = _int(_get(f, "size", f"{path} file {j}"), f"{path} file {j} size")
    _check_file(directory, name, size, path)
    files.append((name, size))
  shards_raw = _get(d, "shards", path)
  if not isinstance(shards_raw, list):
    raise CorruptCheckpointError(f"{path}: shards must be a list")
  chunk_bytes = d.get("crc_chunk_bytes")
  if chunk_bytes is not None:
    chunk_bytes = _int(chunk_bytes, f"{path} crc_chunk_bytes", SHARD_ALIGN, 2**40)
    if chunk_bytes % SHARD_ALIGN:
      raise CorruptCheckpointError(f"{path}: crc_chunk_bytes {chunk_bytes} is not a multiple of "
                                   f"{SHARD_ALIGN}")
  shards = []
  itemsizes: dict[str, int] = {}
  for j, s in enumerate(shards_raw):
    record = _plain_shard(s, meta.leaves, files, itemsizes, chunk_bytes)
    if record is not None:
      shards.append(record)
      continue
    shards.append(_checked_shard(s, f"{path} shard {j}", meta, files, chunk_bytes))
  check_shard_tiling(shards, files, path)
  metadata_crc = d.get("metadata_crc32c")
  if metadata_crc is not None:
    _int(metadata_crc, f"{path} metadata_crc32c", 0, 2**32 - 1)
    if meta.seal is not None and metadata_crc != meta.seal:
      raise CorruptCheckpointError(
          f"{path} was written by another save than {METADATA_FILE} (its metadata checksum "
          f"{metadata_crc} is not {meta.seal}): files of different checkpoints were mixed")
  return Manifest(process_index, files, shards, metadata_crc, chunk_bytes)
