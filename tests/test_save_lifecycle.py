"""A failed save never wedges the saves after it.

Every path on which a save does not reach its commit (Orbax never creates
its directory, an exception at any step before or during the commit, a
cancelled commit future, a handler closed mid-save) gives back the staging
memory it holds, and every wait in the save path is bounded. Each scenario
runs through Orbax's CheckpointManager or its v1 Checkpointer, fails one save,
then saves again and restores bit-exact. The scenario runs on a thread joined
with a deadline, so a regression fails the test instead of hanging it.
"""

from __future__ import annotations

import errno
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.multihost import multihost as orbax_multihost

import fastpersist_jax as fp
from fastpersist_jax import checksums, io_engine, orbax_internals, save, sources, staging
from fastpersist_jax.handler import FastPersistHandler
from helpers import MiB, assert_tree_bytes_equal, within

# A pool of 4 slabs of 1 MiB and a 6 MiB state: the snapshot must wait for
# written windows to come back, so a save that holds slabs starves the next.
SMALL_POOL = dict(host_memory_limit=4 * MiB, staging_slab_bytes=1 * MiB, commit_timeout_s=3.0)
DEADLINE_S = 90.0


def state(step: int) -> dict:
  n = 6 * MiB // 4
  return {"w": jax.numpy.asarray((np.arange(n, dtype=np.uint32) * np.uint32(2654435761))
                                 ^ np.uint32(step)),
          "b": np.full(1000, step, np.float32), "step": step}


def assert_pool_whole(handler: FastPersistHandler) -> None:
  """Every slab of the handler's staging pool is free again."""
  pool = handler._pool  # pylint: disable=protected-access
  assert sorted(pool._free) == list(range(len(pool._slabs)))  # pylint: disable=protected-access


def fail_directory_creation(monkeypatch, step: int) -> None:
  """Orbax's creation of the temporary directory of `step` fails, once (a
  full or read-only disk at that moment)."""
  cls = ocp.path.atomicity.AtomicRenameTemporaryPath
  create = cls.create
  armed = {"on": True}
  # Orbax's own futures of that save wait for the directory's signal, on
  # non-daemon threads, for its coordination timeout (5 min): shortened, so
  # that the test process does not wait for them at exit.
  monkeypatch.setattr(orbax_multihost, "_DEFAULT_BARRIER_TIMEOUT", 10)

  async def failing_create(self):
    if armed["on"] and self.get_final().name == str(step):
      armed["on"] = False
      raise OSError(errno.ENOSPC, "No space left on device (injected)")
    return await create(self)
  monkeypatch.setattr(cls, "create", failing_create)


def manager_saves(root, handler, steps, *, snapshot_fault_step=None):
  """Saves `steps` through a CheckpointManager; returns the steps that
  failed (their error types) and the manager's steps."""
  failed = {}
  mngr = ocp.CheckpointManager(root, item_handlers=handler,
                               options=fp.durable_manager_options(max_to_keep=3))
  for step in steps:
    try:
      mngr.save(step, args=fp.FastPersistSave(state(step)))
      mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      failed[step] = type(e).__name__
  restored = {s: mngr.restore(s, args=fp.FastPersistRestore()) for s in mngr.all_steps()}
  mngr.close()
  return failed, restored


@pytest.mark.parametrize("snapshot", ["auto", "copy"])
def test_directory_never_created_then_ten_saves_v0(tmp_path, monkeypatch, snapshot):
  fail_directory_creation(monkeypatch, step=1)
  handler = FastPersistHandler(fp.FastPersistOptions(snapshot=snapshot, **SMALL_POOL))
  failed, restored = within(DEADLINE_S, lambda: manager_saves(tmp_path, handler, range(12)))
  assert list(failed) == [1]
  assert sorted(restored) == [9, 10, 11]
  for s, tree in restored.items():
    assert_tree_bytes_equal(state(s), tree)
  assert_pool_whole(handler)


def test_directory_never_created_then_ten_saves_v1(tmp_path, monkeypatch):
  fail_directory_creation(monkeypatch, step=1)

  class SmallPool(fp.FastPersistCheckpointableHandler):
    # The state is larger than the pool, so the save's blocking part waits for
    # the directory: the failed one for commit_timeout_s.
    options = fp.FastPersistOptions(**SMALL_POOL)
  ctx = ocp.v1.Context(checkpointables_options=ocp.v1.options.CheckpointablesOptions(
      registry=fp.checkpointables_registry(handler_type=SmallPool)))

  def saves():
    failed = []
    with ctx, fp.DurableCheckpointer(tmp_path) as ckptr:
      for step in range(12):
        try:
          ckptr.save_pytree(step, state(step))
        except Exception:  # pylint: disable=broad-except
          failed.append(step)
      steps = [m.step for m in ckptr.checkpoints]
      restored = {s: ckptr.load_pytree(s) for s in (0, 3, 11)}
    return failed, steps, restored

  try:
    failed, steps, restored = within(DEADLINE_S, saves)
  finally:
    SmallPool.close_shared()
  # Orbax v1 raises a failed save's error again from the next save (its own
  # PyTreeHandler does the same); every save after that succeeds.
  assert failed == [1, 2]
  assert steps == [0] + list(range(3, 12))
  for s, tree in restored.items():
    assert_tree_bytes_equal(state(s), tree)


# Each fault point of the save path, in data-flow order: (what, object,
# attribute). The wrapped function raises EIO at its first call in the
# second save; the saves after it must succeed.
FAULT_POINTS = [
    ("plan", FastPersistHandler.__module__, "make_plan"),
    ("bind sources", sources, "bind"),
    ("grow staging pool", staging.StagingPool, "ensure"),
    ("read Orbax's signals", orbax_internals, "directory_signals"),
    ("copy into staging", staging._ext, "copy_many"),  # pylint: disable=protected-access
    ("take a shard", sources.ShardSources, "take"),
    ("checksum", checksums.ShardChecksums, "update"),
    ("await directory", save, "await_directory"),
    ("open data file", io_engine.IOEngine, "open_for_write"),
    ("write windows", io_engine.IOEngine, "write"),
    ("sync data", io_engine.IOEngine, "sync"),
    ("encode manifest", save.disk_format, "encode_manifest"),
    ("write manifest", io_engine.IOEngine, "write_files"),
    ("finalize", FastPersistHandler, "finalize"),
]


@pytest.mark.parametrize("snapshot", ["auto", "copy"])
@pytest.mark.parametrize("what,owner,attr", FAULT_POINTS, ids=[f[0] for f in FAULT_POINTS])
def test_fault_at_each_step_of_the_save_then_saves_succeed(tmp_path, monkeypatch, snapshot, what,
                                                           owner, attr):
  del what
  if isinstance(owner, str):
    import importlib  # pylint: disable=g-import-not-at-top
    owner = importlib.import_module(owner)
  handler = FastPersistHandler(fp.FastPersistOptions(snapshot=snapshot, **SMALL_POOL))
  original = getattr(owner, attr)
  armed = {"on": False}

  def faulty(*args, **kwargs):
    if armed["on"]:
      armed["on"] = False
      raise OSError(errno.EIO, f"injected fault in {attr}")
    return original(*args, **kwargs)
  monkeypatch.setattr(owner, attr, faulty)

  def saves():
    mngr = ocp.CheckpointManager(tmp_path, item_handlers=handler,
                                 options=fp.durable_manager_options(max_to_keep=5))
    failed = []
    for step in range(4):
      armed["on"] = step == 1
      try:
        mngr.save(step, args=fp.FastPersistSave(state(step)))
        mngr.wait_until_finished()
      except Exception:  # pylint: disable=broad-except
        failed.append(step)
    assert not armed["on"], f"the fault in {attr} was never reached"
    restored = {s: mngr.restore(s, args=fp.FastPersistRestore()) for s in mngr.all_steps()}
    mngr.close()
    return failed, restored

  failed, restored = within(DEADLINE_S, saves)
  assert failed == [1]
  assert sorted(restored) == [0, 2, 3]
  for s, tree in restored.items():
    assert_tree_bytes_equal(state(s), tree)
  assert_pool_whole(handler)


def test_cancelled_commit_gives_back_staging_memory(tmp_path):
  handler = FastPersistHandler(fp.FastPersistOptions(**SMALL_POOL))

  async def start(directory, step):
    return await handler.async_save(directory, args=fp.FastPersistSave(state(step)))

  def scenario():
    import asyncio  # pylint: disable=g-import-not-at-top
    # The directory does not exist yet: the commit waits for it, holding
    # staged windows, until it is cancelled.
    (future,) = asyncio.run(start(tmp_path / "never", 0))
    future.cancel()
    with pytest.raises(fp.SaveError, match="cancelled"):
      future.result(timeout=30)
    (tmp_path / "next").mkdir()
    (future,) = asyncio.run(start(tmp_path / "next", 1))
    future.result(timeout=30)
    handler.finalize(tmp_path / "next")
    return handler.restore(tmp_path / "next", args=fp.FastPersistRestore())

  restored = within(DEADLINE_S, scenario)
  assert_tree_bytes_equal(state(1), restored)
  assert_pool_whole(handler)
  handler.close()


def test_handler_closed_mid_save_abandons_it_and_serves_the_next(tmp_path):
  handler = FastPersistHandler(fp.FastPersistOptions(**SMALL_POOL))

  def scenario():
    import asyncio  # pylint: disable=g-import-not-at-top
    (future,) = asyncio.run(handler.async_save(tmp_path / "never",
                                               args=fp.FastPersistSave(state(0))))
    handler.close()   # must not wait commit_timeout_s for the directory
    with pytest.raises(fp.SaveError, match="closed"):
      future.result(timeout=0)
    handler.save(tmp_path / "next", args=fp.FastPersistSave(state(1)))
    return handler.restore(tmp_path / "next", args=fp.FastPersistRestore())

  restored = within(30, scenario)
  assert_tree_bytes_equal(state(1), restored)
  handler.close()


def test_directory_wait_is_bounded_and_names_the_directory(tmp_path):
  handler = FastPersistHandler(fp.FastPersistOptions(host_memory_limit=4 * MiB,
                                                     staging_slab_bytes=1 * MiB,
                                                     commit_timeout_s=1.0))

  def scenario():
    import asyncio  # pylint: disable=g-import-not-at-top
    small = {"b": np.arange(1000, dtype=np.float32)}
    (future,) = asyncio.run(handler.async_save(tmp_path / "never", args=fp.FastPersistSave(small)))
    with pytest.raises(fp.SaveError, match=r"never.*waited 1 s"):
      future.result(timeout=20)

  within(30, scenario)
  assert_pool_whole(handler)
  handler.close()


def test_staging_pool_wait_is_bounded_and_says_what_it_waited_for():
  engine = io_engine.IOEngine(fp.FastPersistOptions())
  pool = staging.StagingPool(engine, 1 * MiB, 1 * MiB, register=False)
  pool.ensure(1 * MiB)
  held = pool.acquire(threading.Event())
  with pytest.raises(fp.SaveError, match=r"no staging slab came free for 0.2 s.*1 slabs"):
    pool.acquire(threading.Event(), timeout_s=0.2)
  pool.release(held)
  assert pool.acquire(threading.Event(), timeout_s=0.2) == held


def test_orbax_signal_contract_is_readable():
  """The save reads Orbax's directory-creation signals (orbax_internals);
  an Orbax upgrade that moves them fails here rather than quietly falling
  back to waiting for the directory alone."""
  assert orbax_internals.available()
  assert orbax_internals._V1_SIGNALLED_PATH is not None  # pylint: disable=protected-access
