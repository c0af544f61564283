"""Multi-process outcome agreement (coordination.py) attacked as a realistic
user of Orbax with several JAX processes would: one host's files damaged,
a process failing before planning, Orbax's active_processes subsets, the v1
API. What must hold: correct values, or every process raises within about
commit_timeout_s; never a hang, never wrong values.

Each bug is kept as a test of the promised behaviour. The
multi-process tests run this very file as their worker
(`python tests/test_break_agreement.py --worker SCENARIO PID NPROC PORT DIR`):
two JAX processes on localhost (CPU devices, gloo), 2 devices each. Every
operation that could hang runs on a thread the worker gives up on after a
few seconds ("HANG"), so a hang fails the test quickly instead of stalling it.
"""

from __future__ import annotations

import os
import sys
import time

import helpers  # pylint: disable=g-bad-import-order  (sets XLA_FLAGS before jax is imported)
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fastpersist_jax import (FastPersistCheckpointableHandler, FastPersistHandler,
                             FastPersistOptions, FastPersistRestore, FastPersistSave,
                             checkpointables_registry, disk_format)

THIS = os.path.abspath(__file__)
TIMEOUT_S = 3.0   # commit_timeout_s of the handlers here (and a third of the HANG limit)
# commit_timeout_s of a handler used only for operations that must time out:
# the peer they wait for never comes, by the scenario's own sequence (never
# by a race), so a short wait proves the same "raises instead of hanging".
FAIL_TIMEOUT_S = 1.0
_FAILURES = ("Error", "Exception")   # an outcome string naming a raised exception


def _run_two(scenario: str, root) -> list[dict | None]:
  """Runs `scenario` of this file's worker on 2 processes (helpers.run_scenario)."""
  return helpers.run_scenario(THIS, scenario, root, timeout=90)


def _raised(outcome: str) -> bool:
  """Whether an outcome string names a raised exception (not ok, no hang)."""
  return outcome.split(":")[0].endswith(_FAILURES)


# Per-host checkpoints whose hosts swap parts ------------------------------------

def test_one_hosts_truncated_data_file_never_hangs_the_other_hosts_in_the_part_swap(tmp_path):
  p0, p1 = _run_two("swap_truncated_file", tmp_path)
  assert p0["warm"] == "ok" and p1 is not None and p1["warm"] == "ok", (p0, p1)
  # Process 1's own file is damaged: it refuses the step, naming it.
  assert p1["restore"].startswith("CorruptCheckpointError"), p1
  # Process 0 (still alive, process 1 waits up to 12 s for it) must raise
  # within about commit_timeout_s, not wait in the swap for process 1.
  assert _raised(p0["restore"]), p0
  assert p0["seconds"] < 2 * TIMEOUT_S + 1, p0


def test_one_hosts_damaged_metadata_does_not_break_every_later_restore(tmp_path):
  p0, p1 = _run_two("per_host_bad_metadata", tmp_path)
  assert p1 is not None, p0
  # Step 1 is damaged on process 1: both raise (process 0 after the timeout).
  assert p1["damaged"].startswith("CorruptCheckpointError"), p1
  assert _raised(p0["damaged"]), p0
  # Step 0 is intact on both hosts: restoring it afterwards must work.
  assert p0["good"] == ["ok", "ok"] and p1["good"] == ["ok", "ok"], (p0, p1)


def test_a_restore_never_returns_a_global_array_mixed_from_two_steps(tmp_path):
  p0, p1 = _run_two("mixed_steps", tmp_path)
  assert p1 is not None, p0
  assert p1["missing"].startswith("FileNotFoundError"), p1   # Orbax, before the handler
  # Process 0 restored step 1, process 1 step 0 (its fall-back): process 0's
  # restore must raise, or its global array must be step 1's.
  assert _raised(p0["restore"]) or p0["global"] == "step 1", (p0, p1)


# Saves ---------------------------------------------------------------------------

def test_a_save_refused_before_planning_on_one_process_does_not_break_later_saves(tmp_path):
  p0, p1 = _run_two("save_refused_on_one", tmp_path)
  assert p1 is not None, p0
  assert p1["refused"].startswith("UnsupportedLeafError"), p1
  assert _raised(p0["refused"]), p0   # SaveError: process 1 did not finish its part
  # Later saves, of live arrays on both processes, must succeed and restore.
  assert p0["later"] == ["ok", "ok"] and p1["later"] == ["ok", "ok"], (p0, p1)


def test_a_save_refused_on_one_process_never_returns_success_on_another(tmp_path):
  p0, p1 = _run_two("save_refused_then_next", tmp_path)
  assert p1 is not None, p0
  assert p1["refused"].startswith("UnsupportedLeafError"), p1
  # Process 1 never wrote its part of "a": process 0's save of it must raise.
  assert _raised(p0["refused"]), p0


def test_a_save_on_the_active_processes_only_fails_in_bounded_time_and_shifts_nothing(tmp_path):
  # Saving on a subset of the processes is not supported (a shared
  # checkpoint holds every process's manifest; README says so): the save
  # raises SaveError naming the absent process after commit_timeout_s,
  # commits nothing, and the saves all processes make afterwards work.
  p0, p1 = _run_two("active_subset_save", tmp_path)
  assert p0["save"].startswith("SaveError") and "[1]" in p0["save"], p0
  assert not os.path.exists(os.path.join(tmp_path, "0")), os.listdir(tmp_path)
  assert p0["joint"] == "ok" and p1 is not None and p1["joint"] == "ok", (p0, p1)


# Orbax v1 ------------------------------------------------------------------------

def test_a_v1_load_on_the_active_processes_only_does_not_wait_for_the_others(tmp_path):
  p0, _ = _run_two("v1_active_subset_load", tmp_path)
  assert p0["load"] == "ok", p0



# The multi-process worker -------------------------------------------------------

class _ShortTimeoutHandler(FastPersistCheckpointableHandler):
  """The v1 handler with commit_timeout_s = TIMEOUT_S (Orbax v1 constructs
  handlers itself: options go in a subclass)."""
  options = FastPersistOptions(commit_timeout_s=TIMEOUT_S)


def _worker(scenario: str, pid: int, nproc: int, port: int, root: str) -> None:
  """One process of a multi-process test above; prints "RESULT <json>"."""
  client = helpers.init_distributed(pid, nproc, port)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 2), ("data", "model"), devices=jax.devices())
  host = (np.arange(64 * 512, dtype=np.float32).reshape(64, 512) % 251) + 1
  options = FastPersistOptions(commit_timeout_s=TIMEOUT_S)
  failing = FastPersistOptions(commit_timeout_s=FAIL_TIMEOUT_S)
  result: dict = {}

  saved, target, same = helpers.worker_arrays(mesh, host)

  def sync(name: str) -> None:
    client.wait_at_barrier(f"break2/{name}", 60_000)

  def finish() -> None:
    helpers.report_and_exit(client, result, pid, nproc, "break2")

  def bounded(fn, check=None, limit: float = 3 * TIMEOUT_S) -> str:
    return helpers.bounded_outcome(fn, check, limit)

  def per_host_manager():
    # Params replicated over "data" (across the processes): each host's
    # directory holds its parts, swapped on restore.
    mp = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={pid})
    host_dir = os.path.join(root, f"host{pid}")
    os.makedirs(host_dir, exist_ok=True)
    handler = FastPersistHandler(options, multiprocessing_options=mp)
    return ocp.CheckpointManager(host_dir, item_handlers=handler, options=ocp.CheckpointManagerOptions(
        multiprocessing_options=mp, create=False,
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False)))

  if scenario == "swap_truncated_file":
    w = saved(P(None, "model"))
    mngr = per_host_manager()
    mngr.save(0, args=FastPersistSave({"w": w}))
    mngr.wait_until_finished()
    # (A first restore starts gloo.)
    result["warm"] = bounded(lambda: mngr.restore(0, args=FastPersistRestore(target(w))), same)
    sync("warm")
    if pid == 1:   # a disk error cut this host's data file short
      item = os.path.join(root, "host1", "0", "default")
      path = os.path.join(item, disk_format.data_file_name(1, 0))
      os.truncate(path, os.path.getsize(path) // 2)
    sync("damaged")
    t0 = time.monotonic()
    result["restore"] = bounded(lambda: mngr.restore(0, args=FastPersistRestore(target(w))), same)
    result["seconds"] = time.monotonic() - t0
    helpers.stay_until_process_0_is_done(client, pid, "break2/done", 12_000)
  elif scenario == "per_host_bad_metadata":
    w = saved(P(None, "model"))
    mngr = per_host_manager()
    mngr.save(0, args=FastPersistSave({"w": w}))
    mngr.save(1, args=FastPersistSave({"w": w}))
    mngr.wait_until_finished()
    sync("saved")
    if pid == 1:   # this host's metadata of step 1 is damaged
      with open(os.path.join(root, "host1", "1", "default", disk_format.METADATA_FILE), "wb") as f:
        f.write(b"{")
    sync("damaged")
    result["damaged"] = bounded(lambda: mngr.restore(1, args=FastPersistRestore(target(w))), same)
    sync("after_damaged")   # both have given up on step 1
    result["good"] = []
    for k in range(2):
      result["good"].append(
          bounded(lambda: mngr.restore(0, args=FastPersistRestore(target(w))), same))
      sync(f"good{k}")
  elif scenario in ("save_refused_on_one", "save_refused_then_next"):
    # (save_refused_then_next's saves all fail: process 1 never takes part
    # in "a", process 0 never in "b".)
    handler = FastPersistHandler(options if scenario == "save_refused_on_one" else failing)
    w = saved(P("data"))
    if pid == 1:
      w.delete()   # e.g. donated by a step this host ran differently
    result["refused"] = bounded(lambda: handler.save(os.path.join(root, "a"),
                                                     args=FastPersistSave({"w": w})))
    if scenario == "save_refused_then_next":
      # Process 1 goes on at once with its next save (process 0's first one
      # is still waiting for it).
      result["next"] = bounded(lambda: handler.save(os.path.join(root, "b"),
                                                    args=FastPersistSave({"w": saved(P("data"))})))
      a = os.path.join(root, "a")
      result["a_files"] = sorted(os.listdir(a)) if os.path.isdir(a) else None
    else:
      sync("refused")   # both have given up on "a"
      result["later"] = []
      for name in ("b", "c"):
        x = saved(P("data"))
        out = bounded(lambda: handler.save(os.path.join(root, name), args=FastPersistSave({"w": x})))
        sync(f"saved_{name}")
        if out == "ok":
          out = bounded(lambda: handler.restore(os.path.join(root, name),
                                                args=FastPersistRestore(target(x))), same)
        result["later"].append(out)
        sync(f"restored_{name}")
  elif scenario == "active_subset_save":
    if pid == 0:   # process 0 alone checkpoints an array on its own devices
      local = jax.make_mesh((2,), ("data",), devices=jax.local_devices())
      x = jax.make_array_from_callback(host.shape, NamedSharding(local, P("data")),
                                       lambda i: host[i])
      mp = ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})
      os.makedirs(root, exist_ok=True)   # Orbax leaves the root to the caller here
      # Process 1 never takes part (it waits at "subset_done"): this save fails.
      mngr = ocp.CheckpointManager(
          root, item_handlers=FastPersistHandler(failing, multiprocessing_options=mp),
          options=ocp.CheckpointManagerOptions(multiprocessing_options=mp, create=False))

      def save():
        mngr.save(0, args=FastPersistSave({"w": x}))
        mngr.wait_until_finished()
      result["save"] = bounded(save)
      result["restore"] = bounded(lambda: mngr.restore(0, args=FastPersistRestore(target(x))),
                                  same)
    sync("subset_done")
    # Then both processes save together, as before.
    w = saved(P("data"))
    handler = FastPersistHandler(options)
    result["joint"] = bounded(lambda: handler.save(os.path.join(root, "joint"),
                                                   args=FastPersistSave({"w": w})))
  elif scenario == "v1_active_subset_load":
    registry = checkpointables_registry(handler_type=_ShortTimeoutHandler)
    path = os.path.join(root, "ckpt")
    w = saved(P("data"))
    with ocp.v1.Context(checkpointables_options=ocp.v1.options.CheckpointablesOptions(
        registry=registry)):
      ocp.v1.save_checkpointables(path, {"state": {"w": w}})
    sync("saved")
    if pid == 0:   # process 0 alone reads the checkpoint into numpy
      mp = ocp.v1.options.MultiprocessingOptions(primary_host=0, active_processes={0})

      def load():
        with ocp.v1.Context(multiprocessing_options=mp,
                            checkpointables_options=ocp.v1.options.CheckpointablesOptions(
                                registry=registry)):
          return ocp.v1.load_checkpointables(
              path, {"state": {"w": np.zeros(host.shape, host.dtype)}})["state"]
      result["load"] = bounded(load, same)
      client.key_value_set("break2/done", "1")
    else:
      client.blocking_key_value_get("break2/done", 60_000)
  elif scenario == "mixed_steps":
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    with ocp.CheckpointManager(root, item_handlers=FastPersistHandler(options)) as mngr:
      vals = [host, host + 1000]
      for k in (0, 1):
        mngr.save(k, args=FastPersistSave({"w": saved(P("data"), vals[k])}))
      mngr.wait_until_finished()
    sync("saved")
    # The processes restore different steps, which never pair: they time out.
    mngr = ocp.CheckpointManager(root, item_handlers=FastPersistHandler(failing))
    t = target(saved(P("data")))
    if pid == 1:   # step 1 is not visible here yet (say, a lagging file system): fall back to 0
      result["missing"] = bounded(lambda: mngr.restore(7, args=FastPersistRestore(t)))
      step = 0
    else:
      step = 1
    box = {}

    def restore():
      box["r"] = mngr.restore(step, args=FastPersistRestore(t))
      return box["r"]
    result["restore"] = bounded(restore, lambda r: same(r, vals[step]))
    client.key_value_set(f"break2/restored/{pid}", result["restore"][:2])
    other = client.blocking_key_value_get(f"break2/restored/{1 - pid}", 30_000)
    if result["restore"] == "ok" and other == "ok":
      g = np.asarray(multihost_utils.process_allgather(box["r"]["w"], tiled=True))
      result["global"] = next((f"step {k}" for k in (0, 1) if np.array_equal(g, vals[k])),
                              "a mix of steps 0 and 1")
  else:
    raise SystemExit(f"unknown scenario {scenario}")
  finish()


if __name__ == "__main__":
  if sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
  else:   # Bazel py_test runs the file itself
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
