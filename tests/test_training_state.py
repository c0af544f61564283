"""Real training states round-trip: zero-size leaves, typed PRNG keys, casts,
scalars into arrays, targets from item_metadata, memory kinds, and exact
placement and structure when restoring without a target.

Every case saves and restores through ocp.CheckpointManager, as users do."""

from __future__ import annotations

import collections
import json
import os
import sys
import warnings

import helpers  # sets XLA_FLAGS before jax is imported
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from fastpersist_jax import (CorruptCheckpointError, FastPersistHandler, FastPersistOptions,
                             FastPersistRestore,
                             FastPersistSave, RestoreMismatchError, SaveError,
                             UnsupportedLeafError, disk_format, plan)
from helpers import (MiB, abstract, assert_trees_equal, leaf_fields,
                     with_array_fields_inline)


@pytest.fixture(scope="module")
def handler():
  h = FastPersistHandler(FastPersistOptions(host_memory_limit=16 * MiB, staging_slab_bytes=1 * MiB))
  yield h
  h.close()


@pytest.fixture
def manager(handler, tmp_path):
  """save(tree) -> step; restore(step, target) through one CheckpointManager."""
  mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_handlers=handler)

  class M:
    mgr = mngr
    step = 0

    def save(self, tree) -> int:
      M.step += 1
      mngr.save(M.step, args=FastPersistSave(tree))
      mngr.wait_until_finished()
      return M.step

    def restore(self, step, target=None):
      return mngr.restore(step, args=FastPersistRestore(target))

    def round_trip(self, tree, target=None):
      return self.restore(self.save(tree), target)

  yield M()
  mngr.close()


@pytest.fixture(scope="module")
def mesh():
  return helpers.mesh_2x4()


# Kind 1: never commit a step the reader rejects -------------------------------

ZERO_SIZE_CASES = [
    ("jax (0,) after a 12-byte leaf", lambda m: {"a": jnp.ones(3), "z": jnp.zeros((0,))}),
    ("jax (0, 16) first", lambda m: {"0": jnp.zeros((0, 16)), "a": jnp.ones(5, jnp.int8)}),
    ("jax (16, 0) sharded", lambda m: {"a": jnp.ones(7), "z": jax.device_put(
        jnp.zeros((16, 0)), NamedSharding(m, P("model")))}),
    ("numpy (0, 5) last", lambda m: {"a": jnp.ones(3), "b": np.ones(1001, np.int16),
                                     "z": np.zeros((0, 5), np.float32)}),
    ("only zero-size", lambda m: {"z": jnp.zeros((0,)), "y": np.zeros((0, 3))}),
    ("zero-size between", lambda m: [jnp.ones(9), jax.device_put(
        jnp.zeros((0, 8), jnp.bfloat16), NamedSharding(m, P(None, "data"))), jnp.arange(5)]),
]


@pytest.mark.parametrize("name,make", ZERO_SIZE_CASES, ids=[c[0] for c in ZERO_SIZE_CASES])
def test_zero_size_leaves_round_trip(manager, mesh, name, make):
  tree = make(mesh)
  step = manager.save(tree)
  assert_trees_equal(tree, manager.restore(step, tree))
  assert_trees_equal(tree, manager.restore(step, abstract(tree)))
  restored = manager.restore(step)   # no target: as saved
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(restored)):
    assert helpers.raw_bytes(a) == helpers.raw_bytes(b)


def test_a_save_whose_manifest_its_restore_would_reject_is_not_committed(manager, monkeypatch):
  # The zero-size bug in general form: a plan whose file sizes disagree with
  # what is written. The save must fail before commit, not commit a step
  # every restore then rejects.
  real = plan._assign_offsets

  def wrong_sizes(shards, data_file_bytes):
    placed, sizes = real(shards, data_file_bytes)
    return placed, [s + 4096 for s in sizes]

  monkeypatch.setattr(plan, "_assign_offsets", wrong_sizes)
  plan._PLAN_CACHE.clear()
  with pytest.raises(SaveError, match="restore would reject.*manifest says"):
    manager.save({"w": jnp.arange(10.0), "tag": np.int8(3)})
  monkeypatch.undo()
  plan._PLAN_CACHE.clear()
  assert manager.mgr.all_steps() == []


# Kind 2: every leaf a training state holds ------------------------------------

def test_typed_prng_keys_round_trip(manager, mesh):
  split = jax.device_put(jax.random.split(jax.random.key(7), 16), NamedSharding(mesh, P("model")))
  tree = {"rng": jax.random.key(0), "split": split,
          "rbg": jax.random.key(3, impl="rbg"), "unsafe": jax.random.key(4, impl="unsafe_rbg"),
          "legacy": jax.random.PRNGKey(5)}   # raw uint32 data: an ordinary array
  step = manager.save(tree)
  for target in (None, abstract(tree), manager.mgr.item_metadata(step),
                 jax.eval_shape(lambda: tree)):
    restored = manager.restore(step, target)
    assert_trees_equal(tree, restored, check_sharding=target is not None)
    # The restored keys draw the same numbers.
    assert np.array_equal(_draw(restored["split"], 3), _draw(split, 3))
  assert restored["split"].sharding.is_equivalent_to(split.sharding, 1)
  # Orbax's to_shape_dtype_struct turns keys into their key data: restoring
  # into that gives the raw data.
  data = manager.restore(step, {"split": ocp.utils.to_shape_dtype_struct(split)})
  assert data["split"].dtype == jnp.uint32
  assert np.array_equal(data["split"], jax.random.key_data(split))
  with pytest.raises(RestoreMismatchError, match=r"\['rbg'\].*key<fry>"):
    manager.restore(step, {"rbg": jax.random.key(0)})


def _draw(keys, i):
  """Numbers drawn with keys[i] (taken on the host: the keys may be sharded on an
  Explicit mesh, where indexing them on device is not allowed)."""
  key = jax.random.wrap_key_data(np.asarray(jax.random.key_data(keys))[i],
                                 impl=jax.random.key_impl(keys))
  return np.asarray(jax.random.normal(key, (4,)))


def test_flax_nnx_model_with_rngs_and_dropout(manager):
  nnx = pytest.importorskip("flax.nnx")

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(4, 3, rngs=rngs)
      self.dropout = nnx.Dropout(0.5, rngs=rngs)

  model = Model(nnx.Rngs(0, dropout=1))
  _, state = nnx.split(model)
  step = manager.save(state)
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: Model(nnx.Rngs(0, dropout=1))))
  restored = manager.restore(step, abstract_state)
  assert_trees_equal(state, restored, check_sharding=False)
  merged = nnx.merge(graphdef, restored)
  x = jnp.ones((2, 4))
  assert np.array_equal(merged.linear(x), model.linear(x))


@pytest.mark.parametrize("leaf,what", [
    (object(), "builtins.object"),
    (np.array(["a", "b"]), "dtype <U1"),
    (np.array([1, 2], dtype=object), "dtype object"),
    (lambda x: x, "function"),
])
def test_unsupported_leaf_is_named_before_anything_is_written(handler, tmp_path, leaf, what):
  d = tmp_path / "c"
  d.mkdir()
  with pytest.raises(UnsupportedLeafError, match=r"leaf \['opt'\]\[0\]\.a: .*" + what):
    handler.save(d, args=FastPersistSave({"w": jnp.ones(3),
                                          "opt": [collections.namedtuple("NT", "a")(leaf)]}))
  assert os.listdir(d) == []


# Kind 3: restore targets Orbax accepts ----------------------------------------

def test_cast_on_restore_matches_numpy_astype(manager, mesh):
  w = jnp.arange(64, dtype=jnp.float32).reshape(8, 8) / 7 - 3
  step = manager.save({"w": jax.device_put(w, NamedSharding(mesh, P("data", "model")))})
  target = jax.ShapeDtypeStruct((8, 8), jnp.bfloat16, sharding=NamedSharding(mesh, P("model")))
  out = manager.restore(step, {"w": target})["w"]
  assert out.dtype == jnp.bfloat16 and out.sharding == target.sharding
  assert np.asarray(out).tobytes() == np.asarray(w).astype(jnp.bfloat16).tobytes()
  # A shape mismatch stays an error.
  with pytest.raises(RestoreMismatchError, match=r"\['w'\]: target shape \(8, 4\)"):
    manager.restore(step, {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32)})


CAST_DTYPES = ["bool", "int8", "uint8", "int32", "uint32", "float16", "bfloat16", "float32",
               "float8_e4m3fn", "int4", "complex64"]


@pytest.mark.parametrize("saved", CAST_DTYPES)
def test_every_cast_numpy_makes_is_bit_exact(manager, saved):
  rng = np.random.default_rng(0)
  values = (rng.standard_normal(40) * 6).astype(np.float32)
  source = values.astype(disk_format.dtype_from_name(saved))
  step = manager.save({"x": jnp.asarray(source), "n": source})
  for target_name in CAST_DTYPES:
    dtype = disk_format.dtype_from_name(target_name)
    with np.errstate(all="ignore"), warnings.catch_warnings():
      warnings.simplefilter("ignore")   # numpy's ComplexWarning: part of its semantics
      expected = np.asarray(source).astype(dtype)
      got = manager.restore(step, {"x": jax.ShapeDtypeStruct((40,), dtype),
                                   "n": np.zeros(40, dtype)})
    assert isinstance(got["n"], np.ndarray)
    for leaf in (got["x"], got["n"]):
      assert np.asarray(leaf).dtype == dtype
      assert np.asarray(leaf).tobytes() == expected.tobytes(), (saved, target_name)


def test_python_scalar_saved_restores_into_an_array_target(manager, mesh):
  step = manager.save({"step": 0, "lr": 0.5, "flag": True})
  sharding = NamedSharding(mesh, P())
  out = manager.restore(step, {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding),
                               "lr": jax.ShapeDtypeStruct((), jnp.bfloat16),
                               "flag": np.zeros((), np.bool_)})
  assert isinstance(out["step"], jax.Array) and out["step"].dtype == jnp.int32
  assert int(out["step"]) == 0 and out["step"].sharding == sharding
  assert out["lr"].dtype == jnp.bfloat16 and float(out["lr"]) == 0.5
  assert isinstance(out["flag"], np.ndarray) and out["flag"].dtype == np.bool_ and out["flag"]
  with pytest.raises(RestoreMismatchError, match=r"\['step'\].*shape \(2,\)"):
    manager.restore(step, {"step": jax.ShapeDtypeStruct((2,), jnp.int32)})
  big = manager.save({"step": 2**40})
  with pytest.raises(RestoreMismatchError, match="does not fit"):
    manager.restore(big, {"step": jax.ShapeDtypeStruct((), jnp.int32)})


def test_array_saved_restores_into_a_python_scalar_where_lossless(manager):
  step = manager.save({"step": jnp.int32(12), "loss": jnp.float32(0.25), "bad": jnp.float32(1.5)})
  out = manager.restore(step, {"step": 0, "loss": 0.0})
  assert out == {"step": 12, "loss": 0.25} and type(out["step"]) is int
  with pytest.raises(RestoreMismatchError, match=r"\['bad'\].*would change as a int"):
    manager.restore(step, {"bad": 0})


def test_linen_train_state_saved_at_create_restores_into_eval_shape(manager):
  train_state = pytest.importorskip("flax.training.train_state")
  nn = pytest.importorskip("flax.linen")

  class Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(x)

  model = Dense()

  def create():
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=optax.adam(1e-3))

  state = create()
  step = manager.save(state)
  restored = manager.restore(step, jax.eval_shape(create))   # step=0 is a Python int there
  assert isinstance(restored, train_state.TrainState)
  assert int(restored.step) == 0 and restored.step.dtype == jnp.int32
  assert_trees_equal(state.params, restored.params)
  assert_trees_equal(state.opt_state, restored.opt_state)
  # item_metadata (plain dicts and lists) is a target too ...
  plain = manager.restore(step, manager.mgr.item_metadata(step))
  assert_trees_equal(state.params, plain["params"], check_sharding=False)
  assert plain["step"] == 0
  # ... and a dict sub-tree addresses the dataclass's fields.
  only_params = manager.restore(step, {"params": abstract(state.params)})
  assert list(only_params) == ["params"]
  assert_trees_equal(state.params, only_params["params"])


def test_keys_are_matched_by_name_not_by_kind(manager):
  NT = collections.namedtuple("NT", "a")
  step = manager.save(NT(jnp.arange(2.0)))
  out = manager.restore(step, manager.mgr.item_metadata(step))
  assert list(out) == ["a"] and np.array_equal(out["a"], [0.0, 1.0])

  params = {"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}
  opt_state = optax.adam(1e-3).init(params)
  step = manager.save(opt_state)
  out = manager.restore(step, manager.mgr.item_metadata(step))
  assert np.array_equal(out[0]["mu"]["w"], np.zeros((4, 4)))
  assert int(out[0]["count"]) == 0
  # The same state restored into its own structure is that structure.
  same = manager.restore(step, abstract(opt_state))
  assert jax.tree.structure(same) == jax.tree.structure(opt_state)
  assert_trees_equal(opt_state, same)
  # Messages write paths as jax.tree_util.keystr does: [0] and .a differ.
  with pytest.raises(RestoreMismatchError, match=r"leaf \[0\]\.nope of the restore target"):
    manager.restore(step, (collections.namedtuple("S", "nope")(jnp.zeros(1)),))


def test_pinned_host_target_places_each_shard_in_that_memory(manager, mesh):
  sharding = NamedSharding(mesh, P(), memory_kind="pinned_host")
  x = jax.device_put(np.arange(16.0).reshape(4, 4), sharding)
  y = jax.device_put(np.arange(8, dtype=np.int32), NamedSharding(mesh, P("model"),
                                                                memory_kind="pinned_host"))
  step = manager.save({"opt": {"x": x, "y": y}})
  for target in ({"opt": {"x": abstract(x), "y": abstract(y)}}, None):
    out = manager.restore(step, target)
    for got, want in ((out["opt"]["x"], x), (out["opt"]["y"], y)):
      assert got.sharding.memory_kind == "pinned_host"
      assert got.sharding.is_equivalent_to(want.sharding, want.ndim)
      assert np.array_equal(got, want)


# Kind 4: restore without a target gives back what was saved ------------------

def test_restore_without_target_rebuilds_the_saved_devices(manager):
  devices = jax.devices()
  on5 = jax.device_put(np.ones(4), devices[5])
  sub_mesh = jax.sharding.Mesh(np.array(devices[4:]).reshape(2, 2), ("x", "y"))
  sub = jax.device_put(np.arange(16.0).reshape(4, 4), NamedSharding(sub_mesh, P("y", "x")))
  reordered = jax.sharding.Mesh(np.array(devices[::-1]), ("z",))
  rev = jax.device_put(np.arange(8), NamedSharding(reordered, P("z")))
  tree = {"r": on5, "sub": sub, "rev": rev}
  out = manager.restore(manager.save(tree))
  assert out["r"].sharding == SingleDeviceSharding(devices[5])
  assert out["sub"].sharding.mesh.devices.tolist() == sub_mesh.devices.tolist()
  assert out["sub"].sharding.spec == P("y", "x")
  assert [d.id for d in out["rev"].sharding.mesh.devices.flat] == [d.id for d in devices[::-1]]
  assert_trees_equal(tree, out)


def test_restore_without_target_has_orbax_structure(manager, tmp_path):
  NT = collections.namedtuple("NT", "a b")
  tree = {"t": (jnp.ones(2), jnp.zeros(3)), "l": [jnp.ones(1), None, {}], "e": [], "d": {},
          "n": None, "nt": NT(jnp.ones(2), 3), "s": 5, "f": 1.5,
          "od": [collections.OrderedDict(), jnp.ones(1)],
          "opt": optax.adam(1e-3).init({"w": jnp.ones(2)}), "nested": {"x": {"y": {}}}}
  ours = manager.restore(manager.save(tree))
  orbax_ckptr = ocp.PyTreeCheckpointer()
  orbax_ckptr.save(tmp_path / "orbax", tree)
  theirs = orbax_ckptr.restore(tmp_path / "orbax")
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  assert jax.tree.structure(ours, is_leaf=lambda x: x is None) == \
      jax.tree.structure(theirs, is_leaf=lambda x: x is None)
  # With its own structure as the target, the empty optax state comes back as itself.
  same = manager.restore(manager.save(tree), abstract(tree))
  assert jax.tree.structure(same) == jax.tree.structure(tree)


# Format: version 1 checkpoints stay readable ---------------------------------

def test_version_1_checkpoints_are_still_read(manager, mesh):
  tree = {"w": jax.device_put(jnp.arange(32.0).reshape(4, 8), NamedSharding(mesh, P("data"))),
          "step": 3, "n": None}
  step = manager.save(tree)
  item = manager.mgr.directory / str(step) / "default"
  for name in os.listdir(item):
    if name.endswith(".json"):
      doc = json.loads((item / name).read_text())
      if "leaves" in doc:   # version 3 added "arrays"
        doc = with_array_fields_inline(doc)
      doc["version"] = 1
      for field in ("crc32c", "metadata_crc32c"):   # version 2 added them
        doc.pop(field, None)
      for leaf in doc.get("leaves", []):
        leaf.get("sharding", {}).pop("device_ids", None)
      (item / name).write_text(json.dumps(doc))
  assert_trees_equal(tree, manager.restore(step, abstract(tree)))
  assert_trees_equal(tree, manager.restore(step))


# Property: any mix of these leaves, shardings and sizes round-trips ----------

from hypothesis import HealthCheck, example, given, settings, strategies as st  # pylint: disable=g-import-not-at-top,wrong-import-position

_PROPERTY_DTYPES = ["float32", "bfloat16", "int8", "uint16", "bool", "int4", "complex64"]
_NT = collections.namedtuple("_NT", "x y")


@st.composite
def _array_leaf(draw):
  dtype = disk_format.dtype_from_name(draw(st.sampled_from(_PROPERTY_DTYPES)))
  # Sizes around the 4 KiB shard alignment, and zero.
  shape = tuple(draw(st.lists(st.sampled_from([0, 0, 1, 3, 8, 24, 1031]), min_size=0,
                              max_size=2)))
  if int(np.prod(shape)) > 1 << 14:
    shape = shape[:1]
  seed = draw(st.integers(0, 2**16))
  host = helpers_random(np.random.default_rng(seed), shape, dtype)
  where = draw(st.sampled_from(["numpy", "single", "mesh", "replicated", "np_scalar"]))
  if where == "numpy":
    return host
  if where == "np_scalar":
    return host.reshape(-1)[:1].reshape(()).copy()[()] if host.size else np.float32(1.5)
  devices = jax.devices()
  if where == "single":
    return jax.device_put(host, devices[draw(st.integers(0, 7))])
  mesh = helpers.mesh_2x4()
  if where == "replicated" or not shape:
    return jax.device_put(host, NamedSharding(mesh, P()))
  axis = draw(st.sampled_from(["data", "model"]))
  parts = dict(zip(mesh.axis_names, mesh.devices.shape))[axis]
  spec = P(axis) if shape[0] % parts == 0 else P()
  return jax.device_put(host, NamedSharding(mesh, spec))


def helpers_random(rng, shape, dtype):
  raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
  if dtype == np.bool_:
    return (raw % 2).astype(np.bool_).reshape(shape)
  if dtype.name == "int4":
    return rng.integers(-8, 8, size=shape).astype(dtype)
  if dtype.kind in "fcV":
    # No NaN payloads from random bits: a cast on device may canonicalize them.
    return (rng.standard_normal(size=shape) * 4).astype(dtype)
  return raw.view(dtype).reshape(shape)


_other_leaf = st.one_of(
    st.none(), st.just({}), st.just([]), st.just(()), st.integers(-2**40, 2**40),
    st.floats(allow_nan=False), st.booleans(), st.text(max_size=5),
    st.integers(0, 2**16).map(lambda s: jax.random.key(s)),
    st.integers(0, 2**16).map(lambda s: jax.random.split(jax.random.key(s, impl="rbg"), 8)),
    st.just(optax.EmptyState()))

_tree = st.recursive(
    st.one_of(_array_leaf(), _other_leaf),
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=4),
        st.dictionaries(st.text("abc_. /", min_size=1, max_size=3), children, min_size=1,
                        max_size=4),
        st.tuples(children, children).map(lambda t: _NT(*t))),
    max_leaves=10)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(tree=_tree)
@example(tree={"a": np.ones(3, np.float32), "z": np.zeros((0,), np.float32)})
def test_property_random_trees_round_trip(handler, tmp_path_factory, tree):
  d = tmp_path_factory.mktemp("prop") / "c"
  handler.save(d, args=FastPersistSave(tree))
  # Into its own structure (arrays as ShapeDtypeStructs with shardings).
  assert_trees_equal(tree, handler.restore(d, args=FastPersistRestore(abstract(tree))))
  # Without a target: the same leaves, in the same order, on the same devices.
  restored = handler.restore(d)
  saved_leaves = [x for x in jax.tree.leaves(tree)]
  got_leaves = jax.tree.leaves(restored)
  assert len(saved_leaves) == len(got_leaves)
  for want, got in zip(saved_leaves, got_leaves):
    if isinstance(want, (jax.Array, np.ndarray, np.generic)):
      assert helpers.raw_bytes(got) == helpers.raw_bytes(want)
      if isinstance(want, jax.Array):
        assert got.sharding.is_equivalent_to(want.sharding, want.ndim)
    else:
      assert got == want or (got != got and want != want)
  # Into the tree metadata() describes (what item_metadata returns).
  again = handler.restore(d, args=FastPersistRestore(handler.metadata(d)))
  assert [helpers.raw_bytes(x) for x in jax.tree.leaves(again)
          if isinstance(x, (jax.Array, np.ndarray, np.generic))] == \
      [helpers.raw_bytes(x) for x in saved_leaves
       if isinstance(x, (jax.Array, np.ndarray, np.generic))]


def test_an_edited_manifest_or_metadata_never_restores_wrong_values(manager, mesh):
  # Two shards' indices swapped (the tiling stays valid and every data CRC
  # still matches its bytes), or a dtype renamed to one of the same size:
  # only the documents' own checksums can tell.
  tree = {"w": jax.device_put(jnp.arange(64.0, dtype=jnp.float32).reshape(8, 8),
                              NamedSharding(mesh, P("model")))}
  step = manager.save(tree)
  item = manager.mgr.directory / str(step) / "default"
  manifest, metadata = item / disk_format.manifest_name(0), item / disk_format.METADATA_FILE
  originals = {p: p.read_bytes() for p in (manifest, metadata)}

  def edit(path, change):
    doc = json.loads(originals[path])
    change(doc)
    path.write_text(json.dumps(doc))

  def swap_indices(doc):
    a, b = doc["shards"][0], doc["shards"][1]
    a["index"], b["index"] = b["index"], a["index"]

  def rename_dtype(doc):
    leaf_fields(doc, 0)["dtype"] = "int32"

  for path, change in ((manifest, swap_indices), (metadata, rename_dtype)):
    edit(path, change)
    for target in (None, abstract(tree)):
      with pytest.raises(CorruptCheckpointError, match="checksum does not match its contents"):
        manager.restore(step, target)
    path.write_bytes(originals[path])
  assert_trees_equal(tree, manager.restore(step, abstract(tree)))


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))


# Inputs a tester found (each stands for a kind) --------------------------------

def test_numpy_leaves_in_any_byte_order_round_trip(manager):
  tree = {"be": np.arange(6, dtype=">f4").reshape(2, 3), "le": np.arange(3, dtype="<i8"),
          "scalar": np.array(7, dtype=">u2")[()]}
  step = manager.save(tree)
  as_saved, into_tree = manager.restore(step), manager.restore(step, tree)
  for name, x in tree.items():
    assert np.asarray(as_saved[name]).tolist() == np.asarray(x).tolist(), name
    assert np.asarray(as_saved[name]).dtype == np.asarray(x).dtype.newbyteorder("="), name
    # Into a target of that byte order: numpy's cast gives that byte order.
    assert np.asarray(into_tree[name]).tolist() == np.asarray(x).tolist(), name
    assert np.asarray(into_tree[name]).dtype == np.asarray(x).dtype, name


def test_version_1_checkpoint_of_an_optax_state_restores_into_its_structure(manager):
  # Version 1 kept no record of optax.EmptyState(): the target's own is taken.
  params = {"x": jnp.arange(2.0)}
  state = {"opt": optax.adam(1e-3).init(params)}
  step = manager.save(state)
  item = manager.mgr.directory / str(step) / "default"
  meta = json.loads((item / disk_format.METADATA_FILE).read_text())
  assert meta["leaves"][-1]["kind"] == "empty_node"
  meta["leaves"].pop()
  meta = with_array_fields_inline(meta)   # version 3 added "arrays"
  meta["version"] = 1
  del meta["crc32c"]   # version 2 added the seals
  (item / disk_format.METADATA_FILE).write_text(json.dumps(meta))
  manifest = json.loads((item / disk_format.manifest_name(0)).read_text())
  manifest["version"] = 1
  del manifest["crc32c"], manifest["metadata_crc32c"]
  (item / disk_format.manifest_name(0)).write_text(json.dumps(manifest))
  out = manager.restore(step, jax.eval_shape(lambda: state))
  assert jax.tree.structure(out) == jax.tree.structure(state)
  assert_trees_equal(state, out, check_sharding=False)


def test_files_of_different_saves_are_never_combined(manager):
  one = manager.save({"w": jnp.arange(4.0)})
  two = manager.save({"w": jnp.arange(4, dtype=jnp.int32)})
  d = manager.mgr.directory
  (d / str(one) / "default" / disk_format.METADATA_FILE).write_bytes(
      (d / str(two) / "default" / disk_format.METADATA_FILE).read_bytes())
  with pytest.raises(CorruptCheckpointError, match="another save.*mixed"):
    manager.restore(one)


def test_x64_arrays_are_never_silently_narrowed(manager):
  jax.config.update("jax_enable_x64", True)
  try:
    tree = {"i": jnp.arange(3, dtype=jnp.int64) + 2**40, "f": jnp.full(2, 1e300)}
    step = manager.save(tree)
    expected = {k: np.asarray(v) for k, v in tree.items()}
  finally:
    jax.config.update("jax_enable_x64", False)
  for target in (None, manager.mgr.item_metadata(step)):
    with pytest.raises(RestoreMismatchError, match="jax_enable_x64 is off"):
      manager.restore(step, target)
  # As numpy (or cast on purpose) they restore.
  out = manager.restore(step, {k: np.zeros_like(v) for k, v in expected.items()})
  assert all(np.array_equal(out[k], expected[k]) for k in expected)


def test_deeply_nested_trees_restore_without_a_target(manager):
  tree = leaf = {}
  for _ in range(600):
    leaf["n"] = {}
    leaf = leaf["n"]
  leaf["w"] = jnp.arange(3.0)
  step = manager.save(tree)
  out = manager.restore(step)
  for _ in range(600):
    out = out["n"]
  assert np.array_equal(out["w"], [0.0, 1.0, 2.0])
  manager.restore(step, manager.mgr.item_metadata(step))


class _TwoKindsOfW:
  """A pytree node whose children are an attribute w and a dict key w."""

  def __init__(self, a, b):
    self.a, self.b = a, b


jax.tree_util.register_pytree_with_keys(
    _TwoKindsOfW,
    lambda n: (((jax.tree_util.GetAttrKey("w"), n.a), (jax.tree_util.DictKey("w"), n.b)), None),
    lambda _, children: _TwoKindsOfW(*children))


def test_leaves_restore_could_not_tell_apart_are_refused_at_save(manager):
  with pytest.raises(UnsupportedLeafError, match=r"\['x'\]\.w and \['x'\]\['w'\]"):
    manager.save({"x": _TwoKindsOfW(jnp.ones(2), jnp.zeros(2))})
  assert manager.mgr.all_steps() == []


def test_huge_python_ints_are_refused_before_anything_is_written(manager):
  with pytest.raises(UnsupportedLeafError, match=r"\['big'\].*bits"):
    manager.save({"big": 10**5000, "w": jnp.ones(2)})
  assert manager.mgr.all_steps() == []


def test_orbax_placeholders_skip_leaves(manager):
  step = manager.save({"a": jnp.ones(2), "b": {"c": jnp.zeros(3), "d": 5}})
  out = manager.restore(step, {"a": ocp.PLACEHOLDER, "b": {"c": jax.ShapeDtypeStruct((3,), jnp.float32),
                                                         "d": ocp.PLACEHOLDER}})
  assert out["a"] is ocp.PLACEHOLDER and out["b"]["d"] is ocp.PLACEHOLDER
  assert np.array_equal(out["b"]["c"], np.zeros(3))


def test_scalar_targets_give_the_target_type_where_lossless(manager):
  step = manager.save({"p": 2, "a": jnp.float32(2.0), "s": "abc", "f": 1.5, "big": 2**70,
                       "rng": jax.random.key(0)})
  out = manager.restore(step, {"p": np.int32(0), "a": np.float32(0), "f": 0.0})
  assert type(out["p"]) is np.int32 and out["p"] == 2
  assert type(out["a"]) is np.float32 and out["a"] == 2.0
  assert out["f"] == 1.5
  assert manager.restore(step, {"p": 0.0})["p"] == 2.0
  bad = [({"s": 0}, r"\['s'\].*not a int"), ({"f": 0}, r"\['f'\].*would change"),
         ({"big": jax.ShapeDtypeStruct((), jnp.int32)}, r"\['big'\].*does not fit"),
         ({"rng": 0}, r"\['rng'\].*keys; the target is a Python int")]
  for target, message in bad:
    with pytest.raises(RestoreMismatchError, match=message):
      manager.restore(step, target)


@pytest.mark.parametrize("dtype", ["float6_e2m3fn", "float128"])
def test_a_target_dtype_no_jax_array_holds_is_a_restore_mismatch(manager, dtype):
  step = manager.save({"w": jnp.ones(4)})
  target = {"w": jax.ShapeDtypeStruct((4,), disk_format.dtype_from_name(dtype),
                                      sharding=SingleDeviceSharding(jax.devices()[0]))}
  with pytest.raises(RestoreMismatchError, match=rf"\['w'\]: a jax.Array cannot hold {dtype}"):
    manager.restore(step, target)


def test_a_target_sharding_that_does_not_fit_is_a_restore_mismatch(manager, mesh):
  step = manager.save({"w": jnp.ones(6)})
  target = {"w": jax.ShapeDtypeStruct((6,), jnp.float32, sharding=NamedSharding(mesh, P("model")))}
  with pytest.raises(RestoreMismatchError, match=r"\['w'\]: the target's sharding"):
    manager.restore(step, target)
