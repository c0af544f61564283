"""Attacks on format version 3 ("arrays" descriptions shared by leaves, one
sharding record per distinct sharding), the restore read pipeline (buffer
offsets planned per batch on the building thread, small parts checked
there, large ones on the verify thread, swapped parts copied in from
memory) and the target matching of treepath (is_empty_node by type,
key_of on live key paths), through the public API.

The first three were bugs (a target naming one saved leaf twice got another
leaf's bytes; an unhashable leaf class and an unknown target key kind
raised a bare TypeError), fixed since; all stay as regression tests. The
two-process test runs in conftest's shared launch (its processes' part is
tests/mp_swap_threshold.py).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sys

import helpers  # pylint: disable=g-bad-import-order  (sets XLA_FLAGS before jax is imported)
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import tree_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from fastpersist_jax import (ChecksumMismatchError, CorruptCheckpointError, FastPersistError,
                             FastPersistHandler,
                             FastPersistOptions, FastPersistRestore, FastPersistSave,
                             RestoreMismatchError, UnsupportedLeafError, disk_format)
from fastpersist_jax import restore as restore_lib

from helpers import KiB, assert_tree_bytes_equal, raw_bytes



def _flip_byte(item: str, rec: disk_format.ShardRecord, at: int) -> None:
  """Flips one bit of byte `at` of saved record `rec` of process 0."""
  with open(os.path.join(item, disk_format.data_file_name(0, rec.file)), "r+b") as f:
    f.seek(rec.offset + at)
    b = f.read(1)
    f.seek(rec.offset + at)
    f.write(bytes([b[0] ^ 1]))


# Target matching: two target leaves naming one saved leaf ---------------------

class _TwoNamesForW:
  """A custom node whose children are keyed ['u'], ['w'] and .w: key_of
  gives both of the last two the name "w" (the save refuses such a tree;
  a restore target of it names the saved leaf "w" twice)."""

  def __init__(self, u, w_item, w_attr):
    self.u, self.w_item, self.w_attr = u, w_item, w_attr


tree_util.register_pytree_with_keys(
    _TwoNamesForW,
    lambda n: ([(tree_util.DictKey("u"), n.u), (tree_util.DictKey("w"), n.w_item),
                (tree_util.GetAttrKey("w"), n.w_attr)], None),
    lambda _, children: _TwoNamesForW(*children))


@pytest.mark.parametrize("verify", [True, False])
def test_a_target_naming_one_saved_leaf_twice_in_two_batches_is_refused_or_restored(
    tmp_path, verify):
  device = SingleDeviceSharding(jax.devices()[0])
  tree = {"u": jax.device_put(np.arange(1000, dtype=np.float32) + 7, device),
          "w": jax.device_put(np.arange(1000, dtype=np.float32), device)}
  item = str(tmp_path / "item")
  FastPersistHandler().save(item, args=FastPersistSave(tree))
  sds = jax.ShapeDtypeStruct((1000,), np.float32, sharding=device)
  # 8 KiB batches: ['u'] and ['w'] in the first (at 0 and 4096), .w alone in the second (at 0).
  handler = FastPersistHandler(FastPersistOptions(restore_batch_bytes=8 * KiB,
                                                  verify_checksums=verify))
  try:
    restored = handler.restore(item, args=FastPersistRestore(_TwoNamesForW(sds, sds, sds)))
  except RestoreMismatchError:
    return   # refused, as the save refuses such a tree: fine
  except ChecksumMismatchError as e:
    pytest.fail(f"intact data reported as corrupt: {e}")
  np.testing.assert_array_equal(np.asarray(restored.u), np.asarray(tree["u"]))
  np.testing.assert_array_equal(np.asarray(restored.w_item), np.asarray(tree["w"]))
  np.testing.assert_array_equal(np.asarray(restored.w_attr), np.asarray(tree["w"]))


# Bare exceptions from target matching -------------------------------------------

class _EqualityMeta(type):
  """A metaclass that defines __eq__ (and so leaves its classes unhashable)."""

  def __eq__(cls, other):
    return cls is other


class _Unhashable(metaclass=_EqualityMeta):
  pass


def test_a_leaf_of_an_unhashable_class_is_refused_with_a_fastpersist_error(tmp_path):
  item = str(tmp_path / "item")
  with pytest.raises(UnsupportedLeafError):
    FastPersistHandler().save(item, args=FastPersistSave({"w": _Unhashable()}))
  FastPersistHandler().save(item, args=FastPersistSave({"w": np.arange(3.0)}))
  with pytest.raises(RestoreMismatchError):
    FastPersistHandler().restore(item, args=FastPersistRestore({"w": _Unhashable()}))


class _Key:
  """A key path entry of a kind treepath does not record (jax accepts any)."""

  def __hash__(self):
    return 1

  def __eq__(self, other):
    return isinstance(other, _Key)

  def __str__(self):
    return ".key"


class _Keyed:
  def __init__(self, a):
    self.a = a


tree_util.register_pytree_with_keys(_Keyed, lambda n: ([(_Key(), n.a)], None),
                                    lambda _, children: _Keyed(*children))


def test_a_target_key_of_an_unknown_kind_is_a_restore_mismatch(tmp_path):
  item = str(tmp_path / "item")
  with pytest.raises(UnsupportedLeafError):
    FastPersistHandler().save(str(tmp_path / "refused"),
                              args=FastPersistSave({"w": _Keyed(np.arange(3.0))}))
  FastPersistHandler().save(item, args=FastPersistSave({"w": np.arange(3.0)}))
  with pytest.raises(RestoreMismatchError):
    FastPersistHandler().restore(item, args=FastPersistRestore({"w": _Keyed(np.zeros(3))}))


@pytest.mark.parametrize("key", [True, 1.0, np.int64(1)], ids=["bool", "float", "numpy int"])
def test_a_target_dict_key_the_save_would_refuse_names_no_saved_leaf(tmp_path, key):
  # Saved under the int key 1. A target key that is equal to 1 but that no
  # save records (the save refuses such keys) is not taken for it.
  item = str(tmp_path / "item")
  FastPersistHandler().save(item, args=FastPersistSave({1: np.arange(3.0)}))
  with pytest.raises(RestoreMismatchError, match=r"of the restore target: dict keys must be"):
    FastPersistHandler().restore(item, args=FastPersistRestore({key: np.zeros(3)}))
  restored = FastPersistHandler().restore(item, args=FastPersistRestore({1: np.zeros(3)}))
  np.testing.assert_array_equal(restored[1], np.arange(3.0))


@pytest.mark.parametrize("edit,message", [
    (lambda doc: doc["leaves"][1].update(path=[["d", "b", "extra"]]),
     "metadata leaf 1: malformed key path entry"),
    (lambda doc: doc["leaves"][1].pop("kind"), "metadata leaf 1: missing field 'kind'"),
    (lambda doc: doc["arrays"][0].update(dtype="f8"), "metadata leaf 0: unsupported dtype")],
    ids=["path", "kind", "shared description"])
def test_a_malformed_leaf_record_names_the_file_and_the_leaf(tmp_path, edit, message):
  item = str(tmp_path / "item")
  FastPersistHandler().save(item, args=FastPersistSave({"a": np.arange(3.0), "b": 2}))
  helpers.reseal_metadata(item, edit)
  path = os.path.join(item, disk_format.METADATA_FILE)
  with pytest.raises(CorruptCheckpointError, match="^" + re.escape(f"{path}: {message}")):
    FastPersistHandler().restore(item)


# What holds --------------------------------------------------------------------

def test_restore_as_saved_rebuilds_each_sharding_among_similar_ones(tmp_path):
  # One sharding record per distinct sharding (plan._sharding_record) and one
  # "arrays" entry per distinct description: leaves whose shardings differ
  # only in memory kind, device order, axis types, mesh shape, a trailing
  # None, or that are typed keys / their key data on the same sharding must
  # each come back on their own sharding; equal ones share an entry.
  devices = jax.devices()
  mesh = Mesh(np.array(devices).reshape(4, 2), ("data", "model"))
  reversed_mesh = Mesh(np.array(devices[::-1]).reshape(4, 2), ("data", "model"))
  explicit = Mesh(np.array(devices).reshape(4, 2), ("data", "model"),
                  axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  wide = Mesh(np.array(devices).reshape(2, 4), ("data", "model"))
  x = np.arange(64, dtype=np.float32).reshape(8, 8)
  named = lambda m, *spec, kind=None: NamedSharding(m, P(*spec), memory_kind=kind)
  keys = jax.random.split(jax.random.key(0), 8)
  tree = {
      "a": jax.device_put(x, named(mesh, "data")),
      "a_again": jax.device_put(x + 1, named(mesh, "data")),
      "reversed": jax.device_put(x, named(reversed_mesh, "data")),
      "explicit": jax.device_put(x, named(explicit, "data")),
      "wide": jax.device_put(x, named(wide, "data")),
      "pinned": jax.device_put(x, named(mesh, "data", kind="pinned_host")),
      "unpinned": jax.device_put(x, named(mesh, "data", kind="unpinned_host")),
      "trailing_none": jax.device_put(x, named(mesh, "data", None)),
      "one": jax.device_put(x, SingleDeviceSharding(devices[3])),
      "one_pinned": jax.device_put(x, SingleDeviceSharding(devices[3], memory_kind="pinned_host")),
      "keys": jax.device_put(keys, named(mesh, "data")),
      "keys_reversed": jax.device_put(keys, named(reversed_mesh, "data")),
      "keys_pinned": jax.device_put(keys, named(mesh, "data", kind="pinned_host")),
      "key_data": jax.device_put(jax.random.key_data(keys), named(mesh, "data")),
      "rbg": jax.device_put(jax.random.split(jax.random.key(0, impl="rbg"), 8),
                            named(mesh, "data")),
  }
  item = str(tmp_path / "item")
  FastPersistHandler().save(item, args=FastPersistSave(tree))
  with open(os.path.join(item, disk_format.METADATA_FILE)) as f:
    doc = json.load(f)
  refs = {leaf["path"][0][1]: leaf["array"] for leaf in doc["leaves"]}
  assert refs["a"] == refs["a_again"]
  assert len(set(refs.values())) == len(tree) - 1
  restored = FastPersistHandler().restore(item)
  abstract = FastPersistHandler().metadata(item)
  for k, v in tree.items():
    assert raw_bytes(restored[k]) == raw_bytes(v), k
    assert restored[k].sharding == v.sharding, (k, restored[k].sharding, v.sharding)
    assert abstract[k].sharding == v.sharding, (k, abstract[k].sharding, v.sharding)


def test_leaves_around_the_check_threshold_in_staged_small_batches(tmp_path, monkeypatch):
  # Parts just under, at and over 64 KiB, replicated and split, in batches
  # of at most 3 leaves and about 100 KiB read into the staging pool: exact
  # values as saved and resharded; then a damaged byte at either end of
  # each kind of part is refused (whichever thread checks it), and the same
  # handler then restores the intact copy (its slabs all came back).
  monkeypatch.setattr(restore_lib, "_STAGE_ON_CPU", True)
  monkeypatch.setattr(restore_lib, "_MAX_BATCH_LEAVES", 3)
  mesh = helpers.mesh_4x2()
  other = helpers.mesh_2x4()
  rng = np.random.default_rng(7)
  tree = {}
  # Rows of 4 n bytes split 4 ways ("data"): records of 65532, 65536 and 65540 bytes.
  for i, (n, spec) in enumerate([(16383, P("data")), (16384, P("data")), (16385, P("data")),
                                 (100, P()), (0, P()), (40000, P(None, "model")),
                                 (4096, P("data")), (2 * 16384, P(None, "model"))]):
    value = rng.standard_normal((4, n)).astype(np.float32)
    tree[f"l{i}"] = jax.device_put(value, NamedSharding(mesh, spec))
  item = str(tmp_path / "item")
  options = FastPersistOptions(restore_batch_bytes=100 * KiB, staging_slab_bytes=512 * KiB,
                               host_memory_limit=4 << 20)
  handler = FastPersistHandler(options)
  handler.save(item, args=FastPersistSave(tree))
  same = helpers.abstract(tree)
  moved = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
      other, P(None, "data") if x.shape[1] % 2 == 0 else P("model"))), tree)
  helpers.assert_trees_equal(tree, handler.restore(item, args=FastPersistRestore(same)))
  assert_tree_bytes_equal(tree, handler.restore(item, args=FastPersistRestore(moved)))

  meta = disk_format.read_metadata(item)
  records = disk_format.read_manifest(item, 0, meta).shards
  sizes = {}
  for rec in records:   # one record of each size: under, at and over the threshold
    if rec.nbytes:
      sizes.setdefault(rec.nbytes, rec)
  damaged = str(tmp_path / "damaged")
  for rec in sizes.values():
    for at in (0, rec.nbytes - 1):
      shutil.rmtree(damaged, ignore_errors=True)
      shutil.copytree(item, damaged)
      _flip_byte(damaged, rec, at)
      with pytest.raises(ChecksumMismatchError) as e:
        handler.restore(damaged, args=FastPersistRestore(same))
      where = (f"shard {list(map(list, rec.index))} (process 0, "
               f"{disk_format.data_file_name(0, rec.file)} @ {rec.offset})")
      assert where in str(e.value), (where, str(e.value))
  helpers.assert_trees_equal(tree, handler.restore(item, args=FastPersistRestore(same)))
  assert {r.nbytes for r in records} >= {16383 * 4, 16384 * 4, 16385 * 4}, sorted(sizes)


def test_a_leaf_pointed_at_another_description_restores_or_raises_a_fastpersist_error(
    tmp_path):
  # Every array leaf of a version 3 document, re-pointed at every other
  # "arrays" entry (document and manifest re-sealed): a restore with no
  # target, an abstract target or a numpy target, and item_metadata, either
  # raise a FastPersistError or give the other leaves exactly as saved.
  mesh = helpers.mesh_4x2()
  rng = np.random.default_rng(0)
  keys = jax.random.split(jax.random.key(1), 8)
  tree = {
      "w": jax.device_put(rng.standard_normal((16, 8), np.float32),
                          NamedSharding(mesh, P("data", "model"))),
      "w2": jax.device_put(rng.standard_normal((16, 8), np.float32),
                           NamedSharding(mesh, P("data", "model"))),
      "rep": jax.device_put(jnp.arange(12, dtype=jnp.int32), NamedSharding(mesh, P())),
      "keys": jax.device_put(keys, NamedSharding(mesh, P("data"))),
      "key_data": jax.device_put(jax.random.key_data(keys), NamedSharding(mesh, P("data"))),
      "host": rng.integers(0, 255, (5, 3), np.uint8),
      "scalar": np.float32(2.5),
      "empty": np.zeros((0, 4), np.int16),
  }
  item = str(tmp_path / "item")
  handler = FastPersistHandler()
  handler.save(item, args=FastPersistSave(tree))
  meta_path = os.path.join(item, disk_format.METADATA_FILE)
  manifest_path = os.path.join(item, disk_format.manifest_name(0))
  with open(meta_path) as f:
    doc = json.load(f)
  with open(manifest_path) as f:
    manifest = json.load(f)
  assert doc["version"] == 3
  targets = [None, helpers.abstract(tree), jax.tree.map(
      lambda x: np.asarray(x) if isinstance(x, jax.Array) and not helpers.is_prng_key(x) else x,
      tree)]
  names = [leaf["path"][0][1] for leaf in doc["leaves"]]
  outcomes = {"restored": 0, "refused": 0}
  for i, leaf in enumerate(doc["leaves"]):
    for j in range(len(doc["arrays"])):
      if j == leaf["array"]:
        continue
      edited = copy.deepcopy(doc)
      edited.pop("crc32c")
      edited["leaves"][i]["array"] = j
      raw = disk_format.seal(edited)
      with open(meta_path, "wb") as f:
        f.write(raw)
      m = {k: v for k, v in manifest.items() if k != "crc32c"}
      m["metadata_crc32c"] = json.loads(raw)["crc32c"]
      with open(manifest_path, "wb") as f:
        f.write(disk_format.seal(m))
      for target in targets:
        try:
          out = handler.restore(item, args=FastPersistRestore(target))
        except FastPersistError:
          outcomes["refused"] += 1
          continue
        outcomes["restored"] += 1
        for k, v in tree.items():
          if k != names[i] and not (target is None and k == "scalar"):
            assert raw_bytes(out[k]) == raw_bytes(v), (names[i], j, k)
      try:
        handler.metadata(item)
      except FastPersistError:
        pass
  assert outcomes["refused"] and outcomes["restored"], outcomes


# Multi-process: parts swapped between hosts, copied in from memory -------------

def test_swapped_parts_either_side_of_the_threshold_restore_exactly(two_process_runs):
  # A per-host checkpoint with replica-parallel parts (host redundancy 1):
  # each host holds half of every replicated shard and receives the rest
  # from the other (Restorer._BatchReads.copies). Parts of 4 KiB to 128 KiB,
  # in batches of at most 3 leaves and 100 KiB, staged or not, checked or
  # not; as saved and into an abstract target.
  # Run in conftest's shared two-process launch (scenario "swap_threshold"
  # of tests/mp_worker.py: tests/mp_swap_threshold.py).
  _, runs = two_process_runs
  p0, p1 = helpers.batch_results(runs, "swap_threshold")
  assert p0 == p1 == {"bad": [], "restores": 8, "swapped": True}, (p0, p1)


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))
