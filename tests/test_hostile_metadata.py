"""Hostile or broken metadata: 1,000 seeded mutations of fastpersist.json and
manifests, plus crafted hostile cases (a duplicate hiding a missing shard,
shared bytes, a FIFO, /dev/zero, another process's file, overlaps across
manifests): only FastPersistErrors (or exact data), no hang, no huge
allocation."""

from __future__ import annotations

import copy
import dataclasses
import faulthandler
import json
import logging
import os
import random
import re
import resource
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fastpersist_jax import checksums
from fastpersist_jax import (CorruptCheckpointError, FastPersistError, FastPersistHandler,
                             FastPersistOptions, FastPersistRestore, FastPersistSave, disk_format)
from helpers import MiB, abstract, assert_tree_bytes_equal
from hypothesis import given, settings, strategies as st

# Small staging so that a handler costs little memory; slabs of 1 MiB so that
# a few-MiB checkpoint is staged and written as several windows.
SMALL = dict(host_memory_limit=16 * MiB, staging_slab_bytes=1 * MiB)


# Values a hostile or damaged file might hold where a number, name, or list is expected.
_HOSTILE_VALUES = [
    None, True, False, 0, 1, -1, 7, 4095, 4096, 4097, 2**31, 2**32, 2**40, 2**62, 2**63 - 1,
    2**63, 2**64, 10**30, -2**63, -(10**30), 0.5, 1.0, -0.0, 1e308, float("inf"), float("nan"),
    "", "0", "x", "../x", "/etc/passwd", "data.00000.0000.bin/../../x", "../data.00000.0000.bin",
    "data.00000.0000.bin\n", "data.00001.0000.bin", "data.00000.9999.bin", "data.00000.0000.bin ",
    "data.٠٠٠٠٠.0000.bin", "manifest.00000.json", "fastpersist.json", ".", "..", "/", "\x00",
    "float32", "float64", "int64", "bfloat16", "int4", "uint8", "bool", "complex64", "object", "O",
    "V8", "void", "S4", "U3", ">f4", "<f4", "f4,i4", "(2,2)f4", "M8[s]", "__class__", "finfo",
    "__name__", "float8_e4m3fn", "array", "numpy", "np_scalar", "scalar", "none", "named", "single",
    "fastpersist", "x" * 100_000, [], {}, [[]], [0], [0, 0], [1, 2, 3], [-1, 4], [2**40, 2**40],
    [2**62, 2**62], [2**31] * 64, [1] * 65, [0, 2**63], [[0, 1]], [[0, 8], [0, 8], [0, 8]],
    ["d", "w"], [["d", "w"]], [["s", 0]], [["d", "w"], ["d", "x"]], [None], {"type": "named"},
    {"a": 1}, {"name": "../x", "size": 0}, {"name": "/etc/passwd", "size": 0},
]


def _json_paths(node, prefix=()):
  """Every (path, value) in a decoded JSON document, root included."""
  yield prefix, node
  if isinstance(node, dict):
    for k, v in node.items():
      yield from _json_paths(v, prefix + (k,))
  elif isinstance(node, list):
    for i, v in enumerate(node):
      yield from _json_paths(v, prefix + (i,))


def _set_at(doc, path, value):
  if not path:
    return value
  node = doc
  for k in path[:-1]:
    node = node[k]
  node[path[-1]] = value
  return doc


def _deep(depth: int) -> str:
  return "[" * depth + "]" * depth


def _mutate_json(rng: random.Random, doc, data_sizes: list[int]) -> tuple[bytes, str]:
  """One structural mutation of a decoded JSON document: (new file bytes, what)."""
  doc = copy.deepcopy(doc)
  paths = list(_json_paths(doc))
  path, value = rng.choice(paths)
  op = rng.choice(["hostile", "hostile", "number", "retype", "drop", "add", "dup", "list",
                   "deep", "targeted"])
  deep_text = None
  if op == "number" and isinstance(value, int) and not isinstance(value, bool):
    new = rng.choice([value + 1, value - 1, -value, value * 2, value + 4096, value - 4096,
                      value * 4096, 2**40 + value, value + max(data_sizes) + 1])
    doc = _set_at(doc, path, new)
  elif op == "retype":
    new = {int: str, float: str, str: lambda v: [v], list: lambda v: {str(i): x for i, x in
                                                                      enumerate(v)},
           dict: lambda v: list(v.values()), bool: int, type(None): lambda v: 0}[type(value)](value)
    doc = _set_at(doc, path, new)
  elif op == "drop" and path:
    parent = doc
    for k in path[:-1]:
      parent = parent[k]
    del parent[path[-1]]
  elif op == "add" and isinstance(value, dict):
    value[rng.choice(["extra", "format", "version", "leaf", "size", "name", "kind"])] = \
        rng.choice(_HOSTILE_VALUES)
  elif op == "dup" and isinstance(value, list) and value:
    i = rng.randrange(len(value))
    value.insert(rng.randrange(len(value) + 1), copy.deepcopy(value[i]))
  elif op == "list" and isinstance(value, list) and value:
    action = rng.choice(["pop", "swap", "append", "clear"])
    if action == "pop":
      value.pop(rng.randrange(len(value)))
    elif action == "swap":
      i, j = rng.randrange(len(value)), rng.randrange(len(value))
      value[i], value[j] = value[j], value[i]
    elif action == "append":
      value.append(rng.choice(_HOSTILE_VALUES))
    else:
      value.clear()
  elif op == "deep":
    deep_text = _deep(rng.choice([50, 400, 900, 990, 5_000, 200_000]))
    doc = _set_at(doc, path, "\x00DEEP\x00")
  elif op == "targeted":
    # Aimed at the fields whose validation matters most.
    targets = [(p, v) for p, v in paths if p and p[-1] in (
        "shape", "nbytes", "offset", "size", "name", "process_index", "dtype", "index", "file",
        "leaf", "process_count", "sharding", "mesh_shape", "spec", "axis_names", "path", "kind")]
    path, value = rng.choice(targets)
    key = path[-1]
    if key == "shape":
      new = rng.choice([[2**40, 2**40], [2**62, 4], [0] * len(value), value + [1], value[:-1],
                        [2**31] * 3, [n * 2 for n in value], [-n for n in value]])
    elif key in ("nbytes", "offset", "size"):
      new = rng.choice([max(data_sizes) + 1, max(data_sizes), max(data_sizes) + 4096, 2**62,
                        2**63 - 1, 2**64, -4096, value + 1, value + 4096, 1])
    elif key == "name":
      new = rng.choice(["../x", "/etc/passwd", "data.00000.0000.bin/../../x",
                        "../../../../../../etc/passwd", "data.00001.0000.bin",
                        "data.00000.0001.bin", "/proc/self/mem", "data.00000.0000.bin\n"])
    elif key == "process_index":
      new = rng.choice([1, -1, 2**20, "0", 0.0, None, True])
    elif key == "dtype":
      new = rng.choice(["float128", "complex256", "object", "V4", "void", "S4", ">f4", "f4,i4",
                        "(2,)f4", "bfloat17", "__class__", "int4", "float64", "int8",
                        "float8_e4m3fn", "uint32", "M8[ns]", ""])
    elif key == "index" and isinstance(value, list):
      new = rng.choice([value[:-1], value + [[0, 1]], [[0, 1]] * (len(value) + 3), [],
                        [[r[0], r[1] + 1] if isinstance(r, list) and len(r) == 2 else r
                         for r in value],
                        [list(reversed(r)) if isinstance(r, list) else r for r in value],
                        [[0, 2**62]] * len(value), [[r] for r in value]])
    elif key in ("file", "leaf"):
      new = rng.choice([1, 2, -1, 99, 2**31, value + 1 if isinstance(value, int) else 1])
    elif key == "process_count":
      new = rng.choice([0, 2, 2**20, 2**21, -1, 1.0])
    elif key == "mesh_shape":
      new = rng.choice([[8], [2, 4], [4, 4], [1, 8], [-4, -2], [0, 8], [2**40, 2**40], [4]])
    elif key == "spec":
      new = rng.choice([["model", "data"], ["data", "data"], ["nope"], [None, None, None],
                        [["data", "model"]], ["data", "model", None], [["data", "data"]], [1]])
    elif key == "axis_names":
      new = rng.choice([["data"], ["a", "b"], ["data", "data"], [1, 2], ["model", "data"]])
    elif key == "path":
      new = rng.choice([[], [["d", "w"]], [["d", "w"], ["d", "x"]], [["s", 0]], [["q", 1]],
                        [["s", -1]], [["d", True]], [["d", "w"]] * 3])
    else:  # kind
      new = rng.choice(["array", "numpy", "np_scalar", "scalar", "none", "empty_dict", "tuple"])
    doc = _set_at(doc, path, new)
  else:
    doc = _set_at(doc, path, rng.choice(_HOSTILE_VALUES))
  # Re-sealed (disk_format.seal), so that the validators behind the document's own
  # checksum are what each mutation tests.
  text = (disk_format.seal({k: v for k, v in doc.items() if k != "crc32c"}).decode()
          if isinstance(doc, dict) else json.dumps(doc))
  if deep_text is not None:
    text = text.replace(json.dumps("\x00DEEP\x00"), deep_text)
  return text.encode(), f"{op} at {list(path)!r}"


def _mutate_bytes(rng: random.Random, raw: bytes) -> tuple[bytes, str]:
  op = rng.choice(["flip", "flip", "truncate", "splice", "digit"])
  b = bytearray(raw)
  if op == "flip":
    where = [rng.randrange(len(b)) for _ in range(rng.choice([1, 1, 2, 3]))]
    for i in where:
      b[i] ^= rng.randrange(1, 256)
    return bytes(b), f"flip bytes {where}"
  if op == "truncate":
    n = rng.randrange(len(b))
    return bytes(b[:n]), f"truncate to {n}"
  if op == "digit":
    # Change one digit: numbers stay numbers, so validation (not the parser) must catch it.
    digits = [i for i, c in enumerate(b) if 0x30 <= c <= 0x39]
    i = rng.choice(digits)
    b[i] = ord(str(rng.randrange(10)))
    return bytes(b), f"digit at {i}"
  i = rng.randrange(len(b))
  junk = rng.choice([b"\xff\xfe", b"\x00", b"]", b"{", b"\"", b",", b"9" * 400, b"-", b"1e999",
                     b"NaN", b"[" * 3000])
  return bytes(b[:i] + junk + b[i + rng.randrange(0, 4):]), f"splice {junk[:8]!r} at {i}"


@pytest.fixture
def fuzz_checkpoint(mesh, tmp_path):
  rng = np.random.default_rng(20)
  tree = {
      "w": jax.device_put(rng.standard_normal((16, 8), np.float32),
                          NamedSharding(mesh, P("data", "model"))),
      "rep": jax.device_put(jnp.arange(12, dtype=jnp.int32), NamedSharding(mesh, P())),
      "bf": jax.device_put(jnp.asarray(rng.standard_normal((8, 4)), jnp.bfloat16),
                           NamedSharding(mesh, P(None, "model"))),
      "host": rng.integers(0, 255, (5, 3), np.uint8),
      "scalar": np.float32(2.5),
      "empty": np.zeros((0, 4), np.int16),
      "none": None,
  }
  d = tmp_path / "c"
  h = FastPersistHandler(FastPersistOptions(**SMALL))
  ocp.Checkpointer(h).save(d, args=FastPersistSave(tree))
  yield h, os.fspath(d), tree
  h.close()


@pytest.mark.parametrize("n_mutations", [1000])
def test_hostile_metadata_raises_only_fastpersist_errors(fuzz_checkpoint, n_mutations):
  handler, d, tree = fuzz_checkpoint
  target = abstract(tree)
  # Whole arrays as numpy: one target region spans every saved shard of a leaf.
  numpy_target = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, tree)
  names = [disk_format.METADATA_FILE, disk_format.manifest_name(0)]
  originals = {n: open(os.path.join(d, n), "rb").read() for n in names}
  docs = {n: json.loads(raw) for n, raw in originals.items()}
  data_sizes = [os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.startswith("data.")]
  # Sanity: the pristine checkpoint restores.
  assert_tree_bytes_equal(tree, handler.restore(d, args=FastPersistRestore(target)))

  rng = random.Random(1234)
  leaks: list[str] = []
  outcomes = {"ok": 0, "FastPersistError": 0}
  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  faulthandler.dump_traceback_later(240, exit=True)  # a hang kills the run, loudly
  quiet = logging.getLogger("fastpersist_jax")
  level = quiet.level
  quiet.setLevel(logging.ERROR)  # "restoring as numpy" warnings by the thousand
  t0 = time.monotonic()
  try:
    for i in range(n_mutations):
      name = names[i % 2]
      if rng.random() < 0.5:
        raw, what = _mutate_bytes(rng, originals[name])
      else:
        raw, what = _mutate_json(rng, docs[name], data_sizes)
      with open(os.path.join(d, name), "wb") as f:
        f.write(raw)
      for op in ("restore_target", "restore_numpy", "restore_all", "metadata"):
        try:
          if op in ("restore_target", "restore_numpy"):
            out = handler.restore(d, args=FastPersistRestore(
                target if op == "restore_target" else numpy_target))
            # Whatever restores must be exactly what was saved.
            try:
              assert_tree_bytes_equal(tree, out)
            except AssertionError as e:
              leaks.append(f"#{i} {name} {what}: {op} returned different data: {e}")
          elif op == "restore_all":
            handler.restore(d)
          else:
            handler.metadata(d)
          outcomes["ok"] += 1
        except FastPersistError:
          outcomes["FastPersistError"] += 1
        except Exception as e:  # pylint: disable=broad-except
          leaks.append(f"#{i} {name} {what}: {op} raised {type(e).__name__}: {str(e)[:300]}")
      with open(os.path.join(d, name), "wb") as f:
        f.write(originals[name])
  finally:
    faulthandler.cancel_dump_traceback_later()
    quiet.setLevel(level)
  elapsed = time.monotonic() - t0
  rss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
  assert not leaks, f"{len(leaks)} bad outcomes ({outcomes}), e.g.:\n" + "\n".join(leaks[:25])
  assert outcomes["FastPersistError"] > 2 * n_mutations, outcomes  # most mutations are harmful
  assert elapsed < 120, f"{n_mutations} mutations took {elapsed:.0f} s"
  assert rss_growth_mib < 256, f"peak RSS grew by {rss_growth_mib:.0f} MiB"
  # And the checkpoint, restored to its original files, is still fine.
  assert_tree_bytes_equal(tree, handler.restore(d, args=FastPersistRestore(target)))


def _leaf_index(meta: dict, key: str) -> int:
  return next(i for i, l in enumerate(meta["leaves"]) if l["path"] == [["d", key]])


def _shards_of(manifest: dict, leaf: int) -> list[dict]:
  return [s for s in manifest["shards"] if s["leaf"] == leaf]


def _case_duplicate_hides_missing(meta, man, d):
  # Shard 1 of "w" claims shard 0's place and bytes: the element count still
  # adds up, but shard 1's region would never be written.
  sh = _shards_of(man, _leaf_index(meta, "w"))
  sh[1].update({k: sh[0][k] for k in ("index", "offset", "crc32c")})


def _case_shared_bytes(meta, man, d):
  sh = _shards_of(man, _leaf_index(meta, "w"))
  sh[1]["offset"] = sh[0]["offset"]


def _case_fifo_metadata(meta, man, d):
  os.unlink(os.path.join(d, disk_format.METADATA_FILE))
  os.mkfifo(os.path.join(d, disk_format.METADATA_FILE))  # open() of it would block forever


def _case_data_file_is_dev_zero(meta, man, d):
  name = man["files"][0]["name"]
  os.unlink(os.path.join(d, name))
  os.symlink("/dev/zero", os.path.join(d, name))


def _case_other_process_file(meta, man, d):
  shutil.copy(os.path.join(d, man["files"][0]["name"]), os.path.join(d, "data.00001.0000.bin"))
  man["files"][0]["name"] = "data.00001.0000.bin"


_ARRAY_FIELDS = ("kind", "dtype", "shape", "sharding", "prng_impl")


def _fields_of(meta: dict, key: str, field: str) -> dict:
  """The record holding `field` of leaf `key`: its "arrays" entry (format
  version 3) for an array leaf's fields, else the leaf's own record."""
  leaf = meta["leaves"][_leaf_index(meta, key)]
  if "array" in leaf and field in _ARRAY_FIELDS:
    return meta["arrays"][leaf["array"]]
  return leaf


def _set_leaf(key, **fields):
  def mutate(meta, man, d):
    for field, value in fields.items():
      _fields_of(meta, key, field)[field] = value
  return mutate


def _set_sharding(**fields):
  def mutate(meta, man, d):
    _fields_of(meta, "w", "sharding")["sharding"].update(fields)
  return mutate


def _set_file(**fields):
  def mutate(meta, man, d):
    man["files"][0].update(fields)
  return mutate


def _set_shard(i, **fields):
  def mutate(meta, man, d):
    man["shards"][i].update(fields)
  return mutate


def _set_manifest(**fields):
  def mutate(meta, man, d):
    man.update(fields)
  return mutate


_CRAFTED = {
    # (mutation, whether metadata() must fail too: only for damage in fastpersist.json)
    "np_scalar with a shape": (_set_leaf("host", kind="np_scalar"), True),
    "scalar_type a list": (_set_leaf("none", kind="scalar", scalar_type=["int"], value=1), True),
    "float scalar too big": (_set_leaf("none", kind="scalar", scalar_type="float",
                                       value=10**400), True),
    "dtype ml_dtypes attribute": (_set_leaf("host", dtype="__name__"), True),
    "dtype that numpy cannot parse": (_set_leaf("host", dtype="f4,("), True),
    "dtype big-endian": (_set_leaf("w", dtype=">f4"), True),
    "dtype alias": (_set_leaf("w", dtype="f4"), True),
    "dtype float128 array": (_set_leaf("w", dtype="float128"), True),
    "dtype object": (_set_leaf("host", dtype="object"), True),
    "shape 2**40 x 2**40": (_set_leaf("host", shape=[2**40, 2**40]), True),
    "shape negative": (_set_leaf("host", shape=[-5, -3]), True),
    "path inside another leaf": (_set_leaf("none", path=[["d", "host"], ["d", "x"]]), True),
    "path repeated": (_set_leaf("none", path=[["d", "host"]]), True),
    "sharding axis_names short": (_set_sharding(axis_names=["data"]), True),
    "sharding spec too long": (_set_sharding(spec=["data", "model", None]), True),
    "sharding uneven split": (_set_sharding(mesh_shape=[3, 2]), True),
    "sharding negative mesh": (_set_sharding(mesh_shape=[-4, -2]), True),
    "sharding axis twice": (_set_sharding(spec=["data", "data"]), True),
    "deep nesting in a quoted field": (_set_leaf("host", shape=json.loads(_deep(900))), True),
    "metadata is a FIFO": (_case_fifo_metadata, True),
    "file name ../x": (_set_file(name="../x"), False),
    "file name /etc/passwd": (_set_file(name="/etc/passwd"), False),
    "file name with ..": (_set_file(name="data.00000.0000.bin/../../x"), False),
    "file name with newline": (_set_file(name="data.00000.0000.bin\n"), False),
    "file of another process": (_case_other_process_file, False),
    "data file is /dev/zero": (_case_data_file_is_dev_zero, False),
    "file size beyond the file": (_set_file(size=2**40), False),
    "nbytes beyond the file": (_set_shard(0, nbytes=2**40), False),
    "offset beyond the file": (_set_shard(0, offset=2**40), False),
    "offset unaligned": (_set_shard(1, offset=4097), False),
    "process_index wrong": (_set_manifest(process_index=1), False),
    "process_index a string": (_set_manifest(process_index="0"), False),
    "index list too long": (_set_shard(0, index=[[0, 5], [0, 3], [0, 1]]), False),
    "index list too short": (_set_shard(0, index=[[0, 5]]), False),
    "index reversed": (_set_shard(0, index=[[5, 0], [0, 3]]), False),
    "duplicate shard hides a missing one": (_case_duplicate_hides_missing, False),
    "two shards share bytes": (_case_shared_bytes, False),
}


@pytest.mark.parametrize("case", list(_CRAFTED))
def test_crafted_hostile_metadata(mesh, tmp_path, case):
  """Each of these once escaped validation (a foreign exception, a hang, or
  silently wrong data); each must now be a CorruptCheckpointError."""
  rng = np.random.default_rng(21)
  tree = {"w": jax.device_put(rng.standard_normal((16, 8), np.float32),
                              NamedSharding(mesh, P("data", "model"))),
          "host": rng.integers(0, 255, (5, 3), np.uint8), "none": None}
  d = os.fspath(tmp_path / "c")
  h = FastPersistHandler(FastPersistOptions(**SMALL))
  ocp.Checkpointer(h).save(d, args=FastPersistSave(tree))
  meta_path, man_path = (os.path.join(d, n) for n in (disk_format.METADATA_FILE, disk_format.manifest_name(0)))
  meta, man = (json.load(open(p)) for p in (meta_path, man_path))
  mutate, breaks_metadata = _CRAFTED[case]
  mutate(meta, man, d)
  if os.path.isfile(meta_path) and not os.path.islink(meta_path):
    with open(meta_path, "w") as f:
      json.dump(meta, f)
  with open(man_path, "w") as f:
    json.dump(man, f)
  numpy_target = {"w": np.zeros((16, 8), np.float32), "host": np.zeros((5, 3), np.uint8),
                  "none": None}
  faulthandler.dump_traceback_later(60, exit=True)
  try:
    for target in (abstract(tree), numpy_target, None):
      with pytest.raises(CorruptCheckpointError):
        h.restore(d, args=FastPersistRestore(target))
    if breaks_metadata:
      with pytest.raises(CorruptCheckpointError):
        h.metadata(d)
    else:
      assert set(h.metadata(d)) == {"w", "host", "none"}
  finally:
    faulthandler.cancel_dump_traceback_later()
  h.close()


def test_overlap_across_manifests_is_detected(mesh, tmp_path):
  """Two manifests whose shards overlap (rows 2-6 twice) and leave a gap
  (rows 12-16) of the same size: the element count adds up, so a whole-array
  restore returns the gap as uninitialized memory instead of failing."""
  import crc32c  # pylint: disable=g-import-not-at-top
  host = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
  x = jax.device_put(host, NamedSharding(mesh, P("data", "model")))
  d = tmp_path / "c"
  h = FastPersistHandler(FastPersistOptions(**SMALL))
  ocp.Checkpointer(h).save(d, args=FastPersistSave({"w": x}))
  meta = json.loads((d / disk_format.METADATA_FILE).read_text())
  man0 = json.loads((d / disk_format.manifest_name(0)).read_text())
  meta["process_count"] = 2
  man0["shards"] = [s for s in man0["shards"] if s["index"] != [[12, 16], [0, 4]]]
  block = host[2:6, 0:4].tobytes()  # true data, so every checksum is right
  (d / "data.00001.0000.bin").write_bytes(block)
  man1 = {"format": "fastpersist", "version": 1, "process_index": 1,
          "files": [{"name": "data.00001.0000.bin", "size": len(block)}],
          "shards": [{"leaf": 0, "index": [[2, 6], [0, 4]], "file": 0, "offset": 0,
                      "nbytes": len(block), "crc32c": crc32c.crc32c(block)}]}
  for name, doc in ((disk_format.METADATA_FILE, meta), (disk_format.manifest_name(0), man0),
                    (disk_format.manifest_name(1), man1)):
    (d / name).write_text(json.dumps(doc))
  with pytest.raises(CorruptCheckpointError):
    h.restore(d, args=FastPersistRestore({"w": np.zeros((16, 8), np.float32)}))
  h.close()


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))


# The fast paths of decoding (a plain shard record checked without a call per
# field; array leaf records sharing all fields but the path validated once)
# must accept exactly what the field-by-field validation accepts.

_PLAIN_SHARD = {"leaf": 0, "index": [[0, 4], [8, 16]], "file": 1, "offset": 8192, "nbytes": 128,
                "crc32c": 5}
_LEAVES = [disk_format.LeafMeta(path=[["d", "w"]], kind="array", dtype="float32", shape=(4, 16)),
           disk_format.LeafMeta(path=[["d", "n"]], kind="none"),
           disk_format.LeafMeta(path=[["d", "b"]], kind="numpy", dtype="bfloat16", shape=(3,))]
_FILES = [("data.00000.0000.bin", 8192 + 128), ("data.00000.0001.bin", 1 << 20)]
_FIELD_VALUES = _HOSTILE_VALUES[:60] + [
    [[0, 4], [8, 16]], [[0, 3]], [[0, 4], [0, 16]], [[0, 5], [8, 16]], [[3, 2], [8, 16]],
    [[0, 4], [8, 17]], [[-1, 3], [8, 16]], [[0, 4], [8, 16], [0, 1]], [[0, 4], [True, 16]],
    [[0.0, 4], [8, 16]], [[0, 4, 1], [8, 16]], [(0, 4), [8, 16]], 2, 8320, 6, 1 << 20, 4096 * 3,
    [1, 2], [1, 2, 3], [1, 2**32], [True, 2], [-1, 2], [0, 2**32 - 1],
    [1, 5 ^ checksums.combine(1, 0, 64)]]   # 2 chunks of 64 bytes combining to crc32c 5
# Chunk size the checked records' chunk_crc32c lists are read with: None (the
# manifest has none), or 64 bytes (the 128-byte record is 2 chunks).
_CHUNK_SIZES = (None, 64)


def _full_check(record, chunk_bytes):
  meta = disk_format.CheckpointMetadata(process_count=1, leaves=_LEAVES)
  try:
    return disk_format._checked_shard(record, "shard", meta, _FILES, chunk_bytes)  # pylint: disable=protected-access
  except CorruptCheckpointError:
    return None


def test_plain_shard_fast_path_agrees_on_every_single_change():
  for field in sorted(_PLAIN_SHARD) + ["part", "extra", "chunk_crc32c"]:
    for value in _FIELD_VALUES:
      for nbytes_from_index in (False, True):
        _check_plain_shard_agrees({field: value}, nbytes_from_index)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.dictionaries(st.sampled_from(sorted(_PLAIN_SHARD) + ["part", "extra", "chunk_crc32c"]),
                       st.sampled_from(_FIELD_VALUES), min_size=2, max_size=3), st.booleans())
def test_plain_shard_fast_path_agrees_with_full_validation(changes, nbytes_from_index):
  _check_plain_shard_agrees(changes, nbytes_from_index)


def _check_plain_shard_agrees(changes, nbytes_from_index):
  record = {**_PLAIN_SHARD, **changes}
  if nbytes_from_index and "nbytes" not in changes:
    try:   # make nbytes agree with a changed index, so that only the index is wrong
      record["nbytes"] = int(np.prod([b - a for a, b in record["index"]])) * 4
    except (TypeError, ValueError):
      pass
  for field in [k for k, v in changes.items() if v is None and k in _PLAIN_SHARD][:1]:
    del record[field]   # a missing field, too
  for chunk_bytes in _CHUNK_SIZES:
    fast = disk_format._plain_shard(record, _LEAVES, _FILES, {}, chunk_bytes)  # pylint: disable=protected-access
    if "part" in record:
      assert fast is None   # parts are always checked field by field
    else:
      assert fast == _full_check(record, chunk_bytes), (record, chunk_bytes)


_LEAF_RECORD = {"path": [["d", "w"]], "kind": "array", "dtype": "float32", "shape": [8, 4],
                "sharding": {"type": "single", "memory_kind": "device", "device_ids": [0]}}


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.dictionaries(st.sampled_from(sorted(_LEAF_RECORD) + ["prng_impl", "value"]),
                       st.sampled_from(_FIELD_VALUES + [[["d", "v"]], [["s", 1]]]), max_size=2))
def test_leaf_records_validated_once_agree_with_each_validated(changes):
  # Version 2 (array fields in each leaf record): the record is decoded
  # after the valid record it was changed from (at another path) and after
  # its identical twin, and must decode (or fail) as it does alone.
  record = {**_LEAF_RECORD, **changes}

  def decode(leaves):
    doc = json.loads(disk_format.seal({"format": "fastpersist", "version": 2,
                            "process_count": 1, "leaves": leaves}))
    try:
      return disk_format.decode_metadata(doc, "meta").leaves[-1]
    except CorruptCheckpointError:
      return None

  alone = decode([record])
  for twin in ({**_LEAF_RECORD, "path": [["d", "twin"]]}, {**record, "path": [["d", "twin"]]}):
    after_twin = decode([twin, record])
    assert alone == after_twin, (record, twin, alone, after_twin)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.dictionaries(st.sampled_from(sorted(_LEAF_RECORD) + ["prng_impl", "value"]),
                       st.sampled_from(_FIELD_VALUES + [[["d", "v"]], [["s", 1]]]), max_size=2))
def test_array_descriptions_of_version_3_decode_as_version_2_records_do(changes):
  # Version 3 records an array leaf's fields once in "arrays"; leaves refer
  # to them. Decoding must give every leaf what the same fields inline
  # (version 2) give, or refuse both; a valid leaf sharing the description
  # with the changed one must not change that.
  record = {**_LEAF_RECORD, **changes}
  fields = {k: v for k, v in record.items() if k != "path"}

  def decode(version, leaves, arrays=None):
    doc = {"format": "fastpersist", "version": version, "process_count": 1, "leaves": leaves}
    if arrays is not None:
      doc["arrays"] = arrays
    doc = json.loads(disk_format.seal(doc))
    try:
      return [dataclasses.astuple(l) for l in disk_format.decode_metadata(doc, "meta").leaves]
    except CorruptCheckpointError:
      return None

  if "path" not in record:
    return
  inline = decode(2, [record])
  assert decode(3, [{"path": record["path"], "array": 0}], [fields]) == inline, record
  twin = {**record, "path": [["d", "twin"]]}
  shared = decode(3, [{"path": [["d", "twin"]], "array": 0}, {"path": record["path"], "array": 0}],
                  [fields])
  assert shared == decode(2, [twin, record]), record
  if inline is not None:   # a valid description: the inline form of version 3 is refused
    assert decode(3, [record], []) is None


def test_version_3_array_references_are_checked():
  fields = {k: v for k, v in _LEAF_RECORD.items() if k != "path"}
  for leaf, arrays, message in [
      ({"path": [["d", "w"]], "array": 1}, [fields], "array 1 is not one of the 1 in arrays"),
      ({"path": [["d", "w"]], "array": True}, [fields], "array True is not one of"),
      ({"path": [["d", "w"]], "array": 0, "dtype": "int8"}, [fields], "malformed array leaf"),
      ({"path": [["d", "w"]], "array": 0}, [{**fields, "kind": "scalar"}],
       "not an array description"),
      ({"path": [["d", "w"]], "array": 0}, [fields, {"kind": "array"}], "metadata array 1: "),
      ({"path": [["d", "w"]], "array": 0}, {"0": fields}, "arrays must be a list")]:
    doc = json.loads(disk_format.seal({"format": "fastpersist", "version": 3, "process_count": 1,
                                       "arrays": arrays, "leaves": [leaf]}))
    with pytest.raises(CorruptCheckpointError, match=re.escape(message)):
      disk_format.decode_metadata(doc, "meta")


def _decoded_or_error(doc, raw):
  try:
    return disk_format.decode_metadata(doc, "meta", raw)
  except CorruptCheckpointError as e:
    return type(e)


def test_seal_checked_on_the_bytes_agrees_with_the_seal_checked_on_the_json():
  # Restore checks a document's seal on its bytes as written (no second
  # encoding); every single-byte change that still parses must be decided
  # as the check on the re-encoded JSON decides it.
  fields = {k: v for k, v in _LEAF_RECORD.items() if k != "path"}
  raw = disk_format.seal({"format": "fastpersist", "version": disk_format.FORMAT_VERSION,
                          "process_count": 1, "arrays": [fields],
                          "leaves": [{"path": [["d", "w"]], "array": 0},
                                     {"path": [["d", "n"]], "kind": "scalar", "scalar_type": "int",
                                      "value": 3}]})
  assert _decoded_or_error(json.loads(raw), raw).leaves[1].value == 3
  parsed = 0
  for at in range(len(raw)):
    for byte in {raw[at] ^ 1, raw[at] ^ 0x20, ord("1"), ord(" ")}:
      changed = raw[:at] + bytes([byte]) + raw[at + 1:]
      try:
        doc = json.loads(changed)
      except ValueError:
        continue
      parsed += 1
      assert _decoded_or_error(doc, changed) == _decoded_or_error(doc, None), changed
  assert parsed > 100
  # The same JSON spelled otherwise (another writer's spacing): checked on
  # the re-encoded JSON, and accepted.
  respelled = json.dumps(json.loads(raw), indent=1).encode()
  assert _decoded_or_error(json.loads(respelled), respelled) == _decoded_or_error(json.loads(raw), raw)
