"""Misuse: saves in flight together on one handler, close() during a save,
restore of a step still being written, failures of the snapshot copy or of
starting a thread, and a cached plan meeting keys it cannot save."""

from __future__ import annotations

import asyncio
import errno
import faulthandler
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fastpersist_jax import (CheckpointNotFoundError, CorruptCheckpointError, FastPersistError,
                             FastPersistHandler, FastPersistOptions, FastPersistRestore,
                             FastPersistSave, SaveError, UnsupportedLeafError, disk_format)
from helpers import MiB, abstract, assert_tree_bytes_equal, within

# Small staging so that a handler costs little memory; slabs of 1 MiB so that
# a few-MiB checkpoint is staged and written as several windows.
SMALL = dict(host_memory_limit=16 * MiB, staging_slab_bytes=1 * MiB)


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
    assert_tree_bytes_equal(tree, h.restore(d, args=FastPersistRestore(abstract(tree))))

  # Through a CheckpointManager, back to back: Orbax serialises them.
  with ocp.CheckpointManager(tmp_path / "m", item_handlers=h) as mngr:
    mngr.save(0, args=FastPersistSave(trees[0]))
    mngr.save(1, args=FastPersistSave(trees[1]))
    mngr.wait_until_finished()
    for step, tree in enumerate(trees):
      assert_tree_bytes_equal(tree, mngr.restore(step, args=FastPersistRestore(abstract(tree))))
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
  assert {disk_format.METADATA_FILE, disk_format.manifest_name(0)} <= set(os.listdir(d))
  fresh = FastPersistHandler(FastPersistOptions(**SMALL))
  assert_tree_bytes_equal(tree, fresh.restore(d, args=FastPersistRestore(abstract(tree))))

  # The same through an AsyncCheckpointer: close() leaves a committed checkpoint.
  ckptr = ocp.AsyncCheckpointer(FastPersistHandler(FastPersistOptions(**SMALL)))
  ckptr.save(tmp_path / "async", args=FastPersistSave(tree))
  ckptr.close()
  assert (tmp_path / "async").is_dir()
  assert_tree_bytes_equal(tree, fresh.restore(tmp_path / "async",
                                              args=FastPersistRestore(abstract(tree))))
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
          assert_tree_bytes_equal(tree, out)
          outcomes["complete"] = outcomes.get("complete", 0) + 1
        except (CheckpointNotFoundError, CorruptCheckpointError) as e:
          outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
        except FileNotFoundError:  # the tmp dir was renamed meanwhile
          outcomes["renamed"] = outcomes.get("renamed", 0) + 1
  finally:
    ckptr.wait_until_finished()
  # The writer's own restore waits for its save; then everything is there.
  assert_tree_bytes_equal(tree, ckptr.restore(final, args=FastPersistRestore(abstract(tree))))
  assert_tree_bytes_equal(tree, ocp.Checkpointer(reader).restore(
      final, args=FastPersistRestore(abstract(tree))))
  ckptr.close()
  reader.close()


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
    within(60, lambda: h.save(tmp_path / "bad", args=FastPersistSave(tree)))
  within(60, lambda: h.save(tmp_path / "good", args=FastPersistSave(tree)))
  assert_tree_bytes_equal(tree, h.restore(tmp_path / "good",
                                          args=FastPersistRestore(abstract(tree))))
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
    within(60, lambda: (ckptr.save(tmp_path / "bad", args=FastPersistSave(tree)),
                         ckptr.wait_until_finished()))
  assert not (tmp_path / "bad").exists()
  monkeypatch.undo()
  within(60, lambda: (ckptr.save(tmp_path / "good", args=FastPersistSave(tree)),
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


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))
