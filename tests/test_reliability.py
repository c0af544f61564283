"""Reliability: crashes, hostile metadata, io_uring refused, full disks,
resource leaks and misuse.

  1. SIGKILL of a saving process at random moments: the latest committed step
     always restores bit-exact.
  2. 1,000 seeded mutations of fastpersist.json / manifests, plus crafted
     hostile cases: only FastPersistErrors (or exact data), no hang, no huge
     allocation.
  3. io_uring refused by a seccomp filter: fallback engine, warning, round trip.
  4. ENOSPC on a small tmpfs: clear error, previous step intact, next save works.
  5. 100 saves: no growth in fds, threads or RSS.
  6. Misuse: saves in flight together, close() during a save, restore of a
     step still being written.

Several tests run a child Python process. The children are this very file,
run as a script with a role (`python tests/test_reliability.py ROLE ...`,
see `_CHILD_ROLES` at the bottom), so their code is ordinary, readable Python.
"""

from __future__ import annotations

import asyncio
import copy
import errno
import faulthandler
import gc
import json
import logging
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import mounted_tmpfs
from jax.sharding import NamedSharding, PartitionSpec as P

from fastpersist_jax import (CheckpointNotFoundError, CorruptCheckpointError, FastPersistError,
                             FastPersistHandler, FastPersistOptions, FastPersistRestore,
                             FastPersistSave, SaveError, UnsupportedLeafError, layout)

KiB = 1 << 10
MiB = 1 << 20
HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))

# Small staging so that a handler costs little memory; slabs of 1 MiB so that
# a few-MiB checkpoint is staged and written as several windows.
SMALL = dict(host_memory_limit=16 * MiB, staging_slab_bytes=1 * MiB)


# Helpers ----------------------------------------------------------------------------


def child_env(devices: int = 4, **extra: str) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.pop("FASTPERSIST_ENGINE", None)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  env["PYTHONUNBUFFERED"] = "1"
  env.update(extra)
  return env


def child_cmd(role: str, *args) -> list[str]:
  return [sys.executable, HERE, role, *map(str, args)]


def tree_bytes_equal(expected, actual) -> None:
  """Same structure, and every leaf bit for bit the same (dtype and shape too)."""
  e_flat, e_def = jax.tree_util.tree_flatten(expected)
  a_flat, a_def = jax.tree_util.tree_flatten(actual)
  assert e_def == a_def, (e_def, a_def)
  for e, a in zip(e_flat, a_flat):
    if isinstance(e, (jax.Array, np.ndarray, np.generic)):
      a_np, e_np = np.asarray(a), np.asarray(e)
      assert (a_np.dtype, a_np.shape) == (e_np.dtype, e_np.shape)
      assert a_np.tobytes() == e_np.tobytes()
    else:
      assert type(a) is type(e) and a == e, (e, a)


def abstract(tree):
  """Restore target: ShapeDtypeStructs (with shardings) for arrays, the rest as is."""
  def one(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(one, tree)


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests need XLA_FLAGS=--xla_force_host_platform_device_count=8"
  return jax.make_mesh((4, 2), ("data", "model"))


# 2. Hostile or broken metadata ------------------------------------------------------

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
  # Re-sealed (layout.seal), so that the validators behind the document's own
  # checksum are what each mutation tests.
  text = (layout.seal({k: v for k, v in doc.items() if k != "crc32c"}).decode()
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
  names = [layout.METADATA_FILE, layout.manifest_name(0)]
  originals = {n: open(os.path.join(d, n), "rb").read() for n in names}
  docs = {n: json.loads(raw) for n, raw in originals.items()}
  data_sizes = [os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.startswith("data.")]
  # Sanity: the pristine checkpoint restores.
  tree_bytes_equal(tree, handler.restore(d, args=FastPersistRestore(target)))

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
              tree_bytes_equal(tree, out)
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
  tree_bytes_equal(tree, handler.restore(d, args=FastPersistRestore(target)))


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
  os.unlink(os.path.join(d, layout.METADATA_FILE))
  os.mkfifo(os.path.join(d, layout.METADATA_FILE))  # open() of it would block forever


def _case_data_file_is_dev_zero(meta, man, d):
  name = man["files"][0]["name"]
  os.unlink(os.path.join(d, name))
  os.symlink("/dev/zero", os.path.join(d, name))


def _case_other_process_file(meta, man, d):
  shutil.copy(os.path.join(d, man["files"][0]["name"]), os.path.join(d, "data.00001.0000.bin"))
  man["files"][0]["name"] = "data.00001.0000.bin"


def _set_leaf(key, **fields):
  def mutate(meta, man, d):
    meta["leaves"][_leaf_index(meta, key)].update(fields)
  return mutate


def _set_sharding(**fields):
  def mutate(meta, man, d):
    meta["leaves"][_leaf_index(meta, "w")]["sharding"].update(fields)
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
  meta_path, man_path = (os.path.join(d, n) for n in (layout.METADATA_FILE, layout.manifest_name(0)))
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
  meta = json.loads((d / layout.METADATA_FILE).read_text())
  man0 = json.loads((d / layout.manifest_name(0)).read_text())
  meta["process_count"] = 2
  man0["shards"] = [s for s in man0["shards"] if s["index"] != [[12, 16], [0, 4]]]
  block = host[2:6, 0:4].tobytes()  # true data, so every checksum is right
  (d / "data.00001.0000.bin").write_bytes(block)
  man1 = {"format": "fastpersist", "version": 1, "process_index": 1,
          "files": [{"name": "data.00001.0000.bin", "size": len(block)}],
          "shards": [{"leaf": 0, "index": [[2, 6], [0, 4]], "file": 0, "offset": 0,
                      "nbytes": len(block), "crc32c": crc32c.crc32c(block)}]}
  for name, doc in ((layout.METADATA_FILE, meta), (layout.manifest_name(0), man0),
                    (layout.manifest_name(1), man1)):
    (d / name).write_text(json.dumps(doc))
  with pytest.raises(CorruptCheckpointError):
    h.restore(d, args=FastPersistRestore({"w": np.zeros((16, 8), np.float32)}))
  h.close()


# 1. Crash consistency ---------------------------------------------------------------

CRASH_SHAPE = (512, 1024)      # uint32: 2 MiB, sharded
CRASH_HOST = 256 * 1024        # float32: 1 MiB, numpy


def crash_state(step: int, sharding=None) -> dict:
  """The state saved at `step`: every bit is a function of the step."""
  n = CRASH_SHAPE[0] * CRASH_SHAPE[1]
  w = (np.arange(n, dtype=np.uint32) * np.uint32(2654435761)) ^ np.uint32(
      (step * 0x9E3779B9 + 1) & 0xFFFFFFFF)
  w = w.reshape(CRASH_SHAPE)
  host = np.arange(CRASH_HOST, dtype=np.float32) * np.float32(step + 1)
  return {"w": jax.device_put(w, sharding) if sharding is not None else w,
          "host": host, "step": step}


def _slow_finalize_handler() -> FastPersistHandler:
  """A handler that announces finalize (Orbax calls it right before the
  commit rename) and lingers there, so the parent can kill inside the commit."""
  handler = FastPersistHandler(FastPersistOptions(**SMALL))
  finalize = handler.finalize

  def announced_finalize(directory):
    print(f"finalizing {os.path.basename(os.path.dirname(os.fspath(directory)))}", flush=True)
    time.sleep(0.05)
    finalize(directory)
  handler.finalize = announced_finalize
  return handler


def _child_crash_saver(directory: str) -> None:
  """Saves steps latest+1, latest+2, ... until killed."""
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  mngr = ocp.CheckpointManager(directory, item_handlers=_slow_finalize_handler(),
                               options=ocp.CheckpointManagerOptions(max_to_keep=3))
  latest = mngr.latest_step()
  step = 0 if latest is None else latest + 1
  print(f"start {step}", flush=True)
  while True:
    state = crash_state(step, sharding)
    print(f"saving {step}", flush=True)
    mngr.save(step, args=FastPersistSave(state))
    print(f"saved {step}", flush=True)  # => step - 1 is committed (save waits for it)
    step += 1


class _Child:
  """A child process whose stdout lines are collected by a thread."""

  def __init__(self, cmd, env, stderr_path):
    self._stderr = open(stderr_path, "wb")
    self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=self._stderr,
                                 text=True, bufsize=1)
    self.lines: list[str] = []
    self._cond = threading.Condition()
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()
    self._stderr_path = stderr_path

  def _read(self):
    for line in self.proc.stdout:
      with self._cond:
        self.lines.append(line.strip())
        self._cond.notify_all()
    with self._cond:
      self.lines.append(None)
      self._cond.notify_all()

  def wait_for(self, prefix: str, count: int = 1, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with self._cond:
      while sum(1 for l in self.lines if l and l.startswith(prefix)) < count:
        if None in self.lines or time.monotonic() > deadline:
          self.kill()
          raise AssertionError(f"child did not print {count} x {prefix!r}; stdout "
                               f"{self.lines[-5:]}, stderr:\n{self.stderr_tail()}")
        self._cond.wait(0.05)

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGKILL)
    self.proc.wait()
    self._reader.join(10)
    self._stderr.close()

  def stderr_tail(self) -> str:
    if not self._stderr.closed:
      self._stderr.flush()
    with open(self._stderr_path, "rb") as f:
      return f.read()[-3000:].decode(errors="replace")

  def steps(self, prefix: str) -> list[int]:
    return [int(l.split()[1]) for l in self.lines if l and l.startswith(prefix + " ")]


def test_crash_consistency_under_sigkill(mesh, tmp_path):
  root = os.fspath(tmp_path / "ckpts")
  rng = random.Random(2024)
  handler = FastPersistHandler(FastPersistOptions(**SMALL))
  target = {"w": jax.ShapeDtypeStruct(CRASH_SHAPE, np.uint32, sharding=NamedSharding(mesh, P("data"))),
            "host": np.zeros(CRASH_HOST, np.float32), "step": 0}
  kills, mid_save, committed_before = 12, 0, -1
  history, half_deleted = [], []
  for k in range(kills):
    child = _Child(child_cmd("crash_saver", root), child_env(4), tmp_path / f"stderr.{k}")
    try:
      child.wait_for("start", timeout=120)
      mode = k % 4
      if mode == 0:    # shortly after a save starts: snapshot, tmp dir creation
        child.wait_for("saving", rng.randint(1, 3))
      elif mode == 1:  # shortly after a save returned: its writes, fsyncs, rename
        child.wait_for("saved", rng.randint(1, 3))
      elif mode == 3:  # inside finalize, just before Orbax's commit rename
        child.wait_for("finalizing", rng.randint(1, 3))
      time.sleep(rng.uniform(0, 0.4 if mode == 2 else 0.03))
    finally:
      child.kill()
    saved = child.steps("saved")
    leftovers = sorted(n for n in os.listdir(root) if "tmp" in n) if os.path.isdir(root) else []
    mid_save += bool(leftovers)

    # A fresh manager sees a committed latest step that restores bit-exact.
    mngr = ocp.CheckpointManager(root, item_handlers=handler,
                                 options=ocp.CheckpointManagerOptions(read_only=True))
    try:
      latest = mngr.latest_step()
      history.append((k, mode, child.steps("start"), saved[-1:], latest, leftovers))
      if saved and saved[-1] >= 1:  # `saved s` comes after save(s) waited for s - 1's commit
        assert latest is not None and latest >= saved[-1] - 1, history
      if latest is None:
        assert committed_before < 0, f"committed steps vanished: {history}"
        continue
      assert latest >= committed_before, f"latest step went back: {history}"
      committed_before = latest
      out = mngr.restore(latest, args=FastPersistRestore(target))
      tree_bytes_equal(crash_state(latest), out)
      # Older steps restore bit-exact too, except one that Orbax was deleting
      # (max_to_keep=3) when the kill came: Orbax removes a step in place, so
      # that one is still listed, half gone. It must fail loudly (never give
      # other data), and can only be older than the 3 steps kept.
      steps = sorted(mngr.all_steps())
      for step in steps:
        if step != latest:
          try:
            tree_bytes_equal(crash_state(step), mngr.restore(step, args=FastPersistRestore(target)))
          except (FastPersistError, KeyError, FileNotFoundError, ValueError) as e:
            assert step not in steps[-3:], f"kept step {step} does not restore: {e!r} {history}"
            half_deleted.append((step, type(e).__name__))
    finally:
      mngr.close()
  handler.close()
  assert committed_before >= 6, f"too few saves got through: {history} {half_deleted}"
  # Most kills must have hit a save in progress, i.e. left an uncommitted tmp dir.
  assert mid_save >= kills // 3, f"only {mid_save} of {kills} kills interrupted a save: {history}"


# 3. io_uring refused by seccomp -------------------------------------------------------

# Installs a seccomp filter under which io_uring_setup(2) fails with errno
# argv[1], then execs argv[2:]. Filters are inherited and cannot be removed,
# so everything the child runs (Python, liburing) sees io_uring refused, the
# way it is in default Docker profiles and on hardened kernels.
_SECCOMP_HELPER_C = r"""
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#define ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define ARCH AUDIT_ARCH_AARCH64
#else
#error "unsupported architecture"
#endif

int main(int argc, char** argv) {
  if (argc < 3) return 2;
  const unsigned err = (unsigned)atoi(argv[1]);
  struct sock_filter filter[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ARCH, 1, 0),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (err & SECCOMP_RET_DATA)),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  struct sock_fprog prog = {sizeof(filter) / sizeof(filter[0]), filter};
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
    fprintf(stderr, "SECCOMP-UNAVAILABLE prctl(PR_SET_NO_NEW_PRIVS): %s\n", strerror(errno));
    return 77;
  }
  if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) != 0) {
    fprintf(stderr, "SECCOMP-UNAVAILABLE prctl(PR_SET_SECCOMP): %s\n", strerror(errno));
    return 77;
  }
  /* The filter works: io_uring_setup itself must now fail with `err`. */
  long rc = syscall(__NR_io_uring_setup, 4, NULL);
  if (rc != -1 || errno != (int)err) {
    fprintf(stderr, "SECCOMP-UNAVAILABLE filter not effective (rc %ld, errno %d)\n", rc, errno);
    return 77;
  }
  execv(argv[2], argv + 2);
  fprintf(stderr, "execv %s: %s\n", argv[2], strerror(errno));
  return 127;
}
"""


@pytest.fixture(scope="module")
def seccomp_helper(tmp_path_factory):
  gcc = shutil.which("gcc") or shutil.which("cc")
  if gcc is None:
    pytest.skip("no C compiler to build the seccomp helper")
  d = tmp_path_factory.mktemp("seccomp")
  src, exe = d / "no_io_uring.c", d / "no_io_uring"
  src.write_text(_SECCOMP_HELPER_C)
  r = subprocess.run([gcc, "-O1", "-o", exe, src], capture_output=True, text=True)
  if r.returncode != 0:
    pytest.skip(f"cannot build the seccomp helper (linux headers missing?): {r.stderr[-500:]}")
  return os.fspath(exe)


def _child_no_io_uring(directory: str) -> None:
  """Under the seccomp filter: what engine 'auto' and 'io_uring' do."""
  from fastpersist_jax import _ext  # pylint: disable=g-import-not-at-top
  warnings: list[str] = []

  class Collect(logging.Handler):
    def emit(self, record):
      if record.levelno >= logging.WARNING:
        warnings.append(record.getMessage())

  logging.getLogger("fastpersist_jax").addHandler(Collect())
  result: dict = {}
  try:
    _ext.Engine("io_uring")
    result["raw_ring"] = "created"
  except Exception as e:  # pylint: disable=broad-except
    result["raw_ring"] = f"{type(e).__name__}: {e}"
  h = FastPersistHandler(FastPersistOptions(**SMALL))
  result["engine_kind"] = h.engine_kind
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  rng = np.random.default_rng(5)
  tree = {"w": jax.device_put(rng.standard_normal((64, 300), np.float32),
                              NamedSharding(mesh, P("data"))),
          "b": jax.device_put(jnp.asarray(rng.standard_normal(1000), jnp.bfloat16), mesh.devices.flat[1]),
          "host": rng.integers(0, 2**31, 5000, np.int64), "step": 3}
  ckptr = ocp.Checkpointer(h)
  ckptr.save(os.path.join(directory, "c"), args=FastPersistSave(tree))
  out = ckptr.restore(os.path.join(directory, "c"), args=FastPersistRestore(abstract(tree)))
  try:
    tree_bytes_equal(tree, out)
    result["round_trip"] = "bit-exact"
  except AssertionError as e:
    result["round_trip"] = f"differs: {e}"
  result["warnings"] = list(warnings)
  try:
    FastPersistHandler(FastPersistOptions(engine="io_uring"))
    result["explicit"] = "no error"
  except Exception as e:  # pylint: disable=broad-except
    result["explicit"] = f"{type(e).__name__}: {e}"
  h.close()
  print("RESULT " + json.dumps(result), flush=True)


@pytest.mark.parametrize("refusal", ["EPERM", "ENOSYS"])
def test_io_uring_refused_by_seccomp_falls_back(seccomp_helper, tmp_path, refusal):
  err = getattr(errno, refusal)
  r = subprocess.run([seccomp_helper, str(err), sys.executable, HERE, "no_io_uring", tmp_path],
                     env=child_env(4), capture_output=True, text=True, timeout=180)
  if r.returncode == 77 and "SECCOMP-UNAVAILABLE" in r.stderr:
    pytest.skip(r.stderr.strip().splitlines()[-1])
  lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
  assert r.returncode == 0 and lines, f"child failed ({r.returncode}):\n{r.stderr[-4000:]}"
  result = json.loads(lines[-1][len("RESULT "):])
  assert result["raw_ring"].startswith("RingUnavailable"), result
  assert os.strerror(err) in result["raw_ring"], result
  assert result["engine_kind"] == "threads", result
  assert any("io_uring is unavailable" in w and "thread-pool" in w for w in result["warnings"]), result
  assert result["round_trip"] == "bit-exact", result
  # Asked for explicitly, io_uring is an error that says why.
  assert result["explicit"].startswith("IOUringUnavailableError"), result
  assert "io_uring" in result["explicit"] and os.strerror(err) in result["explicit"], result


# 4. Out of space ---------------------------------------------------------------------


def small_tmpfs(size: str):
  return mounted_tmpfs(f"size={size}")


def _errnos_in_chain(e: BaseException) -> list:
  seen, out = set(), []
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    out.append(getattr(e, "errno", None))
    e = e.__cause__ or e.__context__
  return out


def _sharded_tree(mesh, rows: int, seed: int) -> dict:
  """rows x 1024 float32 (rows * 4 KiB), sharded over the whole mesh."""
  rng = np.random.default_rng(seed)
  return {"w": jax.device_put(rng.standard_normal((rows, 1024), np.float32),
                              NamedSharding(mesh, P("data", "model"))),
          "seed": seed}


def test_out_of_space(mesh):
  h = FastPersistHandler(FastPersistOptions(**SMALL))
  with small_tmpfs("8m") as mnt:
    # Through a CheckpointManager: step 0 fits, step 1 (7 MiB more) does not.
    root = os.path.join(mnt, "ckpts")
    mngr = ocp.CheckpointManager(root, item_handlers=h,
                                 options=ocp.CheckpointManagerOptions(max_to_keep=5))
    step0 = _sharded_tree(mesh, 512, seed=0)     # 2 MiB
    mngr.save(0, args=FastPersistSave(step0))
    mngr.wait_until_finished()
    faulthandler.dump_traceback_later(120, exit=True)
    try:
      with pytest.raises(Exception) as ei:
        mngr.save(1, args=FastPersistSave(_sharded_tree(mesh, 1792, seed=1)))  # 7 MiB
        mngr.wait_until_finished()
      assert errno.ENOSPC in _errnos_in_chain(ei.value), (
          f"no ENOSPC in the chain of {ei.value!r}: {_errnos_in_chain(ei.value)}")
      # Step 0 is intact and still the latest; step 1 was never committed, and
      # its partial data files are gone (the space is free again).
      for m in (mngr, ocp.CheckpointManager(root, item_handlers=FastPersistHandler(),
                                            options=ocp.CheckpointManagerOptions(read_only=True))):
        m.reload()
        assert m.latest_step() == 0 and m.all_steps() == [0]
      assert "1" not in os.listdir(root)
      for name in os.listdir(root):
        if "tmp" in name:
          for dirpath, _, files in os.walk(os.path.join(root, name)):
            assert not [f for f in files if f.startswith("data.")], (dirpath, files)
      tree_bytes_equal(step0, mngr.restore(0, args=FastPersistRestore(abstract(step0))))
      # The same handler (and staging pool) saves again once the tree fits.
      step2 = _sharded_tree(mesh, 512, seed=2)
      mngr.save(2, args=FastPersistSave(step2))
      mngr.wait_until_finished()
      assert mngr.latest_step() == 2
      tree_bytes_equal(step2, mngr.restore(2, args=FastPersistRestore(abstract(step2))))
      mngr.close()

      # The handler alone: a SaveError caused by ENOSPC; nothing left behind.
      shutil.rmtree(root)
      d = os.path.join(mnt, "direct")
      os.mkdir(d)
      with pytest.raises(FastPersistError) as ei:
        h.save(d, args=FastPersistSave(_sharded_tree(mesh, 2304, seed=3)))  # 9 MiB
      assert errno.ENOSPC in _errnos_in_chain(ei.value), _errnos_in_chain(ei.value)
      assert not [f for f in os.listdir(d) if f.startswith("data.")], os.listdir(d)
      again = _sharded_tree(mesh, 1024, seed=4)
      h.save(d, args=FastPersistSave(again))
      tree_bytes_equal(again, h.restore(d, args=FastPersistRestore(abstract(again))))
    finally:
      faulthandler.cancel_dump_traceback_later()
  h.close()


# 5. Resource stability ------------------------------------------------------------------


def _resources() -> dict[str, int]:
  gc.collect()
  status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
  return {"fds": len(os.listdir("/proc/self/fd")),
          "py_threads": threading.active_count(),
          "os_threads": int(status["Threads"]),
          "rss_kib": int(status["VmRSS"].split()[0])}


def test_resources_stable_over_100_saves(mesh, tmp_path):
  sharding = NamedSharding(mesh, P("data", "model"))
  base = np.arange(128 * 256, dtype=np.float32).reshape(128, 256)
  h = FastPersistHandler(FastPersistOptions(**SMALL))
  seen = {}
  with ocp.CheckpointManager(tmp_path / "ckpts", item_handlers=h,
                             options=ocp.CheckpointManagerOptions(max_to_keep=2)) as mngr:
    for step in range(1, 101):
      tree = {"w": jax.device_put(base + step, sharding), "host": np.full(3000, step, np.int32),
              "step": step}
      mngr.save(step, args=FastPersistSave(tree))
      if step in (10, 100):
        mngr.wait_until_finished()
        seen[step] = _resources()
    assert mngr.all_steps() == [99, 100]
    tree_bytes_equal(tree, mngr.restore(100, args=FastPersistRestore(abstract(tree))))
  h.close()
  a, b = seen[10], seen[100]
  assert b["fds"] - a["fds"] <= 2, seen
  assert b["py_threads"] - a["py_threads"] <= 2, seen
  assert b["os_threads"] - a["os_threads"] <= 2, seen
  assert b["rss_kib"] - a["rss_kib"] <= 48 * 1024, seen


# 6. Misuse ---------------------------------------------------------------------------


def _big_tree(mesh, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"w": jax.device_put(rng.standard_normal((768, 1024), np.float32),   # 3 MiB
                              NamedSharding(mesh, P("data"))),
          "host": rng.integers(0, 255, 300_000, np.uint8), "seed": seed}


def test_two_saves_in_flight_on_one_handler(mesh, tmp_path):
  # A staging pool smaller than one save: the two saves compete for slabs.
  h = FastPersistHandler(FastPersistOptions(host_memory_limit=2 * MiB, staging_slab_bytes=1 * MiB))
  trees = [_big_tree(mesh, 10), _big_tree(mesh, 11)]
  dirs = [tmp_path / "a", tmp_path / "b"]
  for d in dirs:
    d.mkdir()

  async def both():
    f1 = await h.async_save(dirs[0], args=FastPersistSave(trees[0]))
    f2 = await h.async_save(dirs[1], args=FastPersistSave(trees[1]))  # before f1 finished
    return list(f1 or []) + list(f2 or [])

  faulthandler.dump_traceback_later(120, exit=True)
  try:
    futures = asyncio.run(both())
    for f in futures:
      f.result()
  finally:
    faulthandler.cancel_dump_traceback_later()
  for d, tree in zip(dirs, trees):
    tree_bytes_equal(tree, h.restore(d, args=FastPersistRestore(abstract(tree))))

  # Through a CheckpointManager, back to back: Orbax serialises them.
  with ocp.CheckpointManager(tmp_path / "m", item_handlers=h) as mngr:
    mngr.save(0, args=FastPersistSave(trees[0]))
    mngr.save(1, args=FastPersistSave(trees[1]))
    mngr.wait_until_finished()
    for step, tree in enumerate(trees):
      tree_bytes_equal(tree, mngr.restore(step, args=FastPersistRestore(abstract(tree))))
  h.close()


def test_close_waits_for_in_flight_save(mesh, tmp_path):
  tree = _big_tree(mesh, 12)
  h = FastPersistHandler(FastPersistOptions(**SMALL))
  d = tmp_path / "c"
  d.mkdir()

  async def start():
    return await h.async_save(d, args=FastPersistSave(tree))

  futures = asyncio.run(start())
  h.close()  # must wait for the commit, not cut it off
  for f in futures:
    f.result()  # already done, and without an error
  assert {layout.METADATA_FILE, layout.manifest_name(0)} <= set(os.listdir(d))
  fresh = FastPersistHandler(FastPersistOptions(**SMALL))
  tree_bytes_equal(tree, fresh.restore(d, args=FastPersistRestore(abstract(tree))))

  # The same through an AsyncCheckpointer: close() leaves a committed checkpoint.
  ckptr = ocp.AsyncCheckpointer(FastPersistHandler(FastPersistOptions(**SMALL)))
  ckptr.save(tmp_path / "async", args=FastPersistSave(tree))
  ckptr.close()
  assert (tmp_path / "async").is_dir()
  tree_bytes_equal(tree, fresh.restore(tmp_path / "async", args=FastPersistRestore(abstract(tree))))
  fresh.close()


def test_restore_while_being_written(mesh, tmp_path):
  tree = _big_tree(mesh, 13)
  final = tmp_path / "ckpt"
  reader = FastPersistHandler(FastPersistOptions(**SMALL))
  ckptr = ocp.AsyncCheckpointer(FastPersistHandler(FastPersistOptions(**SMALL)))
  outcomes: dict[str, int] = {}
  ckptr.save(final, args=FastPersistSave(tree))
  try:
    # Another reader, while the save runs: the final path is not there yet
    # (Orbax writes a tmp dir, then renames it), so restoring it must fail
    # loudly; the tmp dir must never give partial data either.
    with pytest.raises((FileNotFoundError, FastPersistError)):
      ocp.Checkpointer(reader).restore(final, args=FastPersistRestore(abstract(tree)))
    deadline = time.monotonic() + 60
    while not final.exists() and time.monotonic() < deadline:
      for tmp in tmp_path.glob("ckpt.orbax-checkpoint-tmp*"):
        with pytest.raises((ValueError, FileNotFoundError)):  # Orbax: "incomplete checkpoint"
          ocp.Checkpointer(reader).restore(tmp, args=FastPersistRestore(abstract(tree)))
        try:
          out = reader.restore(tmp / "default" if (tmp / "default").is_dir() else tmp,
                               args=FastPersistRestore(abstract(tree)))
          tree_bytes_equal(tree, out)
          outcomes["complete"] = outcomes.get("complete", 0) + 1
        except (CheckpointNotFoundError, CorruptCheckpointError) as e:
          outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
        except FileNotFoundError:  # the tmp dir was renamed meanwhile
          outcomes["renamed"] = outcomes.get("renamed", 0) + 1
  finally:
    ckptr.wait_until_finished()
  # The writer's own restore waits for its save; then everything is there.
  tree_bytes_equal(tree, ckptr.restore(final, args=FastPersistRestore(abstract(tree))))
  tree_bytes_equal(tree, ocp.Checkpointer(reader).restore(final, args=FastPersistRestore(abstract(tree))))
  ckptr.close()
  reader.close()


def _within(seconds: float, fn):
  """fn() on a thread; fails the test (instead of hanging it) past `seconds`."""
  out: dict = {}

  def run():
    try:
      out["value"] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      out["error"] = e
  t = threading.Thread(target=run, daemon=True)
  t.start()
  t.join(seconds)
  assert not t.is_alive(), f"hung for {seconds} s"
  if "error" in out:
    raise out["error"]
  return out.get("value")


@pytest.mark.parametrize("snapshot", ["copy", "auto", "reference"])
def test_failed_copy_returns_its_slab(mesh, tmp_path, monkeypatch, snapshot):
  # With a one-slab pool, a slab lost by a failed save would hang the next.
  from fastpersist_jax import staging
  h = FastPersistHandler(FastPersistOptions(snapshot=snapshot, host_memory_limit=1 * MiB,
                                            staging_slab_bytes=1 * MiB))
  real = staging._ext.copy_many
  calls = []

  def failing_once(copies, threads):
    calls.append(1)
    if len(calls) == 1:
      raise OSError(errno.EFAULT, "injected copy failure")
    return real(copies, threads)
  monkeypatch.setattr(staging._ext, "copy_many", failing_once)
  tree = _big_tree(mesh, 21)
  with pytest.raises(SaveError, match="injected copy failure"):
    _within(60, lambda: h.save(tmp_path / "bad", args=FastPersistSave(tree)))
  _within(60, lambda: h.save(tmp_path / "good", args=FastPersistSave(tree)))
  tree_bytes_equal(tree, h.restore(tmp_path / "good", args=FastPersistRestore(abstract(tree))))
  h.close()


@pytest.mark.parametrize("failing_call", [1, 2])
def test_no_thread_for_a_stage_fails_the_save_without_hanging(mesh, tmp_path, monkeypatch,
                                                              failing_call):
  from fastpersist_jax import workers
  real = workers.Workers.run
  calls = []

  def run(self, fn, *args):
    calls.append(fn)
    if len(calls) == failing_call:
      raise RuntimeError("can't start new thread")
    return real(self, fn, *args)
  monkeypatch.setattr(workers.Workers, "run", run)
  h = FastPersistHandler(FastPersistOptions(snapshot="auto", **SMALL))
  ckptr = ocp.AsyncCheckpointer(h)
  tree = _big_tree(mesh, 22)
  with pytest.raises(Exception, match="can't start new thread"):
    _within(60, lambda: (ckptr.save(tmp_path / "bad", args=FastPersistSave(tree)),
                         ckptr.wait_until_finished()))
  assert not (tmp_path / "bad").exists()
  monkeypatch.undo()
  _within(60, lambda: (ckptr.save(tmp_path / "good", args=FastPersistSave(tree)),
                       ckptr.wait_until_finished()))
  ckptr.close()


def test_cached_plan_does_not_let_an_unsupported_key_through(mesh, tmp_path):
  # {1: x}, {True: x} and {1.0: x} have equal tree structures; only the
  # first can be saved, whatever was saved before.
  h = FastPersistHandler(FastPersistOptions(**SMALL))
  x = jnp.arange(8.0)
  h.save(tmp_path / "int", args=FastPersistSave({1: x}))
  for bad in ({True: x}, {1.0: x}):
    with pytest.raises(UnsupportedLeafError, match="dict keys"):
      h.save(tmp_path / f"bad{len(os.listdir(tmp_path))}", args=FastPersistSave(bad))
  h.close()


# Child processes ---------------------------------------------------------------------

_CHILD_ROLES = {
    "crash_saver": _child_crash_saver,
    "no_io_uring": _child_no_io_uring,
}

if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] in _CHILD_ROLES:
    _CHILD_ROLES[sys.argv[1]](*sys.argv[2:])
  else:  # run as a test binary (Bazel's py_test runs this file): the tests themselves
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
