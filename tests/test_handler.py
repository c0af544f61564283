"""FastPersistHandler end to end: formats, shardings, Orbax integration, errors."""

from __future__ import annotations

import collections
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from fastpersist_jax import (CheckpointNotFoundError, ChecksumMismatchError,
                             CorruptCheckpointError, FastPersistHandler, FastPersistOptions,
                             FastPersistRestore, FastPersistSave, RestoreMismatchError,
                             UnsupportedLeafError, disk_format)

MiB = 1 << 20


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests need XLA_FLAGS=--xla_force_host_platform_device_count=8"
  return jax.make_mesh((4, 2), ("data", "model"))


@pytest.fixture(scope="module")
def handler():
  h = FastPersistHandler(FastPersistOptions(host_memory_limit=64 * MiB, staging_slab_bytes=4 * MiB))
  yield h
  h.close()


def assert_trees_equal(expected, actual):
  e_flat, e_def = jax.tree_util.tree_flatten(expected)
  a_flat, a_def = jax.tree_util.tree_flatten(actual)
  assert e_def == a_def, (e_def, a_def)
  for e, a in zip(e_flat, a_flat):
    if isinstance(e, (jax.Array, np.ndarray, np.generic)):
      assert np.asarray(a).dtype == np.asarray(e).dtype
      assert np.asarray(a).shape == np.asarray(e).shape
      # Bit-exact, NaN payloads included.
      assert np.asarray(a).tobytes() == np.asarray(e).tobytes()
      if isinstance(e, jax.Array):
        assert isinstance(a, jax.Array)
        assert a.sharding.is_equivalent_to(e.sharding, e.ndim), (a.sharding, e.sharding)
    else:
      assert type(a) is type(e) and a == e, (e, a)


def save_restore(handler, directory, tree, target="same"):
  ckptr = ocp.Checkpointer(handler)
  ckptr.save(directory, args=FastPersistSave(tree))
  return ckptr.restore(directory, args=FastPersistRestore(tree if target == "same" else target))


def random_array(rng, shape, dtype):
  dtype = np.dtype(dtype)
  raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
  if dtype == np.bool_:
    return (raw % 2).astype(np.bool_).reshape(shape)
  if dtype.name in ("int4", "uint4", "int2", "uint2"):
    lo = -8 if dtype.name == "int4" else 0
    return rng.integers(lo, lo + 16 if "4" in dtype.name else lo + 4, size=shape).astype(dtype)
  return raw.view(dtype).reshape(shape)


ALL_DTYPES = ["bool", "int8", "int16", "int32", "uint8", "uint16", "uint32", "float16", "float32",
              "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3b11fnuz", "float8_e4m3fnuz",
              "float8_e5m2fnuz", "int4", "uint4", "complex64"]
X64_DTYPES = ["int64", "uint64", "float64", "complex128"]


def _dtype(name):
  return disk_format.dtype_from_name(name)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_every_dtype_sharded_round_trip(handler, mesh, tmp_path, dtype):
  rng = np.random.default_rng(0)
  host = random_array(rng, (16, 6), _dtype(dtype))
  x = jax.device_put(host, NamedSharding(mesh, P("data", "model")))
  tree = {"x": x, "host": random_array(rng, (5,), _dtype(dtype))}
  restored = save_restore(handler, tmp_path / "ckpt", tree)
  assert_trees_equal(tree, restored)


@pytest.mark.parametrize("dtype", X64_DTYPES)
def test_64bit_dtypes(handler, mesh, tmp_path, dtype):
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    x = jax.device_put(random_array(rng, (8, 4), _dtype(dtype)), NamedSharding(mesh, P("data")))
    tree = {"x": x, "np": random_array(rng, (3, 3), _dtype(dtype))}
    assert x.dtype == _dtype(dtype)
    restored = save_restore(handler, tmp_path / "ckpt", tree)
    assert_trees_equal(tree, restored)


@pytest.mark.parametrize("spec", [P("data", "model"), P("data"), P(None, "model"), P(),
                                  P(("data", "model"))])
def test_shardings_round_trip(handler, mesh, tmp_path, spec):
  x = jax.device_put(jnp.arange(16 * 24, dtype=jnp.float32).reshape(16, 24),
                     NamedSharding(mesh, spec))
  single = jax.device_put(jnp.arange(7, dtype=jnp.int32), jax.devices()[3])
  tree = {"x": x, "single": single, "scalar": jnp.float32(3.5)}
  restored = save_restore(handler, tmp_path / "ckpt", tree)
  assert_trees_equal(tree, restored)
  assert restored["single"].devices() == {jax.devices()[3]}


def test_replicated_shards_are_written_once(handler, mesh, tmp_path):
  x = jax.device_put(jnp.ones((64, 64), jnp.float32), NamedSharding(mesh, P()))
  ocp.Checkpointer(handler).save(tmp_path / "c", args=FastPersistSave({"x": x}))
  manifest = json.loads((tmp_path / "c" / disk_format.manifest_name(0)).read_text())
  assert len(manifest["shards"]) == 1
  assert manifest["files"][0]["size"] == 64 * 64 * 4


def test_restore_onto_other_meshes(handler, mesh, tmp_path):
  host = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
  x = jax.device_put(host, NamedSharding(mesh, P("data", "model")))
  ckptr = ocp.Checkpointer(handler)
  ckptr.save(tmp_path / "c", args=FastPersistSave({"x": x}))

  mesh4 = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))
  for sharding in [NamedSharding(mesh4, P("b", "a")), NamedSharding(mesh4, P(None, "a")),
                   SingleDeviceSharding(jax.devices()[5]),
                   NamedSharding(jax.make_mesh((8,), ("z",)), P(None, "z"))]:
    target = {"x": jax.ShapeDtypeStruct(host.shape, host.dtype, sharding=sharding)}
    out = ckptr.restore(tmp_path / "c", args=FastPersistRestore(target))["x"]
    assert out.sharding == sharding
    np.testing.assert_array_equal(np.asarray(out), host)

  as_numpy = ckptr.restore(tmp_path / "c", args=FastPersistRestore({"x": np.zeros_like(host)}))
  assert isinstance(as_numpy["x"], np.ndarray)
  np.testing.assert_array_equal(as_numpy["x"], host)


def test_restore_without_target_gives_nested_dicts_and_lists(handler, mesh, tmp_path):
  Point = collections.namedtuple("Point", "x y")
  tree = {"a": [jnp.ones(3), {"b": np.arange(4)}], "p": Point(1, 2.5), "none": None,
          "empty": {}, "t": (True, "name", 1 + 2j), "s": np.float32(2)}
  ckptr = ocp.Checkpointer(handler)
  ckptr.save(tmp_path / "c", args=FastPersistSave(tree))
  out = ckptr.restore(tmp_path / "c")
  assert set(out) == {"a", "p", "none", "empty", "t", "s"}
  assert out["p"] == {"x": 1, "y": 2.5}
  assert out["none"] is None and out["empty"] == {}
  assert out["t"] == [True, "name", 1 + 2j]
  assert isinstance(out["s"], np.float32) and out["s"] == 2
  np.testing.assert_array_equal(out["a"][1]["b"], np.arange(4))
  assert isinstance(out["a"][0], jax.Array)
  # With the original tree as target, the structure (namedtuple, tuple) comes back.
  assert_trees_equal(tree, ckptr.restore(tmp_path / "c", args=FastPersistRestore(tree)))


def test_metadata_is_abstract_tree_usable_as_target(handler, mesh, tmp_path):
  x = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("data")))
  ckptr = ocp.Checkpointer(handler)
  ckptr.save(tmp_path / "c", args=FastPersistSave({"x": x, "step": 7}))
  meta = handler.metadata(tmp_path / "c")
  assert isinstance(meta["x"], jax.ShapeDtypeStruct)
  assert meta["x"].shape == (8, 4) and meta["x"].sharding == x.sharding
  assert meta["step"] == 7
  out = ckptr.restore(tmp_path / "c", args=FastPersistRestore(meta))
  np.testing.assert_array_equal(np.asarray(out["x"]), np.asarray(x))


def test_partial_restore_and_mismatches(handler, mesh, tmp_path):
  tree = {"params": {"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}, "opt": {"mu": jnp.ones((4, 4))}}
  ckptr = ocp.Checkpointer(handler)
  ckptr.save(tmp_path / "c", args=FastPersistSave(tree))
  part = ckptr.restore(tmp_path / "c", args=FastPersistRestore({"params": {"w": tree["params"]["w"]}}))
  assert list(part) == ["params"] and list(part["params"]) == ["w"]
  with pytest.raises(RestoreMismatchError, match=r"\['params'\]\['w'\].*shape"):
    ckptr.restore(tmp_path / "c", args=FastPersistRestore({"params": {"w": jnp.ones((4, 5))}}))
  with pytest.raises(RestoreMismatchError, match=r"\['params'\]\['b'\].*key<fry>.*float32"):
    ckptr.restore(tmp_path / "c", args=FastPersistRestore({"params": {"b": jax.random.key(0)}}))
  with pytest.raises(RestoreMismatchError, match=r"\['params'\]\['nope'\].*not in the checkpoint"):
    ckptr.restore(tmp_path / "c", args=FastPersistRestore({"params": {"nope": jnp.zeros(4)}}))


def test_unsupported_leaf_fails_before_writing(handler, tmp_path):
  d = tmp_path / "c"
  d.mkdir()
  with pytest.raises(UnsupportedLeafError, match=r"\['opt'\]\['fn'\]"):
    handler.save(d, args=FastPersistSave({"w": jnp.ones(3), "opt": {"fn": object()}}))
  with pytest.raises(UnsupportedLeafError, match="strings"):
    handler.save(d, args=FastPersistSave({"strings": np.array(["a", "b"])}))
  assert os.listdir(d) == []


def test_checkpoint_manager_steps_and_max_to_keep(mesh, tmp_path):
  x = jax.device_put(jnp.zeros((16, 16)), NamedSharding(mesh, P("data", "model")))
  with ocp.CheckpointManager(tmp_path, item_handlers=FastPersistHandler(),
                             options=ocp.CheckpointManagerOptions(max_to_keep=2)) as mngr:
    for step in range(5):
      mngr.save(step, args=FastPersistSave({"x": x + step, "step": step}))
    mngr.wait_until_finished()
    assert mngr.all_steps() == [3, 4]
    assert mngr.latest_step() == 4
    out = mngr.restore(4, args=FastPersistRestore({"x": x, "step": 0}))
    np.testing.assert_array_equal(np.asarray(out["x"]), np.asarray(x + 4))
    assert out["step"] == 4
    assert mngr.item_metadata(3)["x"].shape == (16, 16)


def test_composite_with_json_item(mesh, tmp_path):
  x = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("data")))
  with ocp.CheckpointManager(tmp_path, item_handlers={"state": FastPersistHandler(),
                                                      "meta": ocp.JsonCheckpointHandler()}) as mngr:
    mngr.save(1, args=ocp.args.Composite(state=FastPersistSave({"x": x}),
                                         meta=ocp.args.JsonSave({"lr": 0.1})))
    mngr.wait_until_finished()
    out = mngr.restore(1, args=ocp.args.Composite(state=FastPersistRestore({"x": x}),
                                                  meta=ocp.args.JsonRestore()))
  np.testing.assert_array_equal(np.asarray(out.state["x"]), np.asarray(x))
  assert out.meta == {"lr": 0.1}


def test_handler_registry(mesh, tmp_path):
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("state", FastPersistSave, FastPersistHandler)
  registry.add("state", FastPersistRestore, FastPersistHandler)
  registry.add("extra", ocp.args.JsonSave, ocp.JsonCheckpointHandler)
  registry.add("extra", ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
  x = jnp.arange(10)
  with ocp.CheckpointManager(tmp_path, handler_registry=registry) as mngr:
    mngr.save(0, args=ocp.args.Composite(state=FastPersistSave({"x": x}),
                                         extra=ocp.args.JsonSave({"a": 1})))
    mngr.wait_until_finished()
    out = mngr.restore(0, args=ocp.args.Composite(state=FastPersistRestore(),
                                                  extra=ocp.args.JsonRestore()))
  np.testing.assert_array_equal(np.asarray(out.state["x"]), np.arange(10))
  assert out.extra == {"a": 1}


def test_async_checkpointer(handler, mesh, tmp_path):
  x = jax.device_put(jnp.arange(4096.0).reshape(64, 64), NamedSharding(mesh, P("data")))
  ckptr = ocp.AsyncCheckpointer(handler)
  ckptr.save(tmp_path / "c", args=FastPersistSave({"x": x}))
  ckptr.wait_until_finished()
  assert (tmp_path / "c" / disk_format.METADATA_FILE).exists()
  out = ckptr.restore(tmp_path / "c", args=FastPersistRestore({"x": x}))
  np.testing.assert_array_equal(np.asarray(out["x"]), np.asarray(x))
  ckptr.close()


def test_train_state_with_optax(mesh, tmp_path):
  optax = pytest.importorskip("optax")
  params = {"dense": {"kernel": jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P(None, "model"))),
                      "bias": jnp.zeros(16)},
            "emb": jax.device_put(jnp.ones((32, 8), jnp.bfloat16), NamedSharding(mesh, P("data")))}
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  state = {"params": params, "opt_state": opt_state, "step": 1}
  with ocp.CheckpointManager(tmp_path, item_handlers=FastPersistHandler()) as mngr:
    mngr.save(1, args=FastPersistSave(state))
    mngr.wait_until_finished()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
                            if isinstance(a, jax.Array) else a, state)
    out = mngr.restore(1, args=FastPersistRestore(abstract))
  assert_trees_equal(state, out)
  assert type(out["opt_state"]) is type(opt_state)


def test_many_tiny_leaves(handler, tmp_path):
  tree = {f"leaf{i:05d}": np.full((3,), i, np.int32) for i in range(10_000)}
  out = save_restore(handler, tmp_path / "c", tree)
  assert len(out) == 10_000
  for i in (0, 4321, 9999):
    np.testing.assert_array_equal(out[f"leaf{i:05d}"], tree[f"leaf{i:05d}"])


def test_checkpoint_bigger_than_pool_and_many_files(mesh, tmp_path):
  opts = FastPersistOptions(host_memory_limit=2 * MiB, staging_slab_bytes=1 * MiB,
                            data_file_bytes=3 * MiB, restore_batch_bytes=2 * MiB)
  h = FastPersistHandler(opts)
  rng = np.random.default_rng(3)
  tree = {f"w{i}": jax.device_put(rng.standard_normal((256, 1000 + i), np.float32),
                                  NamedSharding(mesh, P("data"))) for i in range(6)}
  out = save_restore(h, tmp_path / "c", tree)
  assert_trees_equal(tree, out)
  manifest = json.loads((tmp_path / "c" / disk_format.manifest_name(0)).read_text())
  assert len(manifest["files"]) > 1
  assert h._pool.nbytes == 2 * MiB  # pylint: disable=protected-access
  h.close()


@pytest.mark.parametrize("engine", ["io_uring", "threads"])
def test_both_engines_on_disk_and_tmpfs(mesh, data_dir, engine):
  h = FastPersistHandler(FastPersistOptions(engine=engine))
  assert h.engine_kind == engine
  rng = np.random.default_rng(4)
  tree = {"a": jax.device_put(rng.standard_normal((64, 33)).astype(np.float32),
                              NamedSharding(mesh, P("data"))),
          "b": rng.integers(0, 9, (1001,), np.int8)}
  out = save_restore(h, os.path.join(data_dir, "c"), tree)
  assert_trees_equal(tree, out)
  h.close()


# Damage -------------------------------------------------------------------------


@pytest.fixture
def saved(handler, mesh, tmp_path):
  tree = {"w": jax.device_put(jnp.arange(1024.0).reshape(32, 32), NamedSharding(mesh, P("data"))),
          "b": jnp.ones(8)}
  d = tmp_path / "c"
  ocp.Checkpointer(handler).save(d, args=FastPersistSave(tree))
  return d, tree


def test_flipped_byte_is_detected(handler, saved):
  d, tree = saved
  data = d / disk_format.data_file_name(0, 0)
  raw = bytearray(data.read_bytes())
  raw[4096 * 2 + 17] ^= 0x01   # "b" is at 0, then w's shards at 4096, 8192, ...: the 2nd
  data.write_bytes(bytes(raw))
  with pytest.raises(ChecksumMismatchError, match=r"leaf \['w'\], shard \[\[8, 16\], \[0, 32\]\]"):
    ocp.Checkpointer(handler).restore(d, args=FastPersistRestore(tree))


def test_truncated_data_file_is_detected(handler, saved):
  d, tree = saved
  data = d / disk_format.data_file_name(0, 0)
  os.truncate(data, data.stat().st_size - 10)
  with pytest.raises(CorruptCheckpointError, match="truncated"):
    ocp.Checkpointer(handler).restore(d, args=FastPersistRestore(tree))


def test_missing_and_truncated_manifest(handler, saved):
  d, tree = saved
  m = d / disk_format.manifest_name(0)
  text = m.read_text()
  m.write_text(text[: len(text) // 2])
  with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
    ocp.Checkpointer(handler).restore(d, args=FastPersistRestore(tree))
  m.unlink()
  with pytest.raises(CheckpointNotFoundError, match="manifest"):
    ocp.Checkpointer(handler).restore(d, args=FastPersistRestore(tree))
  with pytest.raises(CheckpointNotFoundError):
    handler.restore(d.parent / "does-not-exist")



def test_finalize_refuses_a_step_whose_manifest_is_missing(tmp_path, handler):
  handler.save(tmp_path / "step", args=FastPersistSave({"w": jnp.arange(8.0)}))
  handler.finalize(tmp_path / "step")   # complete: nothing to say
  os.remove(tmp_path / "step" / disk_format.manifest_name(0))
  with pytest.raises(CorruptCheckpointError, match=r"manifests of processes \[0\] are missing"):
    handler.finalize(tmp_path / "step")


def test_save_pauses_the_collector_only_for_its_bursts_of_work(tmp_path, handler, monkeypatch):
  # The tree check, the plan and the manifests' encoding and check run with
  # the cyclic collector paused (see gc_pause); the collector is left as it
  # was found, after a save that fails too.
  import gc
  from fastpersist_jax import gc_pause, handler as handler_module, save as save_module
  seen = {}

  def probe(module, name):
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
      seen.setdefault(name, set()).add(gc_pause.is_paused())
      return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapped)

  probe(handler_module, "check_tree")
  probe(handler_module, "make_plan")
  probe(save_module, "_check_restorable")
  tree = {f"w{i}": jnp.full((4,), i) for i in range(50)}
  try:
    for enabled in (True, False):
      (gc.enable if enabled else gc.disable)()
      seen.clear()
      handler.save(tmp_path / f"ok{enabled}", args=FastPersistSave(tree))
      assert seen == {"check_tree": {True}, "make_plan": {True}, "_check_restorable": {True}}
      assert gc.isenabled() is enabled
      with pytest.raises(UnsupportedLeafError):
        handler.save(tmp_path / f"bad{enabled}", args=FastPersistSave({"f": lambda: 0}))
      assert gc.isenabled() is enabled
      assert not gc_pause.is_paused()
  finally:
    gc.enable()


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))
