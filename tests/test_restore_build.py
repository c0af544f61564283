"""Restore builds each jax.Array in one call to jax's C++ builder
(jax_internals); the public jax.device_put path is the fallback. Both must
build the same arrays: values, dtype, sharding, memory kind, committed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from fastpersist_jax import (CheckpointNotFoundError, FastPersistHandler, FastPersistRestore,
                             FastPersistSave, jax_internals)
from tests import helpers


def _tree(mesh):
  """Leaves covering what the builder sees: sharded, replicated, partly
  replicated, one device, another memory kind, narrow dtypes, zero-size,
  typed keys (which take the fallback path either way), a cast target."""
  rng = np.random.default_rng(0)
  f32 = rng.standard_normal((8, 6), dtype=np.float32)
  return {
      "sharded": jax.device_put(f32, NamedSharding(mesh, P("data", "model"))),
      "replicated": jax.device_put(f32, NamedSharding(mesh, P())),
      "rows": jax.device_put(f32, NamedSharding(mesh, P("data"))),
      "device5": jax.device_put(np.arange(7, dtype=np.int32), SingleDeviceSharding(jax.devices()[5])),
      "pinned": jax.device_put(f32, NamedSharding(mesh, P("model"), memory_kind="pinned_host")),
      "bf16": jax.device_put(f32.astype(jnp.bfloat16), NamedSharding(mesh, P(None, "model"))),
      "int4": jax.device_put(np.arange(16).reshape(4, 4).astype(ml_dtypes.int4),
                             NamedSharding(mesh, P("data"))),
      "empty": jax.device_put(np.zeros((0, 6), np.float32), NamedSharding(mesh, P(None, "model"))),
      "keys": jax.random.split(jax.random.key(3), 8),
      "scalar": jnp.float32(2.5),
  }


def _restore(path, target):
  with ocp.CheckpointManager(path, item_handlers=FastPersistHandler()) as mngr:
    return mngr.restore(1, args=FastPersistRestore(target))


@pytest.fixture()
def saved(tmp_path, mesh):
  tree = _tree(mesh)
  with ocp.CheckpointManager(tmp_path, item_handlers=FastPersistHandler()) as mngr:
    mngr.save(1, args=FastPersistSave(tree))
    mngr.wait_until_finished()
  return tmp_path, tree


def test_fast_builder_is_available_on_the_pinned_jax():
  # If a jax upgrade moves the C++ builder, restore silently falls back to the
  # public path, 3x slower for small leaves: this is where that shows.
  assert jax_internals.fast_build_available(), jax.__version__


@pytest.mark.parametrize("fast", [True, False], ids=["cpp_builder", "device_put"])
def test_both_builders_restore_every_leaf_exactly(saved, monkeypatch, fast):
  path, tree = saved
  if not fast:
    monkeypatch.setattr(jax_internals, "fast_build_available", lambda: False)
  restored = _restore(path, helpers.abstract(tree))
  helpers.assert_trees_equal(tree, restored)
  for name, x in restored.items():
    if isinstance(x, jax.Array):
      assert x.committed, name
  # A cast target goes through the builder too, with the target's dtype.
  casted = _restore(path, {**helpers.abstract(tree), "sharded": jax.ShapeDtypeStruct(
      (8, 6), jnp.float16, sharding=tree["sharded"].sharding)})
  np.testing.assert_array_equal(np.asarray(casted["sharded"]),
                                np.asarray(tree["sharded"]).astype(np.float16))
  assert casted["sharded"].dtype == jnp.float16
  assert casted["sharded"].sharding == tree["sharded"].sharding


def test_builder_places_each_shard_on_its_device(mesh):
  sharding = NamedSharding(mesh, P("data", "model"))
  full = np.arange(48, dtype=np.float32).reshape(8, 6)
  indices = sharding.addressable_devices_indices_map(full.shape)
  x = jax_internals.array_from_host_shards(full.shape, full.dtype, sharding, list(indices),
                                           [full[i] for i in indices.values()])
  assert x.sharding == sharding and x.committed
  np.testing.assert_array_equal(np.asarray(x), full)
  for shard in x.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])


def test_restore_runs_without_cyclic_collections_and_leaves_the_collector_as_it_was(tmp_path):
  # 3,000 small leaves allocate enough for dozens of collections (gen 0 runs
  # every 700 allocations) were the collector running; inside the restore it
  # must not run (one may run as the pause ends), and afterwards it must be
  # on (or still off) as before, after a failure too.
  import gc
  import logging
  from fastpersist_jax import gc_pause
  tree = {f"leaf{i:05d}": jnp.full((4,), i, jnp.int32) for i in range(3000)}
  target = helpers.abstract(tree)
  handler = FastPersistHandler()
  ocp.Checkpointer(handler).save(tmp_path / "ckpt", args=FastPersistSave(tree))
  collections, paused_at_log = [], []

  class Probe(logging.Handler):
    def emit(self, record):
      if record.getMessage().startswith("Restored"):
        paused_at_log.append(gc_pause.is_paused())

  def count(phase, info):
    if phase == "start":
      collections.append(info["generation"])

  probe = Probe(logging.INFO)
  restore_logger = logging.getLogger("fastpersist_jax.restore")
  level = restore_logger.level
  restore_logger.setLevel(logging.INFO)
  restore_logger.addHandler(probe)
  gc.callbacks.append(count)
  try:
    for enabled in (True, False):
      (gc.enable if enabled else gc.disable)()
      collections.clear()
      paused_at_log.clear()
      restored = handler.restore(tmp_path / "ckpt", args=FastPersistRestore(target))
      assert len(collections) <= 1, collections
      assert paused_at_log == [True]
      assert gc.isenabled() is enabled
      assert [int(v[0]) for _, v in sorted(restored.items())] == list(range(3000))
      with pytest.raises(CheckpointNotFoundError):
        handler.restore(tmp_path / "missing", args=FastPersistRestore(target))
      assert gc.isenabled() is enabled
  finally:
    gc.callbacks.remove(count)
    restore_logger.removeHandler(probe)
    restore_logger.setLevel(level)
    gc.enable()
    handler.close()


def test_collector_pause_is_shared_by_overlapping_calls():
  import gc
  from fastpersist_jax import gc_pause
  thresholds = gc.get_threshold()
  outer = gc_pause.paused()
  outer.__enter__()
  with gc_pause.paused():
    assert gc.get_threshold()[0] == 0 and gc_pause.is_paused()
  assert gc.get_threshold()[0] == 0   # the outer call is still running
  outer.__exit__(None, None, None)
  assert gc.get_threshold() == thresholds and not gc_pause.is_paused()
  assert gc.isenabled()


def test_a_large_restore_onto_cpu_releases_the_free_heap_once(tmp_path, monkeypatch):
  # Memory the C heap keeps (arrays jax freed) goes back to the kernel
  # before a restore faults in a large batch of fresh memory; a small
  # restore does not pay for it.
  from fastpersist_jax import io_engine, restore
  assert io_engine.release_free_heap() is True   # glibc: the call exists
  calls = []
  monkeypatch.setattr(restore, "release_free_heap", lambda: calls.append(1) or True)
  big = {"w": jnp.arange(12 << 20, dtype=jnp.float32), "v": jnp.ones((10 << 20,), jnp.float32)}   # 2 batches
  small = {"w": jnp.arange(1024, dtype=jnp.float32)}
  for name, tree, expected in (("big", big, [1]), ("small", small, [])):
    ocp.Checkpointer(FastPersistHandler()).save(tmp_path / name, args=FastPersistSave(tree))
    calls.clear()
    restored = ocp.Checkpointer(FastPersistHandler()).restore(
        tmp_path / name, args=FastPersistRestore(helpers.abstract(tree)))
    assert calls == expected, name
    for k in tree:
      np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(tree[k]))


# Checksums: small parts are checked on the building thread, just before
# their arrays are built; large ones on the verify thread
# (restore._CHECK_ON_VERIFY_THREAD_FROM_BYTES). Either must name the leaf,
# shard, file and offset of a damaged part.

@pytest.mark.parametrize("elements,checked_by", [
    (1024, "_verify_small"), (16383, "_verify_small"), (16384, "_verify_large"),
    (262144, "_verify_large")])
def test_a_damaged_part_is_refused_whichever_thread_checks_it(tmp_path, elements, checked_by):
  from fastpersist_jax import ChecksumMismatchError, disk_format, restore  # pylint: disable=g-import-not-at-top
  assert restore._CHECK_ON_VERIFY_THREAD_FROM_BYTES == 16384 * 4  # pylint: disable=protected-access
  device = SingleDeviceSharding(jax.devices()[0])
  tree = {"a": jax.device_put(np.arange(1024, dtype=np.float32), device),
          "x": jax.device_put(np.arange(elements, dtype=np.float32), device),
          "z": jax.device_put(np.ones(1024, np.float32), device)}
  item = str(tmp_path / "item")
  FastPersistHandler().save(item, args=FastPersistSave(tree))
  meta = disk_format.read_metadata(item)
  x = next(i for i, leaf in enumerate(meta.leaves) if leaf.path == [["d", "x"]])
  (rec,) = [r for r in disk_format.read_manifest(item, 0, meta).shards if r.leaf == x]
  name = disk_format.data_file_name(0, rec.file)
  with open(f"{item}/{name}", "r+b") as f:
    f.seek(rec.offset + rec.nbytes - 1)
    last = f.read(1)
    f.seek(rec.offset + rec.nbytes - 1)
    f.write(bytes([last[0] ^ 0x10]))
  with pytest.raises(ChecksumMismatchError) as e:
    FastPersistHandler().restore(item, args=FastPersistRestore(helpers.abstract(tree)))
  assert str(e.value) == (f"leaf ['x'], shard [[0, {elements}]] (process 0, {name} @ "
                          f"{rec.offset}): checksum mismatch, the data is corrupt")
  assert any(entry.name == checked_by for entry in e.traceback), e.traceback
