"""Snapshot semantics: what a save blocks for, and that donation after it returns
never changes what was saved."""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fastpersist_jax import (FastPersistHandler, FastPersistOptions, FastPersistRestore,
                             FastPersistSave, SaveError, UnsupportedLeafError)
from fastpersist_jax import plan as plan_lib
from fastpersist_jax import sources as sources_lib
from fastpersist_jax import staging
from fastpersist_jax.io_engine import IOEngine

MiB = 1 << 20


def _state(mesh, value):
  s = NamedSharding(mesh, P("data"))
  return {"w": jax.device_put(jnp.full((64, 256), value, jnp.float32), s),
          "b": jax.device_put(jnp.full((64,), value, jnp.float32), s),
          "rng": np.full((4,), value, np.uint32)}


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((8,), ("data",))


@pytest.mark.parametrize("mode", ["copy", "auto"])
def test_donation_and_mutation_after_save_returns_do_not_change_checkpoint(mesh, tmp_path, mode):
  h = FastPersistHandler(FastPersistOptions(snapshot=mode, staging_slab_bytes=1 * MiB))
  ckptr = ocp.AsyncCheckpointer(h)
  step = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 + 42, s), donate_argnums=0)
  state = _state(mesh, 1)
  expected = jax.tree.map(np.array, state)
  ckptr.save(tmp_path / "c", args=FastPersistSave(state))
  # Right after save returns: donate every array, overwrite the numpy leaf in place.
  rng = state.pop("rng")
  rng[:] = 99
  for _ in range(3):
    state = step(state)
  jax.block_until_ready(state)
  ckptr.wait_until_finished()
  restored = ckptr.restore(tmp_path / "c")
  for k in expected:
    np.testing.assert_array_equal(np.asarray(restored[k]), expected[k])
  assert h.last_save_stats["snapshot_mode"] == ("copy" if mode == "copy" else "view")
  ckptr.close()


def test_reference_mode_saves_arrays_that_stay_alive(mesh, tmp_path):
  h = FastPersistHandler(FastPersistOptions(snapshot="reference", staging_slab_bytes=1 * MiB))
  ckptr = ocp.AsyncCheckpointer(h)
  state = _state(mesh, 5)
  expected = jax.tree.map(np.array, state)
  ckptr.save(tmp_path / "c", args=FastPersistSave(state))
  state["rng"][:] = 99       # numpy leaves are copied while blocking, even here
  ckptr.wait_until_finished()
  restored = ckptr.restore(tmp_path / "c")
  for k in expected:
    np.testing.assert_array_equal(np.asarray(restored[k]), expected[k])
  assert h.last_save_stats["snapshot_mode"] == "reference"
  ckptr.close()


def test_reference_mode_donation_fails_the_save_instead_of_writing_garbage(mesh, tmp_path,
                                                                           monkeypatch):
  # Misuse of the lazy mode: the step donates an array before the background
  # copy reached it. The copy is held until the donation has happened.
  from fastpersist_jax import save as save_lib
  donated = threading.Event()
  real_stage = save_lib.stage

  def held_stage(*args, **kwargs):
    assert donated.wait(30)
    return real_stage(*args, **kwargs)
  monkeypatch.setattr(save_lib, "stage", held_stage)
  h = FastPersistHandler(FastPersistOptions(snapshot="reference"))
  ckptr = ocp.AsyncCheckpointer(h)
  state = _state(mesh, 1)
  ckptr.save(tmp_path / "c", args=FastPersistSave(state))
  step = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 + 42, s), donate_argnums=0)
  state.pop("rng")
  jax.block_until_ready(step(state))
  assert state["w"].is_deleted()
  donated.set()
  with pytest.raises(SaveError, match=r"leaf \['(w|b)'\].*deleted"):
    ckptr.wait_until_finished()
  assert not (tmp_path / "c").exists()
  ckptr.close()


def test_reference_mode_returns_before_the_copy(mesh, tmp_path, monkeypatch):
  # The background copy is held until the save call has returned: only a save
  # that does not wait for the copy can get past it.
  from fastpersist_jax import save as save_lib
  release = threading.Event()
  real_stage = save_lib.stage

  def held_stage(*args, **kwargs):
    assert release.wait(30), "the save call did not return before the copy"
    return real_stage(*args, **kwargs)
  monkeypatch.setattr(save_lib, "stage", held_stage)
  big = {f"w{i}": jax.device_put(jnp.full((512, 1024), i, jnp.float32),
                                 NamedSharding(mesh, P("data"))) for i in range(4)}
  h = FastPersistHandler(FastPersistOptions(snapshot="reference"))
  ckptr = ocp.AsyncCheckpointer(h)
  ckptr.save(tmp_path / "c", args=FastPersistSave(big))
  release.set()
  ckptr.wait_until_finished()
  out = ckptr.restore(tmp_path / "c", args=FastPersistRestore(big))
  np.testing.assert_array_equal(np.asarray(out["w3"]), np.asarray(big["w3"]))
  ckptr.close()


def test_deleted_array_is_refused(mesh, tmp_path):
  x = jnp.ones(8)
  x.delete()
  h = FastPersistHandler(FastPersistOptions(snapshot="reference"))
  with pytest.raises(UnsupportedLeafError, match="'x'.*deleted"):
    h.save(tmp_path / "c", args=FastPersistSave({"x": x}))


@pytest.mark.parametrize("snapshot", ["copy", "reference"])
@pytest.mark.parametrize("on_accelerator", [False, True])
def test_array_deleted_before_staging_fails_cleanly(mesh, snapshot, on_accelerator):
  x = jax.device_put(jnp.ones((16, 16)), NamedSharding(mesh, P("data")))
  options = FastPersistOptions(snapshot=snapshot, staging_slab_bytes=1 * MiB)
  tree = {"params": {"w": x}}
  plan = plan_lib.make_plan(tree, options, process_index=0, process_count=1,
                            write_host_arrays=True, placement="shared")
  if on_accelerator:
    plan = dataclasses.replace(
        plan, shards=tuple(dataclasses.replace(s, on_accelerator=True) for s in plan.shards))
  sources = sources_lib.bind(plan, [x], options)
  x.delete()
  pool = staging.StagingPool(IOEngine(), 1 * MiB, 4 * MiB, register=False)
  with pytest.raises(SaveError, match=r"\['params'\]\['w'\].*deleted"):
    staging.stage(sources, pool, lambda w: pool.release(w.slab), threading.Event(),
                  copy_threads=1)
  assert len(pool._free) == pool.max_slabs or not pool.nbytes   # no slab leaked
  assert sources.held == 0   # nothing left pinned


def test_accelerator_path_stages_through_pinned_host_transfers(mesh, monkeypatch):
  # The accelerator path (device-to-host into "pinned_host" memory, started a
  # bounded distance ahead of the copy) also runs on CPU devices; force it.
  rng = np.random.default_rng(7)
  tree = {f"w{i}": jax.device_put(rng.standard_normal((128, 128)).astype(np.float32),
                                  NamedSharding(mesh, P("data"))) for i in range(12)}
  options = FastPersistOptions(snapshot="copy", staging_slab_bytes=64 * 1024)
  plan = plan_lib.make_plan(tree, options, process_index=0, process_count=1,
                            write_host_arrays=True, placement="shared")
  values = list(tree.values())
  expected = [np.asarray(values[s.leaf].addressable_data(s.addressable_index)).tobytes()
              for s in plan.shards]
  plan = dataclasses.replace(
      plan, shards=tuple(dataclasses.replace(s, on_accelerator=True) for s in plan.shards))
  sources = sources_lib.bind(plan, values, options)
  pool = staging.StagingPool(IOEngine(), 64 * 1024, 128 * 1024, register=False)
  pool.ensure(plan.staged_bytes)
  got = {}

  def consume(w):
    view = pool.view(w.slab)
    for pos, at, n in w.pieces:
      got[pos] = got.get(pos, b"") + view[at:at + n].tobytes()
    pool.release(w.slab)
  # Transfers run a bounded distance ahead: host memory stays the pool plus
  # a few slabs, whatever the checkpoint's size.
  in_flight = []
  real_take = sources_lib._Transfers.take

  def take(self, consumed):
    out = real_take(self, consumed)
    in_flight.append(self._in_flight)
    return out
  monkeypatch.setattr(sources_lib._Transfers, "take", take)
  staging.stage(sources, pool, consume, threading.Event(), copy_threads=1)
  assert [got[i] for i in range(len(plan.shards))] == expected
  assert sources.held == 0   # nothing left pinned
  limit = sources_lib._D2H_LOOKAHEAD_SLABS * pool.slab_bytes
  assert plan.staged_bytes > 2 * limit and 0 < max(in_flight) <= limit


def test_background_error_reaches_the_future_and_nothing_is_committed(mesh, tmp_path, monkeypatch):
  h = FastPersistHandler(FastPersistOptions(snapshot="reference"))
  ckptr = ocp.AsyncCheckpointer(h)

  def broken_stage(*args, **kwargs):
    raise OSError(5, "injected I/O error")
  monkeypatch.setattr("fastpersist_jax.save.stage", broken_stage)
  ckptr.save(tmp_path / "c", args=FastPersistSave(_state(mesh, 3)))
  with pytest.raises(Exception, match="injected I/O error"):
    ckptr.wait_until_finished()
  assert not (tmp_path / "c").exists()
  monkeypatch.undo()
  ckptr.save(tmp_path / "d", args=FastPersistSave(_state(mesh, 4)))   # the handler still works
  ckptr.wait_until_finished()
  assert float(np.asarray(ckptr.restore(tmp_path / "d")["b"])[0]) == 4
  ckptr.close()



def test_failed_saves_return_their_staging_memory_and_report_the_first_error(mesh, tmp_path):
  # A pool of 2 slabs and a checkpoint of ~6: the copy waits for the writer,
  # which fails with ENOSPC. The copy must stop, give every slab back, and the
  # save must raise the ENOSPC (not the abort it caused). Repeated, then a
  # good save: a leak would make that last save wait forever.
  import errno  # pylint: disable=g-import-not-at-top
  h = FastPersistHandler(FastPersistOptions(snapshot="copy", staging_slab_bytes=256 * 1024,
                                            host_memory_limit=512 * 1024))
  tree = {f"w{i}": jax.device_put(jnp.full((128, 256), i, jnp.float32),
                                  NamedSharding(mesh, P("data"))) for i in range(6)}
  real_write = h._engine.write  # pylint: disable=protected-access

  def full_disk(extents):
    raise OSError(errno.ENOSPC, "No space left on device (injected)")
  h._engine.write = full_disk  # pylint: disable=protected-access
  for attempt in range(4):
    with pytest.raises(SaveError) as info:
      h.save(tmp_path / f"fail{attempt}", args=FastPersistSave(tree))
    assert "No space left" in str(info.value), info.value
    assert len(h._pool._free) == 2   # pylint: disable=protected-access
  h._engine.write = real_write  # pylint: disable=protected-access
  done = threading.Event()
  worker = threading.Thread(target=lambda: (h.save(tmp_path / "ok", args=FastPersistSave(tree)),
                                            done.set()), daemon=True)
  worker.start()
  assert done.wait(60), "a save after failed ones did not finish: staging memory leaked"
  out = h.restore(tmp_path / "ok", args=FastPersistRestore(tree))
  np.testing.assert_array_equal(np.asarray(out["w5"]), np.asarray(tree["w5"]))


def test_background_threads_are_reused_at_lower_priority_on_the_chosen_cpus(mesh, tmp_path,
                                                                           monkeypatch):
  from fastpersist_jax import checksums as checksums_lib
  cpu = max(os.sched_getaffinity(0))
  seen = []
  real_crc = checksums_lib.crc32c.crc32c

  def spying_crc(data, crc=0):
    tid = threading.get_native_id()
    seen.append((threading.get_ident(), os.sched_getaffinity(0),
                 os.getpriority(os.PRIO_PROCESS, tid)))
    return real_crc(data, crc)
  monkeypatch.setattr(checksums_lib.crc32c, "crc32c", spying_crc)
  base_nice = os.getpriority(os.PRIO_PROCESS, 0)
  h = FastPersistHandler(FastPersistOptions(background_nice=3, background_cpus=(cpu,)))
  threads_before = None
  for i in range(6):
    h.save(tmp_path / f"c{i}", args=FastPersistSave(_state(mesh, i)))
    if i == 1:
      threads_before = threading.active_count()
  assert threading.active_count() == threads_before   # no thread per save
  assert len({ident for ident, _, _ in seen}) <= 3     # the same few threads throughout
  assert all(aff == {cpu} for _, aff, _ in seen)
  assert all(nice >= min(19, base_nice + 3) for _, _, nice in seen)
  assert h.last_save_stats["cpu_s"] > 0
  restored = h.restore(tmp_path / "c5")
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.full((64, 256), 5, np.float32))
  # The caller's own thread is untouched.
  assert os.getpriority(os.PRIO_PROCESS, 0) == base_nice
  h.close()


@pytest.mark.parametrize("cpus", [(), (-1,), ("0",), (True,)])
def test_bad_background_cpus_are_refused(cpus):
  with pytest.raises(ValueError, match="background_cpus"):
    FastPersistOptions(background_cpus=cpus)


@pytest.mark.filterwarnings("ignore:os.fork")
def test_saves_work_in_a_forked_child(mesh, tmp_path):
  # The parent's idle background threads do not exist in a forked child.
  h = FastPersistHandler(FastPersistOptions(staging_slab_bytes=1 * MiB))
  h.save(tmp_path / "parent", args=FastPersistSave({"x": np.arange(1000)}))
  r, w = os.pipe()
  pid = os.fork()
  if pid == 0:  # the child: a plain numpy save (no JAX computation needed)
    ok = b"0"
    try:
      os.close(r)
      child = FastPersistHandler(FastPersistOptions(staging_slab_bytes=1 * MiB))
      th = threading.Thread(target=lambda: child.save(tmp_path / "child",
                                                      args=FastPersistSave({"x": np.arange(7)})),
                            daemon=True)
      th.start()
      th.join(30)
      ok = b"1" if not th.is_alive() and (tmp_path / "child").exists() else b"0"
    finally:
      os.write(w, ok)
      os._exit(0)
  os.close(w)
  ready, _, _ = select.select([r], [], [], 90)
  got = os.read(r, 1) if ready else b""
  if not ready:
    os.kill(pid, signal.SIGKILL)
  os.waitpid(pid, 0)
  assert got == b"1", "the save in the forked child did not finish"
  restored = h.restore(tmp_path / "child")
  np.testing.assert_array_equal(restored["x"], np.arange(7))


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))
