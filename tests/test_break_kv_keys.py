"""Coordination keys deleted once read (coordination.agree, save.py's save
id), attacked as a user of Orbax with several JAX processes would: saves of
several FastPersist items at once (Orbax's Composite), back-to-back async
saves, restores that swap parts of per-host replica-parallel saves, failed
saves and timed-out agreements. What must hold: every operation's outcome
is right on every process (no process reports another as failed when all
succeeded), and the keys in the coordination service do not grow with the
number of operations, failed ones included.

The multi-process tests run this very file as their worker
(`python tests/test_break_kv_keys.py --worker SCENARIO PID NPROC PORT DIR`):
two JAX processes on localhost (CPU devices, gloo), 2 devices each. Every
operation that could hang runs on a thread the worker gives up on after a
few seconds ("HANG").
"""

from __future__ import annotations

import os
import sys
import time

import helpers  # pylint: disable=g-bad-import-order  (sets XLA_FLAGS before jax is imported)
import jax
import numpy as np
import pytest
from etils import epath
from jax.sharding import PartitionSpec as P

from fastpersist_jax import (FastPersistHandler, FastPersistOptions, FastPersistRestore,
                             FastPersistSave, coordination, disk_format)

THIS = os.path.abspath(__file__)
TIMEOUT_S = 3.0        # commit_timeout_s of the handlers here
FAIL_TIMEOUT_S = 1.0   # of a handler whose agreement must time out (its peer never comes)
# How late a process reads the others' outcomes after an agreement's
# barrier: a thread descheduled for this long on a loaded host.
LATE_READ_S = 1.0
NATURAL_SAVES = 10   # saves of two items at once (about half fail spuriously at cad19a7)
_FAILURES = ("Error", "Exception")


def _run_two(scenario: str, root) -> list[dict | None]:
  """Runs `scenario` of this file's worker on 2 processes (helpers.run_scenario)."""
  return helpers.run_scenario(THIS, scenario, root, timeout=90)


def _raised(outcome: str) -> bool:
  """Whether an outcome string names a raised exception (not ok, no hang)."""
  return outcome.split(":")[0].endswith(_FAILURES)


@pytest.fixture(scope="module")
def composite_runs(tmp_path_factory):
  """One launch: saves of two FastPersist items at once (Orbax's Composite)."""
  root = tmp_path_factory.mktemp("composite")
  return _run_two("composite", root)


@pytest.fixture(scope="module")
def sequence_runs(tmp_path_factory):
  """One launch: async saves, restores, per-host swaps, failures, timeouts."""
  root = tmp_path_factory.mktemp("sequence")
  return _run_two("sequence", root)


# Saves of several items at once ---------------------------------------------------

def test_saving_two_items_at_once_never_reports_a_process_that_succeeded_as_failed(composite_runs):
  # (Through ocp.CheckpointManager with two FastPersist items the same
  # happens, and a step whose save failed on one process only can hang.)
  p0, p1 = composite_runs
  assert p1 is not None, p0
  assert p0["natural"] == ["ok"] * NATURAL_SAVES == p1["natural"], (p0["natural"], p1["natural"])


def test_a_late_reader_of_an_agreement_still_finds_every_outcome(composite_runs):
  p0, p1 = composite_runs
  assert p1 is not None, p0
  assert p0["late"] == "ok" and p1["late"] == "ok", (p0["late"], p1["late"])


def test_keys_after_saves_of_several_items_at_once_stay_few(composite_runs):
  p0, _ = composite_runs
  assert p0["keys"] <= 4, p0["left"]   # the last outcome per process, nothing per step


# Sequences of saves and restores ---------------------------------------------------

def test_back_to_back_async_saves_with_restores_during_their_commits_all_succeed(sequence_runs):
  for r in sequence_runs:
    assert r is not None and r["async"] == ["ok"] * 9, r and r["async"]
  # Saves and restores: the last outcome of each, per process.
  assert sequence_runs[0]["keys_async"] <= 4, sequence_runs[0]


def test_per_host_swapping_restores_work_after_the_save_id_is_deleted(sequence_runs):
  for r in sequence_runs:
    assert r["per_host"] == ["ok"] * 7, r["per_host"]
  p0 = sequence_runs[0]
  assert p0["keys_per_host"] == p0["keys_async"], p0   # no save id left behind


def test_failed_per_host_saves_leave_no_save_id_key_behind(sequence_runs):
  p0 = sequence_runs[0]
  counts = p0["keys_failed_per_host"]
  assert counts == [counts[0]] * 3, (counts, p0["left"])
  assert p0["keys_after_failed_per_host"] <= p0["keys_per_host"], p0["left"]


def test_failed_per_host_saves_fail_on_every_process_and_later_saves_work(sequence_runs):
  p0, p1 = sequence_runs
  for outcome in p0["failed_per_host"]:   # names process 1's own error, not a timeout
    assert outcome.startswith("SaveError: process 1 failed its part") and "Is a directory" in outcome
  for outcome in p1["failed_per_host"]:
    assert outcome.startswith("SaveError") and "Is a directory" in outcome
  assert p0["after_failed_per_host"] == ["ok", "ok"] == p1["after_failed_per_host"], (p0, p1)


def test_failed_shared_saves_leave_no_keys_and_later_saves_work(sequence_runs):
  p0, p1 = sequence_runs
  for outcome in p0["failed_shared"]:
    assert outcome.startswith("SaveError: process 1 failed its part") and "Is a directory" in outcome
  assert all(_raised(o) for o in p1["failed_shared"]), p1
  counts = p0["keys_failed_shared"]
  assert counts == [counts[0]] * 3, counts
  assert p0["after_failed_shared"] == ["ok", "ok"] == p1["after_failed_shared"], (p0, p1)
  assert p0["keys_after_failed_shared"] <= counts[0], p0


def test_a_timed_out_agreement_then_saves_and_restores_that_succeed(sequence_runs):
  p0, p1 = sequence_runs
  assert p0["timed_out"].startswith("SaveError") and "[1]" in p0["timed_out"], p0
  assert _raised(p1["timed_out"]), p1
  assert p0["after_timeout"] == ["ok"] * 4 == p1["after_timeout"], (p0, p1)
  # The timed-out agreement's outcomes are deleted by the next ones.
  assert p0["keys_after_timeout"] <= p0["keys_after_failed_shared"], p0


def test_orbax_v1_back_to_back_async_saves_then_loads(sequence_runs):
  for r in sequence_runs:
    assert r["v1"] == ["ok"] * 9, r["v1"]
  p0 = sequence_runs[0]
  assert p0["keys_v1"] <= p0["keys_after_timeout"], p0["left"]


# The multi-process worker -------------------------------------------------------

def _worker(scenario: str, pid: int, nproc: int, port: int, root: str) -> None:
  """One process of a multi-process test above; prints "RESULT <json>"."""
  client = helpers.init_distributed(pid, nproc, port)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 2), ("data", "model"), devices=jax.devices())
  host = (np.arange(64 * 128, dtype=np.float32).reshape(64, 128) % 251) + 1
  options = FastPersistOptions(commit_timeout_s=TIMEOUT_S)
  failing = FastPersistOptions(commit_timeout_s=FAIL_TIMEOUT_S)
  result: dict = {}

  saved, target, same = helpers.worker_arrays(mesh, host)

  def sync(name: str) -> None:
    client.wait_at_barrier(f"break5/{name}", 60_000)

  def keys() -> int:
    """The fastpersist keys in the coordination service, once every
    process is between operations."""
    sync(f"count{len(result.setdefault('_counts', []))}")
    n = len(client.key_value_dir_get("fastpersist/"))
    result["_counts"].append(n)
    sync(f"counted{len(result['_counts'])}")
    return n

  def bounded(fn, check=None, limit: float = 3 * TIMEOUT_S) -> str:
    return helpers.bounded_outcome(fn, check, limit)

  if scenario == "composite":
    # Two items, each saved by a FastPersistHandler, through the handler
    # Orbax's CheckpointManager saves several items with (its commit
    # futures, one per item, run at once).
    a, b = saved(P("data")), saved(P(None, "model"), host + 1)
    handler = ocp.CompositeCheckpointHandler(a=FastPersistHandler(options),
                                             b=FastPersistHandler(options))

    def save_both(name):
      handler.save(epath.Path(os.path.join(root, name)),
                   args=ocp.args.Composite(a=FastPersistSave({"w": a}), b=FastPersistSave({"w": b})))
    natural = []
    for k in range(NATURAL_SAVES):
      natural.append(bounded(lambda: save_both(f"n{k}")))
    result["natural"] = natural
    sync("natural")
    if pid == 1:   # this process's commit threads read the outcomes late
      original = coordination._outcome  # pylint: disable=protected-access

      def late(c, key):
        time.sleep(LATE_READ_S)
        return original(c, key)
      coordination._outcome = late  # pylint: disable=protected-access
    result["late"] = bounded(lambda: save_both("late"))
    sync("late")
    if pid == 1:
      coordination._outcome = original  # pylint: disable=protected-access
    result["keys"] = keys()
    result["left"] = sorted(k for k, _ in client.key_value_dir_get("fastpersist/"))
  elif scenario == "sequence":
    from fastpersist_jax import checkpointables_registry  # pylint: disable=g-import-not-at-top
    vals = [host + 1000 * k for k in range(4)]
    # 1. Back-to-back async saves (Orbax's CheckpointManager), each step's
    # restore of the step before running while the step's commit agrees.
    shared = ocp.CheckpointManager(os.path.join(root, "shared"),
                                   item_handlers=FastPersistHandler(options))
    x = [saved(P("data"), v) for v in vals]
    result["async"] = [bounded(lambda: shared.save(0, args=FastPersistSave({"w": x[0]})))]
    for k in range(1, 4):
      result["async"].append(bounded(lambda: shared.save(k, args=FastPersistSave({"w": x[k]}))))
      result["async"].append(bounded(lambda: shared.restore(
          k - 1, args=FastPersistRestore(target(x[0]))), lambda r: same(r, vals[k - 1])))
    result["async"].append(bounded(shared.wait_until_finished))
    result["async"].append(bounded(lambda: shared.restore(3, args=FastPersistRestore(target(x[0]))),
                                   lambda r: same(r, vals[3])))
    result["keys_async"] = keys()

    # 2. Per-host replica-parallel saves (a save id is shared; process 0
    # deletes it), then restores that swap parts, of both steps.
    mp = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={pid})
    host_dir = os.path.join(root, f"host{pid}")
    os.makedirs(host_dir, exist_ok=True)
    per_host = ocp.CheckpointManager(host_dir, item_handlers=FastPersistHandler(
        options, multiprocessing_options=mp), options=ocp.CheckpointManagerOptions(
            multiprocessing_options=mp, create=False,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False)))
    r = [saved(P(None, "model"), v) for v in vals[:2]]
    result["per_host"] = []
    for k in range(2):
      result["per_host"].append(bounded(lambda: per_host.save(k, args=FastPersistSave({"w": r[k]}))))
      result["per_host"].append(bounded(per_host.wait_until_finished))
    for k in (0, 1, 0):
      result["per_host"].append(bounded(lambda: per_host.restore(
          k, args=FastPersistRestore(target(r[0]))), lambda res: same(res, vals[k])))
    result["keys_per_host"] = keys()

    # 3. Per-host replica-parallel saves that fail on process 1 (a directory
    # stands where its data file goes), then one that succeeds.
    handler = FastPersistHandler(options, multiprocessing_options=mp)
    result["failed_per_host"] = []
    result["keys_failed_per_host"] = []
    for k in range(3):
      d = os.path.join(host_dir, f"bad{k}", "item")   # named alike on every host
      if pid == 1:
        os.makedirs(os.path.join(d, disk_format.data_file_name(1, 0)))
      result["failed_per_host"].append(bounded(lambda: handler.save(
          d, args=FastPersistSave({"w": r[0]}))))
      result["keys_failed_per_host"].append(keys())
    d = os.path.join(host_dir, "good", "item")
    result["after_failed_per_host"] = [bounded(lambda: handler.save(d, args=FastPersistSave({"w": r[1]})))]
    sync("good_saved")
    result["after_failed_per_host"].append(bounded(lambda: handler.restore(
        d, args=FastPersistRestore(target(r[0]))), lambda res: same(res, vals[1])))
    result["keys_after_failed_per_host"] = keys()

    # 4. Shared saves that fail on process 1 the same way, then one that succeeds.
    handler = FastPersistHandler(options)
    result["failed_shared"] = []
    result["keys_failed_shared"] = []
    for k in range(3):
      d = os.path.join(root, f"bad_shared{k}")
      if pid == 1:
        os.makedirs(os.path.join(d, disk_format.data_file_name(1, 0)))
      sync(f"bad_shared{k}")
      result["failed_shared"].append(bounded(lambda: handler.save(d, args=FastPersistSave({"w": x[0]}))))
      result["keys_failed_shared"].append(keys())
    d = os.path.join(root, "good_shared")
    result["after_failed_shared"] = [bounded(lambda: handler.save(d, args=FastPersistSave({"w": x[1]})))]
    result["after_failed_shared"].append(bounded(lambda: handler.restore(
        d, args=FastPersistRestore(target(x[0]))), lambda res: same(res, vals[1])))
    result["keys_after_failed_shared"] = keys()

    # 5. A save whose agreement times out (process 1 comes late), then saves
    # and restores that succeed.
    late = FastPersistHandler(failing)
    if pid == 1:
      time.sleep(2.5 * FAIL_TIMEOUT_S)
    result["timed_out"] = bounded(lambda: late.save(os.path.join(root, "late"),
                                                    args=FastPersistSave({"w": x[2]})))
    sync("timed_out")
    result["after_timeout"] = []
    for k in range(2):
      d = os.path.join(root, f"after_timeout{k}")
      result["after_timeout"].append(bounded(lambda: late.save(d, args=FastPersistSave({"w": x[k]}))))
      result["after_timeout"].append(bounded(lambda: late.restore(
          d, args=FastPersistRestore(target(x[0]))), lambda res: same(res, vals[k])))
    result["keys_after_timeout"] = keys()

    # 6. Orbax v1: back-to-back async saves, then loads.
    with ocp.v1.Context(checkpointables_options=ocp.v1.options.CheckpointablesOptions(
        registry=checkpointables_registry())):
      with ocp.v1.training.Checkpointer(os.path.join(root, "v1")) as ckptr:
        responses = []
        result["v1"] = [bounded(lambda: responses.append(ckptr.save_pytree_async(k, {"w": x[k]}, force=True)))
                        for k in range(3)]
        result["v1"] += [bounded(lambda: responses[k].result()) for k in range(len(responses))]
        result["v1"] += [bounded(lambda: ckptr.load_pytree(k, target(x[0])), lambda res: same(res, vals[k]))
                         for k in range(3)]
    result["keys_v1"] = keys()
    result["left"] = sorted(k for k, _ in client.key_value_dir_get("fastpersist/"))
  else:
    raise SystemExit(f"unknown scenario {scenario}")
  helpers.report_and_exit(client, result, pid, nproc, "break5")


if __name__ == "__main__":
  if sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
  else:   # Bazel py_test runs the file itself
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
