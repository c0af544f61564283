"""What a save and a restore tell the user: one INFO line each, progress for
long restores, and the stats a handler keeps."""

from __future__ import annotations

import logging

import helpers  # sets XLA_FLAGS before jax is imported
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from fastpersist_jax import FastPersistHandler, FastPersistOptions, FastPersistRestore, FastPersistSave
from fastpersist_jax import restore as restore_lib
from helpers import MiB, abstract, assert_trees_equal


def test_one_info_line_per_save_and_per_restore(tmp_path, caplog, monkeypatch):
  mesh = helpers.mesh_2x4()
  tree = {"w": jax.device_put(jnp.arange(4096.0).reshape(64, 64), NamedSharding(mesh, P("data"))),
          "b": jnp.ones(64)}
  handler = FastPersistHandler(FastPersistOptions(staging_slab_bytes=MiB, host_memory_limit=8 * MiB,
                                                  restore_batch_bytes=4096))
  mngr = ocp.CheckpointManager(tmp_path / "c", item_handlers=handler)
  caplog.set_level(logging.INFO, logger="fastpersist_jax")
  for step in (1, 2):
    mngr.save(step, args=FastPersistSave(tree))
  mngr.wait_until_finished()
  saves = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Saved ")]
  assert len(saves) == 2, saves
  assert all(f"{4096 * 4 + 64 * 4} bytes" in m and "blocking" in m and "GB/s" in m and "snapshot 'view'" in m
             and "(asked for 'auto')" in m for m in saves), saves
  assert handler.last_save_stats["bytes"] == 4096 * 4 + 64 * 4
  assert handler.last_save_stats["snapshot_requested"] == "auto"
  assert handler.last_save_stats["snapshot_mode"] == "view"

  caplog.clear()
  monkeypatch.setattr(restore_lib, "_PROGRESS_EVERY_S", 0.0)   # every batch is "long"
  restored = mngr.restore(2, args=FastPersistRestore(abstract(tree)))
  assert_trees_equal(tree, restored)
  messages = [r.getMessage() for r in caplog.records]
  done = [m for m in messages if m.startswith("Restored ")]
  progress = [m for m in messages if m.startswith("Restoring ") and "read" in m]
  assert len(done) == 1 and "2 leaves" in done[0] and "GB/s" in done[0], messages
  assert "resharded" not in done[0]
  assert len(progress) >= 2, messages   # batches of 4 KiB: one line per batch here
  caplog.clear()
  other = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, "model"))),
           "b": abstract(tree["b"])}
  mngr.restore(2, args=FastPersistRestore(other))
  done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Restored ")]
  assert len(done) == 1 and done[0].endswith("resharded."), done
  mngr.close()


def test_restore_onto_accelerators_recycles_the_staging_pool(tmp_path, monkeypatch):
  # No accelerator here: run the accelerator path on CPU devices (it then
  # copies each piece, as a host-to-device transfer would).
  monkeypatch.setattr(restore_lib, "_STAGE_ON_CPU", True)
  mesh = helpers.mesh_2x4()
  tree = {f"w{i}": jax.device_put(jnp.arange(i, i + 128 * 1024, dtype=jnp.float32).reshape(256, 512),
                                  NamedSharding(mesh, P("data", "model"))) for i in range(12)}
  handler = FastPersistHandler(FastPersistOptions(staging_slab_bytes=MiB, host_memory_limit=4 * MiB))
  handler.save(tmp_path / "c", args=FastPersistSave(tree))
  pool = handler._pool  # pylint: disable=protected-access
  acquired = []
  real_acquire = pool.acquire
  monkeypatch.setattr(pool, "acquire", lambda *a, **k: acquired.append(real_acquire(*a, **k))
                      or acquired[-1])
  restored = handler.restore(tmp_path / "c", args=FastPersistRestore(abstract(tree)))
  assert_trees_equal(tree, restored)
  # 6 MiB went through a pool of at most 4 slabs of 1 MiB: slabs were reused,
  # and every one is back.
  assert len(acquired) >= 6 and len(set(acquired)) <= 4, acquired
  assert pool.nbytes <= 4 * MiB and len(pool._free) == len(pool._slabs)  # pylint: disable=protected-access
  # A damaged shard fails the restore and still returns every slab.
  data = tmp_path / "c" / "data.00000.0000.bin"
  raw = bytearray(data.read_bytes())
  raw[5 * MiB + 123] ^= 1
  data.write_bytes(bytes(raw))
  import pytest  # pylint: disable=g-import-not-at-top
  from fastpersist_jax import ChecksumMismatchError  # pylint: disable=g-import-not-at-top
  with pytest.raises(ChecksumMismatchError):
    handler.restore(tmp_path / "c", args=FastPersistRestore(abstract(tree)))
  assert len(pool._free) == len(pool._slabs)  # pylint: disable=protected-access
  handler.close()
